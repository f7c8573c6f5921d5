"""The verbs of ``lightning-ckpt`` (see ``lightning_ckpt/cli/__init__.py``); each imports what it needs when it runs."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from typing import Any, Optional

from ..errors import CheckpointCorruptError, CheckpointError, CheckpointFormatError, CheckpointNotFoundError
from .text import say, shown
from ..policy.enums import Kind


def _jsonable(x):
    """``x`` with non-finite floats as strings ("nan", "inf", "-inf"), so ``--json`` output is always valid JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def dump(x) -> None:
    print(json.dumps(_jsonable(x), indent=1))  # json escapes control characters


def folder_there(location: str) -> bool:
    """Whether the folder ``location`` names is there (a remote location always is: its prefix needs no creating).
    Something that is no folder path nor URI gives True: the call that follows refuses it with its own message."""
    from ..store import open_store

    try:
        return open_store(location).exists()
    except ValueError:
        return True


def manifest_or_hint(path: str) -> dict:
    """The manifest of the checkpoint at ``path``; for a run folder (checkpoints inside), an error that lists them."""
    from ..read import list_checkpoints, read_checkpoint_manifest

    try:
        return read_checkpoint_manifest(path)
    except CheckpointNotFoundError as e:
        inside = []
        if folder_there(path):
            try:
                inside = [c.path for c in list_checkpoints(path)]
            except (CheckpointError, ValueError):
                inside = []
        if not inside:
            raise
        shown = "\n  ".join(inside[-5:]) + (f"\n  ... ({len(inside) - 5} more: lightning-ckpt ls {path})"
                                            if len(inside) > 5 else "")
        raise CheckpointNotFoundError(f"{path} is a run folder, not one checkpoint; pass one of the checkpoints it "
                                      f"holds:\n  {shown}") from e


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _human_age(created: Optional[float]) -> str:
    if not created:
        return "?"
    s = max(0.0, time.time() - created)
    for unit, div in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= div:
            return f"{s / div:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def _fmt_metric(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)[:80]


def _secs(v) -> str:
    return f"{v:.3f}s" if isinstance(v, (int, float)) and not isinstance(v, bool) else "?"


