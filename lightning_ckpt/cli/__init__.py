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
    lightning-ckpt convert PATH OUT.ckpt              one Lightning .ckpt (torch.load(weights_only=True) reads it)
    lightning-ckpt report RUN [-o OUT.html]           one HTML page: metric plots, best/kept/pruned checkpoints

Exit codes: 0 success, 1 a checkpoint failed verification, 2 bad usage or nothing found.

Nothing heavy is imported at start (no Lightning; torch only when a verb needs it), so ``--help`` answers at once.
"""
from __future__ import annotations

import argparse
import errno
import sys
from typing import Optional, Sequence

from ..errors import CheckpointError, CheckpointNotFoundError
from ..version import __version__
from .commands import cmd_diff, cmd_ls, cmd_merge, cmd_prune, cmd_show, cmd_verify
from .copying import cmd_convert, cmd_export, cmd_lineage, cmd_pull, cmd_push, cmd_report
from .text import escaped_diagnostics, say


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lightning-ckpt", description="Inspect and verify lightning_ckpt checkpoints.")
    p.add_argument("--version", action="version", version=f"lightning-ckpt {__version__}")
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
    mg.add_argument("out", help="output file, e.g. export/model.safetensors, or a folder to write model.safetensors in")
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
    df.add_argument("--quick", action="store_true",
                    help="decide from the manifests only (checksums, content hashes, shared packs); read no tensor")
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
    cv = sub.add_parser("convert", help="write a checkpoint as one Lightning .ckpt file (for tools that read only those)")
    cv.add_argument("path")
    cv.add_argument("out", help="the .ckpt file to write, e.g. model.ckpt")
    cv.add_argument("--json", action="store_true")
    cv.set_defaults(func=cmd_convert)
    ex = sub.add_parser("export", help="copy one checkpoint out as a self-contained folder (no shared packs)")
    ex.add_argument("path", help="a checkpoint (folder or s3://bucket/prefix/NAME)")
    ex.add_argument("dest", help="the folder to copy it into (it becomes DEST/NAME)")
    ex.add_argument("--standalone", action="store_true", default=True,
                    help="every byte it needs in its own folder, readable by itself (the default, and only, layout)")
    ex.add_argument("--name", help="the name of the copy (default: the checkpoint's own)")
    ex.add_argument("--json", action="store_true")
    ex.set_defaults(func=cmd_export)
    ln = sub.add_parser("lineage", help="the tree of runs and checkpoints of a folder, with what each one added")
    ln.add_argument("dir", help="a run folder or s3://bucket/prefix")
    ln.add_argument("--json", action="store_true")
    ln.set_defaults(func=cmd_lineage)
    rp = sub.add_parser("report", help="write an HTML page about a run folder: metric plots, save stall and size per "
                        "checkpoint, which checkpoints are best, kept and pruned")
    rp.add_argument("dir", help="run folder (or s3://bucket/prefix)")
    rp.add_argument("-o", "--out", help="HTML file to write (default: DIR/report.html; for s3://: "
                    "./<prefix>-report.html)")
    rp.add_argument("--monitor", help="metric the best checkpoints were chosen by (default: read from the callbacks' "
                    "state in the newest best checkpoint)")
    rp.add_argument("--mode", choices=["min", "max"], help="with --monitor (default: as recorded, else min)")
    rp.add_argument("--json", action="store_true", help="print the path and counts as JSON")
    rp.set_defaults(func=cmd_report)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with escaped_diagnostics():
            return args.func(args)
    except CheckpointNotFoundError as e:
        say(f"lightning-ckpt: {e}", file=sys.stderr, lines=True)
        return 2
    except CheckpointError as e:
        say(f"lightning-ckpt: {e}", file=sys.stderr, lines=True)
        return 1
    except ValueError as e:  # a bad path, URI or setting: bad usage
        say(f"lightning-ckpt {args.command}: {e}", file=sys.stderr, lines=True)
        return 2
    except OSError as e:  # an output path that cannot be written (under a file, no permission, disk full)
        say(f"lightning-ckpt {args.command}: {_os_error(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001
        if type(e).__module__.split(".")[0] in ("botocore", "boto3", "s3transfer"):
            say(f"lightning-ckpt: an S3 request failed: {e}. Check AWS_ENDPOINT_URL, the credentials (AWS_PROFILE, "
                "AWS_ACCESS_KEY_ID, ...) and that the bucket exists.", file=sys.stderr)
            return 1
        raise


def _os_error(e: OSError) -> str:
    """One line for a failed system call: what failed, on which path, and the usual cause."""
    where = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    hint = {errno.ENOTDIR: " (a part of that path is a file, not a folder)",
            errno.EEXIST: " (it exists already)", errno.EACCES: " (no permission)", errno.ENOSPC: " (disk full)",
            errno.EROFS: " (read-only filesystem)", errno.EISDIR: " (it is a folder)"}.get(e.errno, "")
    return f"{where}: {e.strerror or e}{hint}" if where else f"{e.strerror or e}{hint}"
