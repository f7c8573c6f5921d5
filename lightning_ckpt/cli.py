"""``lightning-ckpt``: inspect and check checkpoints from the shell.

    lightning-ckpt ls DIR [--json] [--verify]   committed checkpoints in a run folder
    lightning-ckpt show PATH [--json]     one checkpoint's manifest, summarised
    lightning-ckpt verify PATH [PATH...]  check every byte; exit status 1 if any fails
    lightning-ckpt prune DIR --keep-last N [--keep-best K --monitor M] [--keep-every-n-steps S]
                         [--max-total-bytes B] [--failed] [--dry-run]
    lightning-ckpt merge PATH OUT [--dtype bf16] [--max-shard-size 5GB]   one consolidated model.safetensors
    lightning-ckpt diff A B [--model-only] [--all] [--json]   metric changes and per-tensor differences
    lightning-ckpt push PATH s3://bucket/prefix       upload a checkpoint (objects first, manifest last)
    lightning-ckpt pull s3://bucket/prefix[/NAME] DIR download (the newest, or NAME), verify, commit locally

Exit codes: 0 success, 1 a checkpoint failed verification, 2 bad usage or nothing found.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Optional, Sequence

from .errors import CheckpointCorruptError, CheckpointError, CheckpointFormatError, CheckpointNotFoundError
from .read import list_checkpoints, read_checkpoint_manifest, verify_checkpoint
from .store import is_remote


def _human_bytes(n: float) -> str:
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
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def cmd_ls(args: argparse.Namespace) -> int:
    if not is_remote(args.dir) and not os.path.isdir(args.dir):
        print(f"lightning-ckpt: {args.dir} is not a folder", file=sys.stderr)
        return 2
    ckpts = list_checkpoints(args.dir)
    verified: dict[str, str] = {}
    if args.verify:
        for c in ckpts:
            try:
                verify_checkpoint(c.path)
                verified[c.name] = "ok"
            except CheckpointError as e:
                verified[c.name] = "CORRUPT"
                print(f"lightning-ckpt: {e}", file=sys.stderr)
    if args.json:
        print(json.dumps([
            {"name": c.name, "path": c.path, "step": c.step, "epoch": c.epoch, "tags": c.tags, "metrics": c.metrics,
             "size_bytes": c.size_bytes, "kind": c.kind, "created_unix": c.created_unix,
             "verified": {"ok": True, "CORRUPT": False}.get(verified.get(c.name, ""))}
            for c in ckpts
        ], indent=1))
        return 1 if "CORRUPT" in verified.values() else 0
    if not ckpts:
        print(f"no committed checkpoints in {args.dir}")
        return 0
    rows = [("NAME", "STEP", "EPOCH", "TAGS", "METRICS", "SIZE", "AGE", "VERIFIED")]
    for c in ckpts:
        metrics = " ".join(f"{k}={_fmt_metric(v)}" for k, v in sorted(c.metrics.items())[:4])
        rows.append((c.name, str(c.step), str(c.epoch), ",".join(c.tags), metrics, _human_bytes(c.size_bytes),
                     _human_age(c.created_unix), verified.get(c.name, "-")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    if not args.verify:
        print("(VERIFIED: run with --verify to check every byte)")
    return 1 if "CORRUPT" in verified.values() else 0


def cmd_show(args: argparse.Namespace) -> int:
    m = read_checkpoint_manifest(args.path)
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    size = sum(f["size"] for f in m["files"].values())
    print(f"checkpoint   {args.path if str(args.path).startswith('s3://') else os.path.abspath(args.path)}")
    print(f"step         {m['step']}   epoch {m.get('epoch')}   kind {m.get('kind')}   world size {m.get('world_size')}")
    print(f"tags         {', '.join(m.get('tags') or []) or '-'}")
    resume = m.get("resume")
    if m.get("kind", "full") != "full":
        print(f"exact resume -  (a {m.get('kind')} checkpoint does not resume training)")
    elif not isinstance(resume, dict):
        print("exact resume unknown (not recorded: written by an older lightning_ckpt)")
    elif resume.get("exact"):
        print("exact resume yes")
    else:
        print("exact resume no, because")
        for why in resume.get("why") or ["(no reason recorded)"]:
            print(f"  - {why}")
    print(f"size         {_human_bytes(size)} in {len(m['files'])} files, {len(m.get('tensors', {}))} tensors")
    t = m.get("timings") or {}
    if t:
        print(f"timings      snapshot {t.get('snapshot_s', 0):.3f}s, write {t.get('write_s', 0):.3f}s")
    if m.get("resumed_from"):
        print(f"resumed from {m['resumed_from']}")
    run = m.get("run") or {}
    if run:
        vers = ", ".join(f"{k} {v}" for k, v in (run.get("versions") or {}).items())
        print(f"written by   {run.get('host')} (pid {run.get('pid')}), git {run.get('git_commit') or '-'}, seed {run.get('seed')}")
        print(f"versions     {vers}")
    if m.get("metrics"):
        print("metrics")
        for k, v in sorted(m["metrics"].items()):
            print(f"  {k} = {_fmt_metric(v)}")
    if m.get("hparams"):
        print("hparams")
        for k, v in sorted(m["hparams"].items()):
            print(f"  {k} = {v}")
    print("files")
    for name, f in sorted(m["files"].items()):
        print(f"  {name:40s} {_human_bytes(f['size']):>10s}  {len(f.get('tensors', {}))} tensors")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    status = 0
    report = []
    for p in args.paths:
        t0 = time.perf_counter()
        try:
            size = sum(f["size"] for f in read_checkpoint_manifest(p)["files"].values())
            show = not args.json and sys.stderr.isatty()
            with _bar(size, f"verify {os.path.basename(p)}", not show) as bar:
                verify_checkpoint(p, progress=bar.update if show and bar is not None else None)
        except (CheckpointCorruptError, CheckpointFormatError, CheckpointNotFoundError) as e:
            if not args.json:
                print(f"FAILED  {p}: {e}", file=sys.stderr)
            report.append({"path": p, "ok": False, "error": str(e)})
            status = max(status, 2 if isinstance(e, CheckpointNotFoundError) and len(args.paths) == 1 else 1)
            continue
        dt = time.perf_counter() - t0
        report.append({"path": p, "ok": True, "bytes": size, "seconds": round(dt, 4)})
        if not args.json:
            print(f"OK      {p}  ({_human_bytes(size)} checked in {dt:.2f}s)")
    if args.json:
        print(json.dumps(report, indent=1))
    return status


def cmd_prune(args: argparse.Namespace) -> int:
    from .policy.retention import RetentionRules
    from .store.lock import FolderBusyError
    from .tools.prune import prune

    if not os.path.isdir(args.dir):
        print(f"lightning-ckpt: {args.dir} is not a folder", file=sys.stderr)
        return 2
    try:
        rules = RetentionRules(args.keep_last, args.keep_best, args.monitor, args.mode, args.keep_every_n_steps,
                               args.max_total_bytes)
    except ValueError as e:
        print(f"lightning-ckpt prune: {e}", file=sys.stderr)
        return 2
    if not rules.has_keep_rule and args.max_total_bytes is None and not args.failed:
        print("lightning-ckpt prune: give at least one rule (--keep-last, --keep-best, --keep-every-n-steps, "
              "--max-total-bytes) or --failed", file=sys.stderr)
        return 2
    try:
        report = prune(args.dir, rules, failed=args.failed, dry_run=args.dry_run)
    except FolderBusyError as e:
        print(f"lightning-ckpt prune: nothing deleted: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # a rule ranks by a metric no checkpoint recorded
        print(f"lightning-ckpt prune: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"dry_run": report.dry_run, "deleted": report.deleted, "partials": report.partials,
                          "kept": report.kept, "left_alone": report.left_alone}, indent=1))
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for p in report.partials:
        print(f"{verb} {p}  (interrupted save)")
    for p in report.left_alone:
        print(f"left {p}  (a save in progress by a running process)")
    for d in report.deleted:
        print(f"{verb} {d['path']}  ({d['reason']}, {_human_bytes(d['bytes'])})")
    kept_bytes = sum(c.size_bytes for c in list_checkpoints(args.dir) if c.path in set(report.kept))
    print(f"kept {len(report.kept)} checkpoint(s), {_human_bytes(kept_bytes)}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .tools.merge import merge_checkpoint

    with _bar(0, "merging", args.quiet) as bar:

        def progress(done: int, total: int) -> None:
            if bar is not None:
                bar.total = total
                bar.update(done - bar.n)

        try:
            res = merge_checkpoint(args.path, args.out, dtype=args.dtype, max_shard_bytes=args.max_shard_size, progress=progress)
        except ValueError as e:
            print(f"lightning-ckpt merge: {e}", file=sys.stderr)
            return 2
    gbps = res.bytes / res.seconds / 1e9 if res.seconds > 0 else 0.0
    if args.json:
        print(json.dumps({"files": res.files, "index": res.index_path, "checksums": res.checksums_path,
                          "tensors": res.tensors, "bytes": res.bytes, "seconds": round(res.seconds, 4)}, indent=1))
        return 0
    print(f"wrote {', '.join(res.files)}: {res.tensors} tensors, {_human_bytes(res.bytes)} in {res.seconds:.2f}s ({gbps:.2f} GB/s)")
    if res.index_path:
        print(f"index {res.index_path}")
    print(f"checksums {res.checksums_path}")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from .tools.diff import diff_checkpoints, format_metric_change

    d = diff_checkpoints(args.a, args.b, prefix="state_dict/" if args.model_only else None)
    if args.json:
        print(json.dumps({
            "a": d.a, "b": d.b, "step_a": d.step_a, "step_b": d.step_b,
            "metrics": {k: {"a": va, "b": vb} for k, (va, vb) in d.metrics.items()},
            "tensors": [t.__dict__ for t in d.tensors],
        }, indent=1))
        return 0
    print(f"A  {d.a}  (step {d.step_a})")
    print(f"B  {d.b}  (step {d.step_b})")
    if d.metrics:
        print("metrics")
        for k, (va, vb) in d.metrics.items():
            print(f"  {k:30s} {format_metric_change(va, vb)}")
    rows = d.tensors if args.all else d.changed
    print(f"tensors: {len(d.changed)} of {len(d.tensors)} differ")
    for t in rows:
        extra = ""
        if t.status == "changed":
            extra = f"max |A-B| = {t.max_abs_diff:.6g}"
        elif t.status in ("shape", "dtype"):
            extra = f"{t.shape_a} vs {t.shape_b}"
        print(f"  {t.status:10s} {t.key}  {extra}".rstrip())
    return 0


@contextlib.contextmanager
def _bar(total: int, desc: str, quiet: bool):
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


def cmd_push(args: argparse.Namespace) -> int:
    from .tools.transfer import push_checkpoint

    m = read_checkpoint_manifest(args.path)
    with _bar(sum(f["size"] for f in m["files"].values()), "push", args.quiet) as bar:
        try:
            res = push_checkpoint(args.path, args.dest, progress=bar.update if bar is not None else None)
        except ValueError as e:
            print(f"lightning-ckpt push: {e}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps({"uri": res.uri, "files": res.files, "bytes": res.bytes}))
    else:
        print(f"pushed {args.path} -> {res.uri} ({res.files} objects, {_human_bytes(res.bytes)})")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from .tools.transfer import pull_checkpoint

    with _bar(0, "pull", args.quiet) as bar:
        try:
            path = pull_checkpoint(args.src, args.dir, progress=bar.update if bar is not None else None)
        except ValueError as e:
            print(f"lightning-ckpt pull: {e}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps({"path": path}))
    else:
        print(f"pulled {args.src} -> {path} (verified)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lightning-ckpt", description="Inspect and verify lightning_ckpt checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("ls", help="list committed checkpoints in a run folder (or s3://bucket/prefix)")
    ls.add_argument("dir")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument("--verify", action="store_true", help="check every byte of every checkpoint (exit 1 if any fails)")
    ls.set_defaults(func=cmd_ls)
    show = sub.add_parser("show", help="summarise one checkpoint")
    show.add_argument("path")
    show.add_argument("--json", action="store_true", help="print the whole manifest")
    show.set_defaults(func=cmd_show)
    ver = sub.add_parser("verify", help="check every byte of checkpoints against their checksums")
    ver.add_argument("paths", nargs="+")
    ver.add_argument("--json", action="store_true")
    ver.set_defaults(func=cmd_verify)
    pr = sub.add_parser("prune", help="delete checkpoints that no retention rule keeps (the newest is always kept)")
    pr.add_argument("dir")
    pr.add_argument("--keep-last", type=int, help="keep the N newest")
    pr.add_argument("--keep-best", type=int, help="keep the N best by --monitor")
    pr.add_argument("--monitor", help="metric recorded in the manifests, for --keep-best")
    pr.add_argument("--mode", choices=["min", "max"], default="min")
    pr.add_argument("--keep-every-n-steps", type=int, help="keep checkpoints whose step is a multiple of N")
    pr.add_argument("--max-total-bytes", type=int, help="drop the oldest kept ones until the folder fits")
    pr.add_argument("--failed", action="store_true",
                    help="also remove interrupted saves and the checkpoints of runs that ended in an exception")
    pr.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_prune)
    mg = sub.add_parser("merge", help="consolidate a checkpoint's model weights into one safetensors file")
    mg.add_argument("path")
    mg.add_argument("out", help="output file, e.g. export/model.safetensors")
    mg.add_argument("--dtype", help="convert floating-point tensors: bf16, fp16, fp32")
    mg.add_argument("--max-shard-size", help="split the output above this size (e.g. 5GB) with an index json")
    mg.add_argument("--quiet", action="store_true", help="no progress bar")
    mg.add_argument("--json", action="store_true")
    mg.set_defaults(func=cmd_merge)
    df = sub.add_parser("diff", help="metric changes and, per tensor, whether it changed and by how much")
    df.add_argument("a")
    df.add_argument("b")
    df.add_argument("--model-only", action="store_true", help="only the model's tensors")
    df.add_argument("--all", action="store_true", help="list unchanged tensors too")
    df.add_argument("--json", action="store_true")
    df.set_defaults(func=cmd_diff)
    pu = sub.add_parser("push", help="upload a committed checkpoint to S3 (AWS settings from the environment)")
    pu.add_argument("path")
    pu.add_argument("dest", help="s3://bucket/prefix")
    pu.add_argument("--quiet", action="store_true", help="no progress bar")
    pu.add_argument("--json", action="store_true")
    pu.set_defaults(func=cmd_push)
    pl_ = sub.add_parser("pull", help="download a checkpoint from S3, verify it, and commit it into DIR")
    pl_.add_argument("src", help="s3://bucket/prefix (its latest.json) or s3://bucket/prefix/NAME")
    pl_.add_argument("dir")
    pl_.add_argument("--quiet", action="store_true", help="no progress bar")
    pl_.add_argument("--json", action="store_true")
    pl_.set_defaults(func=cmd_pull)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CheckpointNotFoundError as e:
        print(f"lightning-ckpt: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"lightning-ckpt: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001
        if type(e).__module__.split(".")[0] in ("botocore", "boto3", "s3transfer"):
            print(f"lightning-ckpt: an S3 request failed: {e}. Check AWS_ENDPOINT_URL, the credentials (AWS_PROFILE, "
                  "AWS_ACCESS_KEY_ID, ...) and that the bucket exists.", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
