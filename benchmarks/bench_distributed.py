"""Distributed and merge benchmarks.

    python benchmarks/bench_distributed.py [--gb 0.4] [--nproc 2] [--dir /tmp/lc_dist]

1. Wall time of a durable (fsync) save of the same replicated state by N ranks: ``distributed="sharded"`` (each
   rank writes about 1/N) against ``"rank0"`` (rank 0 writes everything). Target: sharded <= 0.6x rank0 where the
   storage is not saturated by one writer. On one local disk shared by all ranks, the ranks compete for the same
   device, so the ratio shows the disk's parallelism rather than the scaling across nodes; ``--dir /dev/shm/...``
   (tmpfs) takes storage out of the picture. What is left is CPU: a save costs a copy into the page cache plus a
   CRC32C pass per byte, and rank 0 alone already runs them on two threads, so on a 2-core machine two ranks
   cannot do better than about 0.5x, and do about 0.7x. ``gpu.sh`` runs it on the GPU machine's 16 cores.
2. Merge throughput (``merge_checkpoint``: read, verify, write + fsync) against copying the same bytes with
   ``shutil.copyfile`` (the kernel's copy) + fsync, and the merger's peak memory (largest buffer and the process's
   peak RSS increase).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from lightning_ckpt import CheckpointWriter

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    n = int(args.gb * 1e9 / 4 / 3 / 16)
    torch.manual_seed(0)  # the same (replicated) state on every rank, as in DDP
    sd = {f"layer{i}.weight": torch.randn(n) for i in range(16)}
    opt = {"state": {i: {"exp_avg": torch.randn(n), "exp_avg_sq": torch.randn(n)} for i in range(16)},
           "param_groups": [{"lr": 0.1, "params": list(range(16))}]}
    state = {"state_dict": sd, "optimizer_states": [opt], "global_step": 1}
    results = {}
    for mode in ("sharded", "rank0") * args.repeats:
        d = os.path.join(args.dir, f"save-{mode}")
        w = CheckpointWriter(d, async_save=False, mode=mode)
        dist.barrier()
        t0 = time.perf_counter()
        w.save(state, step=1)
        w.wait()
        dist.barrier()
        dt = time.perf_counter() - t0
        w.close()
        results.setdefault(mode, []).append(dt)
        if rank == 0:
            shutil.rmtree(d, ignore_errors=True)
        dist.barrier()
    if rank == 0:
        print(json.dumps({**{k: statistics.median(v) for k, v in results.items()},
                          "samples": {k: [round(x, 4) for x in v] for k, v in results.items()}}))
    dist.destroy_process_group()


def merge_bench(args: argparse.Namespace) -> dict:
    import torch

    from lightning_ckpt import CheckpointWriter, merge_checkpoint

    d = os.path.join(args.dir, "merge")
    shutil.rmtree(d, ignore_errors=True)
    n_layers = 24
    per = int(args.gb * 1e9 / 4 / n_layers)
    torch.manual_seed(0)
    sd = {f"layers.{i}.weight": torch.randn(per) for i in range(n_layers)}
    w = CheckpointWriter(d, async_save=False)
    path = w.save({"state_dict": sd}, step=1).result().path
    w.close()
    del sd
    model_bytes = os.path.getsize(os.path.join(path, "model-rank00000.safetensors"))
    out = {"bytes": model_bytes, "largest_tensor_bytes": per * 4}
    merges, copies = [], []
    for _ in range(5):
        shutil.rmtree(os.path.join(d, "out"), ignore_errors=True)
        if os.path.exists(os.path.join(d, "copy.bin")):
            os.remove(os.path.join(d, "copy.bin"))
        os.sync()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t0 = time.perf_counter()
        res = merge_checkpoint(path, os.path.join(d, "out", "model.safetensors"))
        merges.append(time.perf_counter() - t0)
        out["peak_buffer_bytes"] = res.peak_buffer_bytes
        out["peak_rss_increase_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
        os.sync()
        t0 = time.perf_counter()
        src = os.path.join(path, "model-rank00000.safetensors")
        dst = os.path.join(d, "copy.bin")
        shutil.copyfile(src, dst)  # the kernel's copy (sendfile / copy_file_range on Linux), then fsync
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        copies.append(time.perf_counter() - t0)
    out["merge_s"] = statistics.median(merges)
    out["copy_s"] = statistics.median(copies)
    out["merge_gbps"] = model_bytes / out["merge_s"] / 1e9
    out["copy_gbps"] = model_bytes / out["copy_s"] / 1e9
    out["ratio"] = out["copy_s"] / out["merge_s"]
    shutil.rmtree(d, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=0.4)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/lc_dist")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    if a.worker:
        worker(a)
        return
    print(f"== {a.nproc}-rank durable save of {a.gb:.2f} GB replicated state (median of {a.repeats}), "
          f"{os.cpu_count()} cores, into {a.dir}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
           os.path.abspath(__file__), "--worker", "--gb", str(a.gb), "--dir", a.dir, "--repeats", str(a.repeats)]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if p.returncode != 0:
        print(p.stderr[-3000:])
        sys.exit(1)
    times = json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])
    ratio = times["sharded"] / times["rank0"]
    print(f"  sharded (each rank ~1/{a.nproc}) {times['sharded']:.2f}s   rank0 only {times['rank0']:.2f}s   "
          f"ratio {ratio:.2f}x (target <= 0.6x on storage one writer does not saturate)")
    print(f"  samples (s): sharded {times['samples']['sharded']}  rank0 {times['samples']['rank0']}")
    print(f"== merge of a {a.gb:.2f} GB model file (median of 5)")
    m = merge_bench(a)
    print(f"  merge_checkpoint {m['merge_s']:.2f}s ({m['merge_gbps']:.2f} GB/s)   copy + fsync {m['copy_s']:.2f}s "
          f"({m['copy_gbps']:.2f} GB/s)   ratio {m['ratio']:.2f}x (target >= 0.8x)")
    print(f"  peak memory: largest buffer {m['peak_buffer_bytes'] / 1e6:.1f} MB (largest tensor "
          f"{m['largest_tensor_bytes'] / 1e6:.1f} MB); process peak RSS grew by {m['peak_rss_increase_bytes'] / 1e6:.1f} MB "
          f"for a {m['bytes'] / 1e6:.0f} MB model")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"save": times, "save_ratio": ratio, "merge": m}, f, indent=1)


if __name__ == "__main__":
    main()
