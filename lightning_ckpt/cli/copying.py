"""The verbs of ``lightning-ckpt`` that copy checkpoints elsewhere or describe a whole folder: push, pull, convert,
export, lineage, report (the others are in ``commands.py``); each imports what it needs when it runs."""
from __future__ import annotations

import argparse
import json
import sys

from .commands import dump, folder_there, human_bytes, manifest_or_hint, progress_bar
from .text import say


def cmd_push(args: argparse.Namespace) -> int:
    from ..folder.transfer import push_checkpoint

    m = manifest_or_hint(args.path)
    with progress_bar(sum(f["size"] for f in m["files"].values()), "push", args.quiet) as bar:
        try:
            res = push_checkpoint(args.path, args.dest, progress=bar.update if bar is not None else None)
        except ValueError as e:
            say(f"lightning-ckpt push: {e}", file=sys.stderr, lines=True)
            return 2
    if args.json:
        print(json.dumps({"uri": res.uri, "files": res.files, "bytes": res.bytes}))
    else:
        say(f"pushed {args.path} -> {res.uri} ({res.files} objects, {human_bytes(res.bytes)})")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from ..store.fs import check_output_path
    from ..folder.transfer import pull_checkpoint

    check_output_path(args.dir, "the pulled checkpoint into", folder=True)  # before anything is downloaded
    with progress_bar(0, "pull", args.quiet) as bar:
        try:
            path = pull_checkpoint(args.src, args.dir, progress=bar.update if bar is not None else None)
        except ValueError as e:
            say(f"lightning-ckpt pull: {e}", file=sys.stderr, lines=True)
            return 2
    if args.json:
        print(json.dumps({"path": path}))
    else:
        say(f"pulled {args.src} -> {path} (verified)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ..store.fs import check_output_path
    from ..tools.convert import convert_to_lightning

    check_output_path(args.out, "the .ckpt file")
    out = convert_to_lightning(args.path, args.out)
    if args.json:
        dump({"ckpt": out})
    else:
        say(f"wrote {out} (a Lightning .ckpt; loads with torch.load(weights_only=True) and load_from_checkpoint)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..store.fs import check_output_path
    from ..tools.standalone import export_standalone

    check_output_path(args.dest, "the export into", folder=True)
    try:
        out = export_standalone(args.path, args.dest, name=args.name)
    except FileExistsError as e:
        say(f"lightning-ckpt export: {e}", file=sys.stderr, lines=True)
        return 2
    if args.json:
        dump({"path": out})
    else:
        say(f"wrote {out} (self-contained: every byte it needs is in that folder; verified)")
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from ..folder.lineage import as_json, format_tree, lineage

    roots = lineage(args.dir)
    if args.json:
        dump({"dir": args.dir, "runs": as_json(roots)})
        return 0
    if not roots:
        say(f"no checkpoints in {args.dir}")
        return 0
    for line in format_tree(roots, human_bytes):
        say(line)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..tools.report import collect_run, default_output, render_report, save_html

    if not folder_there(args.dir):
        say(f"lightning-ckpt: {args.dir} is not a folder", file=sys.stderr)
        return 2
    from ..store.fs import check_output_path

    if args.out:
        check_output_path(args.out, "the report")
    rep = collect_run(args.dir, monitor=args.monitor, mode=args.mode)
    out = save_html(render_report(rep), args.out if args.out else default_output(args.dir))
    if args.json:
        dump({"path": out, "kept": len(rep.kept), "pruned": len(rep.pruned), "monitor": rep.monitor})
    else:
        say(f"wrote {out} ({len(rep.kept)} kept, {len(rep.pruned)} pruned checkpoint(s))")
    return 0
