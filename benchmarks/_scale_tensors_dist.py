#!/usr/bin/env python
"""Per-tensor cost with two ranks (issue 22): 2 ranks (gloo, torchrun) with ``--tensors`` tensors each (``--total-mb`` in
all), as DDP holds them (replicated: the plain path, ``writer/plain.py``) and as FSDP2 holds them (``fully_shard``:
DTensor shards, through DCP), against one process saving the same state; and the collectives each save ran.

    python benchmarks/_scale_tensors_dist.py            # launches torchrun itself; prints a table, writes JSON

Per layout: durable synchronous save time (slowest rank), load time (DDP: ``load_checkpoint`` in each rank; FSDP2:
``load_into`` the sharded state), collectives per save at ``--tensors`` and at ``--tensors // 10`` tensors (counted by wrapping
``torch.distributed``'s functions); "next save": a second save of the same state by the same writer (FSDP2: the
writer's cached global plan, ``dcp.planned.save_planned``).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

COLLECTIVES = ("all_gather_object", "gather_object", "broadcast_object_list", "all_gather", "gather", "broadcast",
               "all_reduce", "reduce_scatter", "scatter_object_list", "barrier", "all_to_all")


def _worker(a: argparse.Namespace) -> None:
    if a.tree:
        sys.path.insert(0, a.tree)
    import torch
    import torch.distributed as dist

    from lightning_ckpt import load_checkpoint
    from lightning_ckpt.load import load_into
    from lightning_ckpt.writer import CheckpointWriter

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    counts: collections.Counter = collections.Counter()
    for name in COLLECTIVES:
        fn = getattr(dist, name)
        setattr(dist, name, lambda *x, __f=fn, __n=name, **k: (counts.update([__n]), __f(*x, **k))[1])
    per = max(2, (a.total_mb << 20) // 4 // a.n)
    out: dict = {}

    def timed_save(w, state, step) -> float:
        dist.barrier()
        counts.clear()
        t0 = time.perf_counter()
        w.save(state, step=step).result()
        took, ran = time.perf_counter() - t0, dict(counts)  # (before this benchmark's own collective below)
        got = [None] * world
        dist.all_gather_object(got, took)
        return max(got), ran

    for layout in ("ddp", "fsdp2"):
        d = os.path.join(a.dir, layout)
        res = {}
        for n in (a.n // 10, a.n):
            if layout == "ddp":
                state = {"state_dict": {f"p{i}": torch.full((per,), float(i)) for i in range(n)}}
            else:
                from torch.distributed.fsdp import fully_shard
                from torch.distributed.checkpoint.state_dict import get_model_state_dict

                model = torch.nn.ParameterList([torch.nn.Parameter(torch.full((per,), float(i))) for i in range(n)])
                fully_shard(model)
                state = {"state_dict": get_model_state_dict(model)}
            w = CheckpointWriter(d, async_save=False, dedup=False)
            save_s, ran = timed_save(w, state, n)
            again_s, ran_again = timed_save(w, state, n + 1)  # the same writer, the same state: a training run's next save
            res[n] = {"save_s": save_s, "collectives": ran, "save_again_s": again_s, "collectives_again": ran_again}
            w.close()
            path = os.path.join(d, f"step={n:06d}")
            dist.barrier()
            t0 = time.perf_counter()
            if layout == "ddp":
                load_checkpoint(path)
            else:
                load_into(path, state)
            got = [None] * world
            dist.all_gather_object(got, time.perf_counter() - t0)
            res[n]["load_s"] = max(got)
        out[layout] = res
    if rank == 0:
        with open(a.out, "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


def _single(n: int, total_mb: int, d: str) -> dict:
    import torch

    from lightning_ckpt import load_checkpoint
    from lightning_ckpt.writer import CheckpointWriter

    per = max(2, (total_mb << 20) // 4 // n)
    w = CheckpointWriter(d, async_save=False, dedup=False)
    t0 = time.perf_counter()
    r = w.save({"state_dict": {f"p{i}": torch.full((per,), float(i)) for i in range(n)}}, step=n).result()
    save_s = time.perf_counter() - t0
    w.close()
    t0 = time.perf_counter()
    load_checkpoint(r.path)
    return {"save_s": save_s, "load_s": time.perf_counter() - t0}


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "dist.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.abspath(__file__), "--worker", "--dir", d, "--out", out, "--tensors", str(args.n),
               "--total-mb", str(args.total_mb), "--tree", args.tree]
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=args.tree + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        with open(out) as f:
            result = json.load(f)
        result["single_process"] = _single(args.n, args.total_mb, os.path.join(d, "single"))
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tensors", dest="n", type=int, default=10000, help="tensors per rank")
    p.add_argument("--total-mb", type=int, default=64)
    p.add_argument("--tree", default=ROOT, help="the lightning_ckpt source tree to measure (default: this one)")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--dir")
    p.add_argument("--out")
    p.add_argument("--json", default=os.path.join(HERE, "results", "scale-tensors-dist-cpu.json"))
    a = p.parse_args()
    if a.worker:
        _worker(a)
        return 0
    a.tree = os.path.abspath(a.tree)
    sys.path.insert(0, a.tree)
    r = run(a)
    r["tree"] = a.tree
    one = r["single_process"]
    print(f"lightning_ckpt from {a.tree}")
    print(f"one process, {a.n:,} tensors: save {one['save_s']:.2f} s, load {one['load_s']:.2f} s")
    for layout in ("ddp", "fsdp2"):
        for n, x in sorted(r[layout].items(), key=lambda kv: int(kv[0])):
            print(f"2 ranks {layout:5s} {int(n):>7,} tensors: save {x['save_s']:.2f} s ({x['save_s'] / one['save_s']:.2f}x "
                  f"one process at {a.n:,}), next save {x['save_again_s']:.2f} s, load {x['load_s']:.2f} s, collectives "
                  f"{sum(x['collectives'].values())} {x['collectives']} (next save: "
                  f"{sum(x['collectives_again'].values())})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
