"""GPU checkpoint benchmark: training time lost per checkpoint for a model + Adam state of ~6.4 GB.

    python benchmarks/bench_gpu.py [--gb 6.4] [--dir /tmp/lc_bench] [--json out.json]

Variants, measured in the same run on the same card and disk:
  lightning       Lightning ModelCheckpoint (TorchCheckpointIO)
  lightning_async Lightning ModelCheckpoint + AsyncCheckpointIO
  dcp_async       torch.distributed.checkpoint.async_save with pinned staging (fresh DefaultStager per save)
  ours_async      lightning_ckpt.PeriodicCheckpoint(async_save=True)
Floor: the pinned device-to-host copy of the same bytes. Plus: GPU memory during saves, host RSS over 10 saves,
and restore onto the GPU (load_checkpoint(map_location="cuda")) against a raw read of the same bytes (page cache
evicted with posix_fadvise before each read).

"Time lost per checkpoint" = sum over all training steps of (step time - median step time) / number of saves,
plus the wait at the end of fit, so the background work of async saves that slows the steps around it counts too.
The two parts are also reported separately: the steady-state stall per save (the step-time excess per save, while
training runs) and the end-of-fit wait (from the last step's end until fit returned, beyond the same wait of a fit
without checkpoints: for an async save, the part of the last save not yet written when training ended).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

import torch  # noqa: E402

T_START = time.perf_counter()
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu only to smoke-test this script


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def say(*a):
    print(f"[{time.perf_counter() - T_START:6.1f}s]", *a, flush=True)


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def evict(path: str) -> None:
    """Drop a folder's files from the page cache (no privileges needed)."""
    for root, _, files in os.walk(path):
        for n in files:
            fd = os.open(os.path.join(root, n), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def raw_write(path: str, nbytes: int) -> float:
    buf = torch.empty(min(nbytes, 1 << 30), dtype=torch.uint8).numpy()
    buf[:] = 7
    mv = memoryview(buf)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    left = nbytes
    while left:
        left -= os.write(fd, mv[: min(left, len(mv))])
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0


def raw_read(path: str) -> float:
    evict(os.path.dirname(path) if os.path.isdir(os.path.dirname(path)) else path)
    buf = bytearray(1 << 26)
    mv = memoryview(buf)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(mv):
            pass
    return time.perf_counter() - t0


def build(gb: float, width: int = 8192):
    import lightning.pytorch as pl
    from torch import nn

    params_needed = gb * 1e9 / 12  # fp32 weights + Adam exp_avg + exp_avg_sq
    layers = max(1, round(params_needed / (width * width)))

    class Big(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return self.net(x).float().pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-6, foreach=True)

    return Big, layers, width


class Steps:
    """Records the wall time of every training step (synchronized) and the end of fit."""

    def __init__(self):
        import lightning.pytorch as pl

        outer = self

        class CB(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                sync()
                outer.t_start.append(time.perf_counter())

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                sync()
                outer.t_end.append(time.perf_counter())
                outer.gpu_mem.append(torch.cuda.memory_allocated() if DEV == "cuda" else 0)

        self.cb = CB()
        self.t_start: list[float] = []
        self.t_end: list[float] = []
        self.gpu_mem: list[int] = []

    def lost(self, n_saves: int, fit_end: float) -> dict:
        # step i spans from the end of step i-1 to the end of step i (callbacks' save work included)
        spans = [b - a for a, b in zip(self.t_end[:-1], self.t_end[1:])]
        warm = spans[3:]  # skip the first steps (allocator and cuBLAS warm-up)
        med = statistics.median(warm)
        excess = sum(max(0.0, s - med) for s in warm)
        tail = fit_end - self.t_end[-1]
        return {"median_step_s": med, "excess_s": excess, "end_of_fit_s": tail,
                "steady_stall_per_ckpt_s": excess / n_saves, "max_step_excess_s": max((s - med for s in warm), default=0.0),
                "lost_per_ckpt_s": (excess + tail) / n_saves, "steps": len(spans) + 1}


def loader(width: int, batch: int, steps: int):
    x = torch.randn(batch, width, device=DEV)

    class L:
        def __iter__(self):
            for _ in range(steps):
                yield (x,)

        def __len__(self):
            return steps

    return L()


def run_variant(name: str, Big, width: int, batch: int, steps: int, every: int, root: str, extra_callbacks_fn, plugins=None):
    import lightning.pytorch as pl

    d = os.path.join(root, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    torch.manual_seed(0)
    model = Big()
    rec = Steps()
    cbs, finish = extra_callbacks_fn(d)
    from lightning.pytorch.callbacks import Checkpoint

    trainer = pl.Trainer(accelerator=DEV, devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[rec.cb, *cbs], plugins=plugins or [],
                         enable_checkpointing=any(isinstance(c, Checkpoint) for c in cbs),
                         num_sanity_val_steps=0, limit_val_batches=0)
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, train_dataloaders=loader(width, batch, steps))
    fit_end = time.perf_counter()
    if finish is not None:
        finish()
        fit_end = time.perf_counter()
    n_saves = steps // every if cbs else 1
    res = rec.lost(n_saves, fit_end)
    res["saves"] = n_saves
    steady = [m for m in rec.gpu_mem[5:]]
    res["gpu_mem_growth_gb"] = (max(steady) - min(steady)) / 1e9 if steady else 0.0
    res["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9 if DEV == "cuda" else 0.0
    del trainer, model
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
    shutil.rmtree(d, ignore_errors=True)
    say(f"{name:16s} lost/ckpt {res['lost_per_ckpt_s']:.3f}s  (median step {res['median_step_s'] * 1e3:.1f} ms, "
        f"steady-state stall/save {res['steady_stall_per_ckpt_s']:.3f}s, end-of-fit wait {res['end_of_fit_s']:.2f}s, "
        f"{n_saves} saves)")
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=6.4)
    ap.add_argument("--dir", default="/tmp/lc_bench")
    ap.add_argument("--json")
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--width", type=int, default=8192)
    ap.add_argument("--skip", default="", help="comma-separated variants to skip (none, ours_async, dcp_async, lightning, lightning_async, extras)")
    a = ap.parse_args()
    if DEV != "cuda":
        say("no CUDA GPU: running on the CPU as a smoke test of this script (numbers mean nothing)")
    torch.backends.cuda.matmul.allow_tf32 = True
    os.makedirs(a.dir, exist_ok=True)
    import lightning

    from lightning_ckpt import PeriodicCheckpoint, latest_checkpoint, load_checkpoint
    from lightning_ckpt.format.checksum import hardware_accelerated

    out: dict = {"gpu": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "torch": torch.__version__, "lightning": lightning.__version__,
                 "crc32c_hw": hardware_accelerated(), "cpus": os.cpu_count()}
    say(f"{out}")
    Big, layers, width = build(a.gb, a.width)
    state_gb = layers * width * width * 12 / 1e9
    out["state_gb"] = state_gb
    say(f"model: {layers} x Linear({width},{width}), state (weights + Adam) {state_gb:.2f} GB")

    # disk and copy floors
    probe = os.path.join(a.dir, "raw.bin")
    nbytes = int(state_gb * 1e9)
    w_s = raw_write(probe, nbytes)
    r_s = raw_read(probe)
    out["raw_write_fsync_gbps"] = nbytes / w_s / 1e9
    out["raw_read_cold_gbps"] = nbytes / r_s / 1e9
    say(f"raw write+fsync {out['raw_write_fsync_gbps']:.2f} GB/s, raw read (evicted) {out['raw_read_cold_gbps']:.2f} GB/s")
    os.remove(probe)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=DEV)
    dst = torch.empty(nbytes // 4, dtype=torch.float32, pin_memory=DEV == "cuda")
    dst.copy_(src, non_blocking=True)
    sync()
    t0 = time.perf_counter()
    dst.copy_(src, non_blocking=True)
    sync()
    out["pinned_d2h_s"] = time.perf_counter() - t0
    say(f"pinned device-to-host copy of {state_gb:.2f} GB: {out['pinned_d2h_s']:.3f}s (the floor)")
    del src, dst
    if DEV == "cuda":
        torch.cuda.empty_cache()

    # step time -> interval long enough for a background write to finish
    torch.manual_seed(0)
    m = Big().to(DEV)
    opt = torch.optim.Adam(m.parameters(), lr=1e-6, foreach=True)
    x = torch.randn(a.batch, width, device=DEV)
    for i in range(6):
        if i == 3:
            sync()
            t0 = time.perf_counter()
        m(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    sync()
    step_s = (time.perf_counter() - t0) / 3
    del m, opt, x
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
    write_s = state_gb / out["raw_write_fsync_gbps"]
    every = max(5, math.ceil(1.3 * write_s / step_s))
    saves = 2
    steps = every * (saves + 1) - 1  # the last save has time to finish before fit ends
    out.update({"step_s": step_s, "every": every, "steps": steps})
    say(f"step {step_s * 1e3:.1f} ms; save every {every} steps ({every * step_s:.1f}s), {steps} steps per variant")

    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    def lightning_cbs(d):
        return [ModelCheckpoint(dirpath=d, every_n_train_steps=every, save_top_k=-1, save_last=False)], None

    def ours_cbs(d):
        return [PeriodicCheckpoint(d, every_n_train_steps=every, async_save=True, save_on_train_end=False)], None

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(a.dir, 'pg_store')}", rank=0, world_size=1)

    class DCPAsync(Callback):
        def __init__(self, d):
            self.d, self.resp, self.staging = d, None, None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.staging is not None:  # the state must not change before staging finished
                self.staging.result()
                self.staging = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step % every:
                return
            if self.resp is not None:
                self.resp.result()
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            sd = {"model": pl_module.state_dict(), "optim": trainer.optimizers[0].state_dict()}
            cuda = DEV == "cuda"
            stager = DefaultStager(StagingOptions(cuda, cuda, True, cuda))
            r = dcp.async_save(sd, checkpoint_id=os.path.join(self.d, f"step{trainer.global_step}"), async_stager=stager)
            if hasattr(r, "upload_completion"):
                self.staging, self.resp = r.staging_completion, r.upload_completion
            else:
                self.resp = r

        def finish(self):
            if self.resp is not None:
                self.resp.result()

    def dcp_cbs(d):
        cb = DCPAsync(d)
        return [cb], cb.finish

    variants = [
        ("none", lambda d: ([], None), None),  # baseline: Lightning's own end-of-fit work (teardown moves state to CPU)
        ("ours_async", ours_cbs, None),
        ("dcp_async", dcp_cbs, None),
        ("lightning", lightning_cbs, None),
        ("lightning_async", lightning_cbs, lambda: [AsyncCheckpointIO()]),
    ]
    skip = set(filter(None, a.skip.split(",")))
    results = {}
    for name, fn, plugins in variants:
        if name in skip:
            continue
        try:
            results[name] = run_variant(name, Big, width, a.batch, steps, every, a.dir, fn, plugins() if plugins else None)
        except Exception as e:  # keep going: report what failed
            say(f"{name} FAILED: {e!r}")
            results[name] = {"error": repr(e)}
    out["variants"] = results
    base_tail = results.get("none", {}).get("end_of_fit_s")
    if base_tail is not None:
        for name, r in results.items():
            if name != "none" and "error" not in r:
                r["end_of_fit_wait_s"] = max(0.0, r["end_of_fit_s"] - base_tail)
                r["lost_per_ckpt_s"] = (r["excess_s"] + r["end_of_fit_wait_s"]) / r["saves"]
                say(f"{name:16s} lost/ckpt net of the no-checkpoint run's end-of-fit {base_tail:.2f}s: {r['lost_per_ckpt_s']:.3f}s "
                    f"= steady-state {r['steady_stall_per_ckpt_s']:.3f}s/save + end-of-fit wait {r['end_of_fit_wait_s']:.2f}s "
                    f"/ {r['saves']} saves")
    if "extras" in skip:
        _summary(out, results, None, a.json)
        return

    # host memory over 10 saves and restore onto the GPU
    from lightning_ckpt import CheckpointWriter

    torch.manual_seed(0)
    m = Big().to(DEV)
    opt = torch.optim.Adam(m.parameters(), lr=1e-6, foreach=True)
    x = torch.randn(8, width, device=DEV)
    m(x).float().pow(2).mean().backward()
    opt.step()
    state = {"state_dict": m.state_dict(), "optimizer_states": [opt.state_dict()], "global_step": 1}
    wd = os.path.join(a.dir, "rss")
    shutil.rmtree(wd, ignore_errors=True)
    w = CheckpointWriter(wd, async_save=True, fsync=False)
    rss = []
    stalls = []
    for i in range(10):
        h = w.save(state, step=i + 1)
        stalls.append(h.snapshot_s)
        w.wait()
        for e in os.listdir(wd):  # keep only the newest on disk
            p = os.path.join(wd, e)
            if os.path.isdir(p) and e != f"step={i + 1:06d}":
                shutil.rmtree(p, ignore_errors=True)
        rss.append(rss_gb())
    out["rss_over_10_saves_gb"] = rss
    out["snapshot_stall_s"] = stalls
    say(f"host RSS over 10 saves (GB): {' '.join(f'{r:.2f}' for r in rss)}; snapshot stall per save: "
        f"first {stalls[0]:.3f}s, then median {statistics.median(stalls[1:]):.3f}s")
    w.close()
    # a durable copy for the restore
    w = CheckpointWriter(os.path.join(a.dir, "restore"), async_save=False)
    t0 = time.perf_counter()
    w.save(state, step=1)
    w.close()
    out["ours_sync_save_gbps"] = state_gb / (time.perf_counter() - t0)
    shutil.rmtree(wd, ignore_errors=True)
    del state, m, opt
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
    path = latest_checkpoint(os.path.join(a.dir, "restore"), verify=False)
    total = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    evict(path)
    t0 = time.perf_counter()
    ck = load_checkpoint(path, map_location=DEV)
    sync()
    ours_s = time.perf_counter() - t0
    del ck
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
    # raw read of the same bytes, same cache state
    evict(path)
    buf = bytearray(1 << 26)
    mv = memoryview(buf)
    t0 = time.perf_counter()
    for f in sorted(os.listdir(path)):
        with open(os.path.join(path, f), "rb", buffering=0) as fh:
            while fh.readinto(mv):
                pass
    raw_s = time.perf_counter() - t0
    out["restore"] = {"bytes": total, "ours_to_gpu_s": ours_s, "raw_read_s": raw_s, "ratio": raw_s / ours_s}
    say(f"restore onto GPU {total / 1e9:.2f} GB: ours {ours_s:.2f}s ({total / ours_s / 1e9:.2f} GB/s) vs raw read "
        f"{raw_s:.2f}s ({total / raw_s / 1e9:.2f} GB/s): {raw_s / ours_s:.2f}x of raw (target >= 0.95x)")
    shutil.rmtree(os.path.join(a.dir, "restore"), ignore_errors=True)

    _summary(out, results, rss, a.json)
    say("done")


def _summary(out, results, rss, json_path) -> None:
    state_gb = out["state_gb"]
    base = results.get("lightning", {}).get("lost_per_ckpt_s")
    print("\n== summary (" + out["gpu"] + f", {state_gb:.2f} GB state) ==")
    print(f"{'variant':16s} {'lost/ckpt s':>12s} {'vs Lightning':>13s} {'steady stall/save s':>20s} "
          f"{'end-of-fit wait s':>18s} {'GPU mem growth GB':>18s}")
    for name, r in results.items():
        if name == "none":
            continue
        if "error" in r:
            print(f"{name:16s} {'error':>12s}")
            continue
        ratio = f"{r['lost_per_ckpt_s'] / base:.3f}x" if base else "-"
        eof = r.get("end_of_fit_wait_s", r["end_of_fit_s"])
        print(f"{name:16s} {r['lost_per_ckpt_s']:12.3f} {ratio:>13s} {r['steady_stall_per_ckpt_s']:20.3f} {eof:18.2f} "
              f"{r['gpu_mem_growth_gb']:18.3f}")
    print("(steady stall/save: step-time excess over the median step, per save, while training runs; end-of-fit wait: "
          "last step's end -> fit returned, beyond a fit without checkpoints)")
    print(f"pinned D2H floor {out['pinned_d2h_s']:.3f}s")
    if rss:
        print(f"restore {out['restore']['ratio']:.2f}x raw read; host RSS min/max over 10 saves {min(rss):.2f}/{max(rss):.2f} GB")
    out["wall_s"] = time.perf_counter() - T_START
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
