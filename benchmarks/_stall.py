#!/usr/bin/env python
"""The training stall of a background save (issue 22): how long ``CheckpointWriter.save()`` holds the training thread
with ``async_save=True``, for a state of ``--total-mb`` of float32 split into N tensors, against one copy of the same
bytes measured in the same process.

Two shapes of state per N: ``same`` (the same tensor objects at every save, as a loop that keeps its own dict) and
``fresh`` (new detached tensors over the same storage at every save, as ``module.state_dict()`` returns them: no
cache keyed on object identity helps). Besides the stall (wall clock), the training thread's CPU time during
``save()`` (``time.thread_time``) is reported: on a loaded machine it moves far less than the wall clock, since it does
not count the time the thread waited for a core. Before each timed save every tensor is changed in place (so deduplication
reuses nothing, as in training); the stall is the median of the saves after the first two (the first lays out the
host buffers, the second builds the guards over a state seen twice, ``format/views.DenseMemo``: both are printed on
their own); the previous save is waited for before the next one.

``--trees A B ...`` runs the measurement once per source tree (a checkout of this repository, ``PYTHONPATH`` set to
it) in fresh processes, interleaved, so a before/after comparison shares the machine's load:
``python benchmarks/_stall.py --trees /work/main .``. Writes ``benchmarks/results/stall-cpu.{json,txt}``.
Goal at N = 50,000 (64 MB): stall <= 0.1 s, or 3x one copy.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def measure(n: int, total_mb: int, saves: int, fresh: bool) -> dict[str, Any]:
    import torch

    from lightning_ckpt.writer import CheckpointWriter

    per = max(1, (total_mb << 20) // 4 // n)
    live = {f"layer{i}.weight": torch.randn(per) for i in range(n)}
    d = tempfile.mkdtemp()
    stalls, cpus = [], []
    try:
        w = CheckpointWriter(os.path.join(d, "async"), async_save=True)
        for step in range(1, saves + 1):
            for t in live.values():
                t.add_(1)
            sd = {k: t.detach() for k, t in live.items()} if fresh else live
            state = {"state_dict": sd, "global_step": step, "loops": {"fit": {"batch": step}}}
            c0, t0 = time.thread_time(), time.perf_counter()
            p = w.save(state, step=step)
            stalls.append(time.perf_counter() - t0)
            cpus.append(time.thread_time() - c0)
            p.result()
        w.close()
        src, dst = torch.randn(n * per), torch.empty(n * per)
        dst.copy_(src)
        copies = []
        for _ in range(3):
            t0 = time.perf_counter()
            dst.copy_(src)
            copies.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    stall = statistics.median(stalls[2:])
    return {"tensors": n, "state": "fresh" if fresh else "same", "stall_first_s": stalls[0],
            "stall_second_s": stalls[1], "stall_s": stall,
            "stall_min_s": min(stalls[2:]), "cpu_s": statistics.median(cpus[2:]), "stalls_s": stalls,
            "cpus_s": cpus, "one_copy_s": min(copies), "stall_vs_copy": stall / min(copies)}


def _child(args: argparse.Namespace) -> int:
    out = [measure(n, args.total_mb, args.saves, fresh) for n in args.counts for fresh in (False, True)]
    print(json.dumps(out))
    return 0


def _tree_label(tree: str) -> str:
    try:
        rev = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "-uno"], capture_output=True, text=True,
                               check=True).stdout.strip()
        return f"{os.path.abspath(tree)}@{rev}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.CalledProcessError):
        return os.path.abspath(tree)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--counts", type=int, nargs="+", default=[100, 10000, 50000])
    p.add_argument("--total-mb", type=int, default=64)
    p.add_argument("--saves", type=int, default=7, help="saves per measurement (the first two are not counted)")
    p.add_argument("--trees", nargs="+", default=[ROOT], help="source trees to compare (default: this one)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds over the trees (the best is kept)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "stall-cpu"), help="path without .json/.txt")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args)
    results: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for tree in args.trees:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--total-mb", str(args.total_mb), "--saves",
                   str(args.saves), "--counts", *map(str, args.counts)]
            rows = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)
            best = results.setdefault(_tree_label(tree), rows)
            for i, r in enumerate(rows):
                if r["stall_s"] < best[i]["stall_s"]:
                    best[i] = r
    lines = [f"stall of an async save, {args.total_mb} MB of float32 in N tensors (median of saves 3..{args.saves}, "
             f"best of {args.rounds} round(s)); machine load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
             f"{'tree':<44} {'state':<6} {'N':>7} {'stall s':>8} {'min s':>7} {'cpu s':>7} {'first s':>8} {'2nd s':>7} "
             f"{'copy s':>7} {'x copy':>7}"]
    for label, rows in results.items():
        for r in rows:
            lines.append(f"{label[-44:]:<44} {r['state']:<6} {r['tensors']:>7,} {r['stall_s']:>8.3f} "
                         f"{r.get('stall_min_s', r['stall_s']):>7.3f} {r.get('cpu_s', float('nan')):>7.3f} "
                         f"{r['stall_first_s']:>8.3f} {r.get('stall_second_s', float('nan')):>7.3f} {r['one_copy_s']:>7.4f} {r['stall_vs_copy']:>7.1f}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump({"total_mb": args.total_mb, "saves": args.saves, "rounds": args.rounds, "results": results,
                       "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}}, f, indent=1)
        with open(args.out + ".txt", "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
