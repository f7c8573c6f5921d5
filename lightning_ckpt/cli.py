"""``lightning-ckpt``: inspect and check checkpoints from the shell.

    lightning-ckpt ls DIR [--json]        committed checkpoints in a run folder
    lightning-ckpt show PATH [--json]     one checkpoint's manifest, summarised
    lightning-ckpt verify PATH [PATH...]  check every byte; exit status 1 if any fails

Exit codes: 0 success, 1 a checkpoint failed verification, 2 bad usage or nothing found.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

from .checkpoints import list_checkpoints, read_checkpoint_manifest, verify_checkpoint
from .errors import CheckpointCorruptError, CheckpointError, CheckpointFormatError, CheckpointNotFoundError


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
    if not os.path.isdir(args.dir):
        print(f"lightning-ckpt: {args.dir} is not a folder", file=sys.stderr)
        return 2
    ckpts = list_checkpoints(args.dir)
    if args.json:
        print(json.dumps([
            {"name": c.name, "path": c.path, "step": c.step, "epoch": c.epoch, "tags": c.tags, "metrics": c.metrics,
             "size_bytes": c.size_bytes, "kind": c.kind, "created_unix": c.created_unix}
            for c in ckpts
        ], indent=1))
        return 0
    if not ckpts:
        print(f"no committed checkpoints in {args.dir}")
        return 0
    rows = [("NAME", "STEP", "EPOCH", "TAGS", "METRICS", "SIZE", "AGE")]
    for c in ckpts:
        metrics = " ".join(f"{k}={_fmt_metric(v)}" for k, v in sorted(c.metrics.items())[:4])
        rows.append((c.name, str(c.step), str(c.epoch), ",".join(c.tags), metrics, _human_bytes(c.size_bytes), _human_age(c.created_unix)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    m = read_checkpoint_manifest(args.path)
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    size = sum(f["size"] for f in m["files"].values())
    print(f"checkpoint   {os.path.abspath(args.path)}")
    print(f"step         {m['step']}   epoch {m.get('epoch')}   kind {m.get('kind')}   world size {m.get('world_size')}")
    print(f"tags         {', '.join(m.get('tags') or []) or '-'}")
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
    for p in args.paths:
        t0 = time.perf_counter()
        try:
            verify_checkpoint(p)
        except (CheckpointCorruptError, CheckpointFormatError) as e:
            print(f"FAILED  {p}: {e}", file=sys.stderr)
            status = 1
            continue
        m = read_checkpoint_manifest(p)
        size = sum(f["size"] for f in m["files"].values())
        dt = time.perf_counter() - t0
        print(f"OK      {p}  ({_human_bytes(size)} checked in {dt:.2f}s)")
    return status


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lightning-ckpt", description="Inspect and verify lightning_ckpt checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("ls", help="list committed checkpoints in a run folder")
    ls.add_argument("dir")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_ls)
    show = sub.add_parser("show", help="summarise one checkpoint")
    show.add_argument("path")
    show.add_argument("--json", action="store_true", help="print the whole manifest")
    show.set_defaults(func=cmd_show)
    ver = sub.add_parser("verify", help="check every byte of checkpoints against their checksums")
    ver.add_argument("paths", nargs="+")
    ver.set_defaults(func=cmd_verify)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