def cmd_ls(args: argparse.Namespace) -> int:
    from ..read import list_checkpoints, verify_checkpoint

    if not folder_there(args.dir):
        say(f"lightning-ckpt: {args.dir} is not a folder", file=sys.stderr)
        return 2
    ckpts = list_checkpoints(args.dir)
    best_now = _current_best(ckpts)
    verified: dict[str, str] = {}
    if args.verify:
        for c in ckpts:
            try:
                verify_checkpoint(c.path)
                verified[c.name] = "ok"
            except CheckpointError as e:
                verified[c.name] = "CORRUPT"
                say(f"lightning-ckpt: {e}", file=sys.stderr, lines=True)
    if args.json:
        dump([
            {"name": c.name, "path": c.path, "step": c.step, "epoch": c.epoch, "tags": c.tags, "metrics": c.metrics,
             "size_bytes": c.size_bytes, "kind": c.kind, "created_unix": c.created_unix,
             "best_rank": best_now.get(c.name) or None,
             "verified": {"ok": True, "CORRUPT": False}.get(verified.get(c.name, ""))}
            for c in ckpts
        ])
        return 1 if "CORRUPT" in verified.values() else 0
    if not ckpts:
        say(f"no committed checkpoints in {args.dir}")
        return 0
    rows = [("NAME", "STEP", "EPOCH", "TAGS", "METRICS", "SIZE", "AGE", "VERIFIED")]
    for c in ckpts:
        metrics = " ".join(f"{k}={_fmt_metric(v)}" for k, v in sorted(c.metrics.items())[:4])
        created = c.created_unix if isinstance(c.created_unix, (int, float)) else None
        rows.append(tuple(shown(cell) for cell in (  # escaped before the widths are measured
            c.name, str(c.step), str(c.epoch), _tags_text(c, best_now), metrics, human_bytes(c.size_bytes),
            _human_age(created), verified.get(c.name, "-"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        say("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    if any(best_now.values()):
        ranked = {n: r for n, r in best_now.items() if r}
        first = min(ranked, key=ranked.get)
        say(f"best now: {first}" + (f" (and {len(ranked) - 1} more in the top-k)" if len(ranked) > 1 else "")
              + "; 'was best': tagged best when saved, since fallen out of the top-k")
    if not args.verify:
        say("(VERIFIED: run with --verify to check every byte)")
    return 1 if "CORRUPT" in verified.values() else 0


def _current_best(ckpts: list) -> dict[str, int]:
    """Name -> rank (1 = best) of the checkpoints in the top-k now, by the rule their manifests record, per run."""
    from ..read import of_run, run_name_of
    from ..folder.best import rank_best

    from ..folder.best import best_rule

    out: dict[str, int] = {}
    for run in {run_name_of(c.summary) for c in ckpts}:
        mine = of_run(ckpts, run)
        if best_rule(mine) is None:  # written before rules were recorded: the tags are all there is
            out.update({c.name: 0 for c in mine if "best" in c.tags})
            continue
        for i, c in enumerate(rank_best(mine)):
            out[c.name] = i + 1
    return out


def _tags_text(c: Any, best_now: dict) -> str:
    if best_now.get(c.name) == 0:
        return ",".join(c.tags)
    tags = [t if t != "best" or c.name in best_now else "was best" for t in c.tags]
    if c.name in best_now:
        tags = [f"best #{best_now[c.name]}" if t == "best" else t for t in tags]
    return ",".join(tags)


def cmd_show(args: argparse.Namespace) -> int:
    m = manifest_or_hint(args.path)
    if args.json:
        dump(m)
        return 0
    size = sum(f["size"] for f in m["files"].values())
    from ..store import folder_key

    where = folder_key(args.path)
    say(f"checkpoint   {where}")
    say(f"step         {m['step']}   epoch {m.get('epoch')}   kind {m.get('kind')}   world size {m.get('world_size')}")
    say(f"tags         {', '.join(m.get('tags') or []) or '-'}")
    resume = m.get("resume")
    if m.get("kind", Kind.FULL.value) != Kind.FULL:
        say(f"exact resume -  (a {m.get('kind')} checkpoint does not resume training)")
    elif not isinstance(resume, dict):
        say("exact resume unknown (not recorded: written by an older lightning_ckpt)")
    elif resume.get("exact"):
        say("exact resume yes")
    else:
        say("exact resume no, because")
        for why in resume.get("why") or ["(no reason recorded)"]:
            say(f"  - {why}")
    say(f"size         {human_bytes(size)} in {len(m['files'])} files, {len(m.get('tensors', {}))} tensors")
    t = m.get("timings") if isinstance(m.get("timings"), dict) else {}
    if t:
        say(f"timings      snapshot {_secs(t.get('snapshot_s'))}, write {_secs(t.get('write_s'))}")
    if m.get("resumed_from"):
        say(f"resumed from {str(m['resumed_from'])[:300]}")
    run = m.get("run") if isinstance(m.get("run"), dict) else {}
    if run:
        versions = run.get("versions") if isinstance(run.get("versions"), dict) else {}
        say(f"written by   {run.get('host')} (pid {run.get('pid')}), git {run.get('git_commit') or '-'}, seed {run.get('seed')}")
        say(f"versions     {', '.join(f'{k} {v}' for k, v in versions.items())}")
    if m.get("metrics"):
        say("metrics")
        for k, v in sorted(m["metrics"].items()):
            say(f"  {k} = {_fmt_metric(v)}")
    if isinstance(m.get("hparams"), dict) and m["hparams"]:
        say("hparams")
        for k, v in sorted(m["hparams"].items()):
            say(f"  {k} = {str(v)[:200]}")
    say("files")
    for name, f in sorted(m["files"].items()):
        say(f"  {shown(name):40s} {human_bytes(f['size']):>10s}  {len(f.get('tensors', {}))} tensors")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ..read import verify_checkpoint

    status = 0
    report = []
    for p in args.paths:
        t0 = time.perf_counter()
        try:
            size = sum(f["size"] for f in manifest_or_hint(p)["files"].values())
            show = not args.json and sys.stderr.isatty()
            with progress_bar(size, shown(f"verify {os.path.basename(p)}"), not show) as bar:
                verify_checkpoint(p, progress=bar.update if show and bar is not None else None)
        except (CheckpointCorruptError, CheckpointFormatError, CheckpointNotFoundError) as e:
            if not args.json:
                say(f"FAILED  {p}: {e}", file=sys.stderr, lines=True)
            report.append({"path": p, "ok": False, "error": str(e)})
            status = max(status, 2 if isinstance(e, CheckpointNotFoundError) and len(args.paths) == 1 else 1)
            continue
        dt = time.perf_counter() - t0
        report.append({"path": p, "ok": True, "bytes": size, "seconds": round(dt, 4)})
        if not args.json:
            say(f"OK      {p}  ({human_bytes(size)} checked in {dt:.2f}s)")
    if args.json:
        dump(report)
    return status


def cmd_prune(args: argparse.Namespace) -> int:
    from ..policy.retention import RetentionRules
    from ..store.lock import FolderBusyError
    from ..tools.prune import committed_records, prune

    if not os.path.isdir(args.dir):
        say(f"lightning-ckpt: {args.dir} is not a folder", file=sys.stderr)
        return 2
    try:
        rules = RetentionRules(args.keep_last, args.keep_best, args.monitor, args.mode, args.keep_every_n_steps,
                               args.max_total_bytes)
    except ValueError as e:
        say(f"lightning-ckpt prune: {e}", file=sys.stderr, lines=True)
        return 2
    if not rules.has_keep_rule and args.max_total_bytes is None and not args.failed:
        say("lightning-ckpt prune: give at least one rule (--keep-last, --keep-best, --keep-every-n-steps, "
              "--max-total-bytes) or --failed", file=sys.stderr)
        return 2
    try:
        report = prune(args.dir, rules, failed=args.failed, dry_run=args.dry_run)
    except FolderBusyError as e:
        say(f"lightning-ckpt prune: nothing deleted: {e}", file=sys.stderr, lines=True)
        return 2
    except ValueError as e:  # a rule ranks by a metric no checkpoint recorded
        say(f"lightning-ckpt prune: {e}", file=sys.stderr, lines=True)
        return 2
    if args.json:
        dump({"dry_run": report.dry_run, "deleted": report.deleted, "partials": report.partials,
               "kept": report.kept, "left_alone": report.left_alone, "packs": report.packs})
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for p in report.partials:
        say(f"{verb} {p}  (interrupted save)")
    for p in report.left_alone:
        say(f"left {p}  (a save in progress by a running process)")
    for d in report.deleted:
        say(f"{verb} {d['path']}  ({d['reason']}, {human_bytes(d['bytes'])})")
    for p in report.packs:
        size = f", {human_bytes(p['bytes'])}" if p.get("bytes") is not None else ""
        say(f"{verb} {p['path']}  (no checkpoint kept references it{size})")
    kept = {os.path.basename(p) for p in report.kept}
    kept_bytes = sum(r.size_bytes for r in committed_records(args.dir) if r.name in kept)  # shared packs once
    say(f"kept {len(report.kept)} checkpoint(s), {human_bytes(kept_bytes)}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from ..tools.merge import merge_checkpoint

    with progress_bar(0, "merging", args.quiet) as bar:

        def progress(done: int, total: int) -> None:
            if bar is not None:
                bar.total = total
                bar.update(done - bar.n)

        try:
            res = merge_checkpoint(args.path, args.out, dtype=args.dtype, max_shard_bytes=args.max_shard_size, progress=progress)
        except ValueError as e:
            say(f"lightning-ckpt merge: {e}", file=sys.stderr, lines=True)
            return 2
    gbps = res.bytes / res.seconds / 1e9 if res.seconds > 0 else 0.0
    if args.json:
        dump({"files": res.files, "index": res.index_path, "checksums": res.checksums_path,
               "tensors": res.tensors, "bytes": res.bytes, "seconds": round(res.seconds, 4)})
        return 0
    say(f"wrote {', '.join(res.files)}: {res.tensors} tensors, {human_bytes(res.bytes)} in {res.seconds:.2f}s ({gbps:.2f} GB/s)")
    if res.index_path:
        say(f"index {res.index_path}")
    say(f"checksums {res.checksums_path}")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from ..tools.diff import diff_checkpoints, format_metric_change

    d = diff_checkpoints(args.a, args.b, prefix="state_dict/" if args.model_only else None, values=not args.quick)
    if args.json:
        dump({
            "a": d.a, "b": d.b, "step_a": d.step_a, "step_b": d.step_b,
            "metrics": {k: {"a": va, "b": vb} for k, (va, vb) in d.metrics.items()},
            "tensors": [t.__dict__ for t in d.tensors],
        })
        return 0
    say(f"A  {d.a}  (step {d.step_a})")
    say(f"B  {d.b}  (step {d.step_b})")
    if d.metrics:
        say("metrics")
        for k, (va, vb) in d.metrics.items():
            say(f"  {shown(k):30s} {format_metric_change(va, vb)}")
    rows = d.tensors if args.all else d.changed
    say(f"tensors: {len(d.changed)} of {len(d.tensors)} differ")
    for t in rows:
        extra = ""
        if t.status == "changed" and t.max_abs_diff is not None:
            extra = f"max |A-B| = {t.max_abs_diff:.6g}"
        elif t.status in ("shape", "dtype"):
            extra = f"{t.shape_a} vs {t.shape_b}"
        say(f"  {t.status:10s} {t.key}  {extra}".rstrip())
    return 0



@contextlib.contextmanager
def progress_bar(total: int, desc: str, quiet: bool):
    """A byte progress bar on stderr (closed on exit); ``None`` when tqdm is missing."""
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=quiet or None)
    except ImportError:  # pragma: no cover
        bar = None
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()
