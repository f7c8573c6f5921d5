#!/usr/bin/env python
"""Foundation benchmark of lightning_ckpt against PyTorch Lightning's own checkpointing and raw file I/O.

Measures, in one run on one disk (ratios are only ever taken between numbers of the same run):

1. Training time lost per checkpoint: (fit wall time with checkpoints - fit wall time without) / checkpoints, for
   (a) Lightning ``ModelCheckpoint`` with the default ``TorchCheckpointIO``, (b) the same with
   ``AsyncCheckpointIO``, (c) ``PeriodicCheckpoint(async_save=False)``, (d) ``PeriodicCheckpoint(async_save=True)``.
   The fit time includes waiting for outstanding background saves (ours waits in ``on_train_end``, Lightning's
   ``AsyncCheckpointIO`` in teardown, both inside ``Trainer.fit``); it is also reported apart (steady-state loss
   until ``on_train_end``, end-of-fit wait after it), with a breakdown of where our saves' time goes. A raw write +
   fsync (after each ours_sync fit) and an ``O_DIRECT`` raw write (after each ours_async fit) of the same bytes are
   the references of the sync save and of the end-of-fit wait. Fits during which other processes used more than
   0.25 cores are run again (``--retries``).
2. Durable save throughput of the same state (model + Adam state): ``CheckpointWriter(async_save=False)`` vs the
   same number of bytes written raw with ``os.write`` + ``fsync``, with ``O_DIRECT`` + ``fsync``, and
   ``torch.save`` + ``fsync``.
3. Restore: ``load_checkpoint`` and a ``Trainer.fit(..., ckpt_path=...)`` resume vs reading the same bytes raw
   (``readinto`` a preallocated buffer), with the page cache dropped before every read where possible.

No pass/fail: it prints the numbers, the ratios and the targets. Usage (from the repository root)::

    python benchmarks/bench_foundation.py              # ~0.8 GB of state, a few minutes
    python benchmarks/bench_foundation.py --gb 0.1     # quick run, well under a minute
    python benchmarks/bench_foundation.py --json out.json --dir /mnt/nvme/tmp
    python benchmarks/bench_foundation.py --workload compute   # compute-bound training (issue 14)

Two workloads: ``default`` (training leaves the cores partly idle) and ``compute`` (4 x ``Linear(4096, 4096)`` +
Adam, batch 4, 0.81 GB of state: training keeps every core busy). ``LIGHTNING_CKPT_DIRECT_IO=0`` measures the package
without ``O_DIRECT`` writes.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import lightning_ckpt  # noqa: F401
except ImportError:
    sys.path.insert(0, ROOT)

import lightning  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins.io import AsyncCheckpointIO  # noqa: E402

import lightning_ckpt  # noqa: E402
from lightning_ckpt import CheckpointWriter, PeriodicCheckpoint, load_checkpoint  # noqa: E402
from lightning_ckpt.demo import DemoDataModule, DemoModel  # noqa: E402

IN_FEATURES = 512
OUT_FEATURES = 512

# the compute-bound workload (issue 14): training uses every core, so background work competes with it
COMPUTE_HPARAMS = dict(in_features=4096, hidden=4096, out_features=4096, layers=3, dropout=0.1, lr=1e-4)
WORKLOADS = {
    "default": {"hparams": None, "args": {"ckpts": 4, "every": 8, "batch": 64, "fit_repeats": 1}},
    "compute": {"hparams": COMPUTE_HPARAMS, "args": {"ckpts": 3, "every": 4, "batch": 4, "fit_repeats": 3}},
}

TARGETS = {
    "train_ours_async_vs_lightning": ("<=", 0.25),
    "train_ours_async_vs_ours_sync": ("<=", 1.0),
    "train_raw_vs_ours_sync": (">=", 0.9),
    "end_of_fit_vs_disk": ("<=", 1.1),
    "save_ours_vs_raw": (">=", 0.9),
    "save_ours_vs_torch_save": (">=", 1.3),
    "restore_load_vs_raw": (">=", 0.95),
    "restore_fit_vs_raw": (">=", 0.95),
}


# --------------------------------------------------------------------------------------------- helpers
def quiet() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_ckpt", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def log(msg: str = "") -> None:
    print(msg, flush=True)


def gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB"


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


class ForeignLoad:
    """CPU used by *other* processes (in cores) over a window: busy time from /proc/stat minus this process's
    CPU time. This machine may be shared (tests running next to the benchmark); such load skews every timing."""

    _tck = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @classmethod
    def _busy_s(cls) -> Optional[float]:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return (sum(v[:8]) - idle) / cls._tck

    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.busy = self._busy_s()
        tm = os.times()
        self.own = tm.user + tm.system

    def cores(self) -> float:
        busy = self._busy_s()
        if busy is None or self.busy is None:
            return float("nan")
        tm = os.times()
        dt = max(1e-6, time.perf_counter() - self.t)
        return max(0.0, ((busy - self.busy) - (tm.user + tm.system - self.own)) / dt)


LOAD_SEEN: list[float] = []
DISCARDED: list[dict] = []  # the fits run again, with the load seen during them
RETRY_ABOVE_CORES = 0.25  # a fit during which other processes used more CPU than this is run again (--retries)
_QUIET_BUDGET = [0.0]


def wait_quiet(threshold: float = 0.25) -> float:
    """Wait (from the --wait-idle budget) until other processes use under ``threshold`` cores. Returns the last
    sampled foreign load."""
    if _QUIET_BUDGET[0] <= 0:
        return float("nan")
    while True:
        m = ForeignLoad()
        time.sleep(0.5)
        load = m.cores()
        _QUIET_BUDGET[0] -= 0.5
        if not (load >= threshold) or _QUIET_BUDGET[0] <= 0:
            return load


def drop_page_cache(paths: list[str]) -> str:
    """Evict ``paths`` from the page cache. Returns how: 'cold (drop_caches)', 'cold (fadvise)' or 'warm'."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "cold (drop_caches)"
    except OSError:
        pass
    ok = hasattr(os, "posix_fadvise")
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            ok = False
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except (OSError, AttributeError):
            ok = False
        finally:
            os.close(fd)
    return "cold (fadvise)" if ok else "warm"


def files_under(path: str) -> list[str]:
    out = []
    for dp, _, fns in os.walk(path):
        out += [os.path.join(dp, f) for f in sorted(fns)]
    return sorted(out)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def iter_tensors(x: Any):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from iter_tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from iter_tensors(v)


def machine_facts(args: argparse.Namespace) -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = round(int(line.split()[1]) * 1024 / 2**30, 1)
    except OSError:
        pass
    fs = None
    try:
        best = ""
        d = os.path.realpath(args.dir)
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, typ = line.split()[:3]
                if (d == mnt or d.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fs = mnt, f"{typ} on {dev} mounted at {mnt}"
    except OSError:
        pass
    try:
        from lightning_ckpt.format.checksum import hardware_accelerated

        crc_hw = hardware_accelerated()
    except Exception:  # noqa: BLE001
        crc_hw = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "mem_gib": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "lightning_ckpt": lightning_ckpt.__version__,
        "platform": platform.platform(),
        "bench_dir": os.path.realpath(args.dir),
        "filesystem": fs,
        "crc32c_hardware": crc_hw,
    }


def prefault(gib: float) -> float:
    """Touch ``gib`` GiB of fresh memory, all at once, then free it. On VMs whose guest memory is backed lazily
    (firecracker, ...), the first touch of a physical page costs several times a later one; without this the
    variant that happens to run first pays for it. Returns the seconds it took."""
    t0 = time.perf_counter()
    chunks = []
    try:
        for _ in range(int(gib)):
            chunks.append(torch.ones(1 << 30, dtype=torch.uint8))
    except RuntimeError:
        pass
    del chunks
    gc.collect()
    return time.perf_counter() - t0


def mem_available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def model_hparams(target_gb: float, layers: int) -> dict:
    """An MLP whose full training state (weights + Adam exp_avg + exp_avg_sq, fp32) is about ``target_gb``."""
    params = target_gb * 1e9 / 12.0
    # params = IN*H + H + (layers-1)*(H*H + H) + H*OUT + OUT
    a = layers - 1
    b = IN_FEATURES + OUT_FEATURES + layers
    c = OUT_FEATURES - params
    h = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a) if a > 0 else -c / b
    hidden = max(64, int(round(h / 64)) * 64)
    return dict(in_features=IN_FEATURES, hidden=hidden, out_features=OUT_FEATURES, layers=layers, dropout=0.1, lr=1e-4)


def make_model(hp: dict, seed: int = 0) -> DemoModel:
    torch.manual_seed(seed)
    return DemoModel(**hp)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------------------------- 1. training
class StepClock(Callback):
    """Wall time between consecutive ``on_train_batch_start`` calls (includes the saves of the previous step), plus
    the time of the restore phase (end of ``setup`` to ``on_train_start``)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.t_setup: Optional[float] = None
        self.t_train_start: Optional[float] = None
        self.t_train_end: Optional[float] = None

    def setup(self, trainer, pl_module, stage):  # noqa: D102
        self.t_setup = time.perf_counter()

    def on_train_start(self, trainer, pl_module):  # noqa: D102
        self.t_train_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: D102
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):  # noqa: D102
        self.t_train_end = time.perf_counter()

    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]

    def setup_to_train_start(self) -> float:
        return (self.t_train_start or 0.0) - (self.t_setup or 0.0)


class RecordingCheckpoint(PeriodicCheckpoint):
    """``PeriodicCheckpoint`` that keeps what each save reported: the training stall of each save (the time the
    saving hook blocked training), each commit's time breakdown (``SaveResult.breakdown``), and how far the save in
    flight had got when training ended (``bytes_done`` of its job)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.results: list = []
        self.stalls: list[float] = []
        self.at_train_end: dict = {}

    def setup(self, trainer, pl_module, stage):  # noqa: D102
        super().setup(trainer, pl_module, stage)
        if self._session is not None:
            self._session.writer.on_commit.append(self.results.append)

    def _recorded(self, hook, *args):
        s = self._session
        before = (s.last_saved_step, s.last_save_time) if s is not None else None
        hook(*args)
        if s is not None and (s.last_saved_step, s.last_save_time) != before and s.last_stall_s is not None:
            self.stalls.append(s.last_stall_s)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
        self._recorded(super().on_train_batch_end, trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer, pl_module):  # noqa: D102 (a save on an epoch's last batch is taken here)
        self._recorded(super().on_train_epoch_end, trainer, pl_module)

    def on_train_end(self, trainer, pl_module):  # noqa: D102
        s = self._session
        p = s.writer.pending if s is not None else None
        if p is not None:
            done, total = p.progress()
            self.at_train_end = {"pending_step": p.step, "bytes_done": done, "bytes_total": total}
        super().on_train_end(trainer, pl_module)


def trainer_kwargs(root: str, max_steps: int) -> dict:
    return dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=root,
    )


VARIANTS = {
    "lightning": "(a) Lightning ModelCheckpoint, TorchCheckpointIO",
    "lightning_async": "(b) Lightning ModelCheckpoint + AsyncCheckpointIO",
    "ours_sync": "(c) ours PeriodicCheckpoint(async_save=False)",
    "ours_async": "(d) ours PeriodicCheckpoint(async_save=True)",
}


def run_fit(variant: str, hp: dict, args, base: str, max_steps: int, every: int) -> dict:
    """One timed ``Trainer.fit``. Returns wall time, checkpoints written and step intervals."""
    d = tempfile.mkdtemp(prefix=f"{variant}-", dir=base)
    ckdir = os.path.join(d, "ckpts")
    model = make_model(hp)
    dm = DemoDataModule(n_train=args.batch * max_steps, n_val=args.batch, batch_size=args.batch,
                        in_features=hp["in_features"], out_features=hp["out_features"])
    clock = StepClock()
    callbacks: list[Callback] = [clock]
    plugins: list = []
    if variant == "none":
        kw = dict(enable_checkpointing=False)
    elif variant in ("lightning", "lightning_async"):
        callbacks.append(ModelCheckpoint(dirpath=ckdir, every_n_train_steps=every, save_top_k=-1, save_last=False,
                                         filename="{step}"))
        kw = {}
        if variant == "lightning_async":
            plugins.append(AsyncCheckpointIO())
    elif variant in ("ours_sync", "ours_async"):
        rec = RecordingCheckpoint(ckdir, every_n_train_steps=every, async_save=(variant == "ours_async"),
                                  save_on_train_end=False)
        callbacks.append(rec)
        kw = {}
    else:
        raise ValueError(variant)
    trainer = pl.Trainer(callbacks=callbacks, plugins=plugins or None, **trainer_kwargs(d, max_steps), **kw)
    if variant.startswith("ours"):
        extra = [type(c).__name__ for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
        if extra:
            log(f"  WARNING: Lightning added {extra} next to PeriodicCheckpoint; the comparison is unfair")
    gc.collect()
    os.sync()
    wait_quiet()
    meter = ForeignLoad()
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    trainer.strategy.checkpoint_io.teardown()  # no-op if fit already tore down (it does); waits for async IO
    t_end = time.perf_counter()
    wall = t_end - t0
    # training ends at on_train_end (the clock's hook runs before any checkpoint callback's: Lightning puts those
    # last); what follows until fit returns is the end-of-fit wait (ours: the last save's write and commit)
    train_s = (clock.t_train_end or t_end) - t0
    foreign = meter.cores()
    LOAD_SEEN.append(foreign)
    # durability debt: bytes the fit left dirty in the page cache (Lightning does not fsync)
    t1 = time.perf_counter()
    os.sync()
    sync_after = time.perf_counter() - t1
    if variant.startswith("lightning"):
        ckpts = [os.path.join(ckdir, f) for f in os.listdir(ckdir) if f.endswith(".ckpt")] if os.path.isdir(ckdir) else []
    elif variant.startswith("ours"):
        ckpts = [p for p in (os.path.join(ckdir, e) for e in os.listdir(ckdir)) if os.path.isfile(os.path.join(p, "manifest.json"))]
    else:
        ckpts = []
    ckpts.sort(key=os.path.getmtime)  # oldest first; names do not sort by step ("step=8" > "step=32")
    stray = [f for f in files_under(d) if f.endswith(".ckpt") and not f.startswith(ckdir)]
    if stray:
        log(f"  WARNING: {variant}: unexpected .ckpt files {stray}")
    res = {"variant": variant, "wall_s": wall, "train_s": train_s, "end_of_fit_s": wall - train_s, "ckpts": ckpts,
           "n_ckpts": len(ckpts), "intervals": clock.intervals(), "sync_after_s": sync_after, "dir": d,
           "foreign_cores": foreign, "global_step": int(trainer.global_step)}
    rec = next((c for c in callbacks if isinstance(c, RecordingCheckpoint)), None)
    if rec is not None:
        res["stalls_s"] = list(rec.stalls)
        res["breakdowns"] = [dict(r.breakdown, write_s=r.write_s, bytes=r.bytes) for r in rec.results]
        res["at_train_end"] = dict(rec.at_train_end)
    del trainer, model, dm, callbacks, plugins
    gc.collect()
    return res


BREAKDOWN = ("stall_s", "snapshot_s", "write_phase_s", "write_syscalls_s", "fsync_s", "checksum_s", "commit_s",
             "write_s")


def save_breakdown(runs: list[dict]) -> dict:
    """Median over every save of every round of each time of the save breakdown (``SaveResult.breakdown``), plus the
    training stall of each save (how long its hook blocked training)."""
    out: dict[str, float] = {}
    stalls = [s for x in runs for s in x.get("stalls_s", [])]
    if stalls:
        out["stall_s"] = median(stalls)
    for key in BREAKDOWN[1:]:
        vals = [b[key] for x in runs for b in x.get("breakdowns", []) if b.get(key) is not None]
        if vals:
            out[key] = median(vals)
    sizes = [b.get("bytes_written") or b.get("bytes") for x in runs for b in x.get("breakdowns", [])]
    if sizes:
        out["bytes"] = median([float(v) for v in sizes if v])
    ends = [x.get("at_train_end") for x in runs if x.get("at_train_end")]
    if ends:
        out["left_at_train_end_bytes"] = median([float(e["bytes_total"] - e["bytes_done"]) for e in ends
                                                 if e.get("bytes_total")] or [float("nan")])
    return out


def bench_training(hp: dict, args, base: str) -> tuple[dict, dict]:
    every, n = args.every, args.ckpts
    max_steps = every * n
    log(f"\n== 1. Training time lost per checkpoint  ({max_steps} steps, checkpoint every {every} steps -> {n} "
        f"checkpoints, batch {args.batch}, {args.fit_repeats} round(s) in rotated order, os.sync before each fit)")
    # warm-up: first Trainer/fit in a process pays one-time costs (imports, thread pools, allocator)
    w = run_fit("none", hp, args, base, max(2, min(every, 4)), every)
    shutil.rmtree(w["dir"], ignore_errors=True)
    order = ["none", "lightning", "lightning_async", "ours_sync", "ours_async"]
    runs: dict[str, list[dict]] = {k: [] for k in order}
    keep: dict[str, str] = {}
    # the raw reference for the sync save, measured next to each ours_sync fit: this disk's speed drifts over minutes
    # (burst budgets), so section 2's figure, taken minutes later, is not the speed the fits met
    raw_state = build_state(hp)
    raw_nbytes = sum(t.numel() * t.element_size() for t in iter_tensors(raw_state))
    raw_times: list[float] = []
    raw_aligned = None
    direct_times: list[float] = []
    for r in range(args.fit_repeats):
        seq = order[r % len(order):] + order[: r % len(order)]  # rotated: no variant always follows the same one
        for v in seq:
            for attempt in range(1 + args.retries):
                res = run_fit(v, hp, args, base, max_steps, every)
                med_int = median(res["intervals"]) if res["intervals"] else float("nan")
                log(f"  {v:16s} round {r + 1}: fit {res['wall_s']:7.2f}s (end-of-fit {res['end_of_fit_s']:5.2f}s)  ckpts "
                    f"{res['n_ckpts']}  median step {med_int:.3f}s  os.sync after fit {res['sync_after_s']:.2f}s  outside "
                    f"{res['foreign_cores']:.2f} cores")
                if not res["foreign_cores"] > RETRY_ABOVE_CORES or attempt == args.retries:
                    break
                # another process took CPU during this fit: its time says nothing about ours; run it again
                log(f"  {'':16s} (other processes used {res['foreign_cores']:.2f} cores: discarded, run again)")
                LOAD_SEEN.remove(res["foreign_cores"])
                DISCARDED.append({"variant": v, "round": r + 1, "wall_s": res["wall_s"],
                                  "foreign_cores": res["foreign_cores"]})
                shutil.rmtree(res["dir"], ignore_errors=True)
            runs[v].append(res)
            if v == "ours_sync":
                rd = tempfile.mkdtemp(prefix="raw-", dir=base)
                os.sync()
                wait_quiet()
                dt, _ = save_raw(raw_state, rd, raw_nbytes)
                shutil.rmtree(rd, ignore_errors=True)
                raw_times.append(dt)
                log(f"  {'raw write+fsync':16s} round {r + 1}: {dt:.2f}s for {gb(raw_nbytes)} (right after ours_sync)")
            if v == "ours_async":  # the disk's own speed (O_DIRECT) next to the async fits: the end-of-fit reference
                if raw_aligned is None:
                    raw_aligned = aligned_copy(raw_state, raw_nbytes)
                rd = tempfile.mkdtemp(prefix="raw-", dir=base)
                os.sync()
                wait_quiet()
                dt, _ = save_raw_direct(raw_aligned, rd, raw_nbytes)
                shutil.rmtree(rd, ignore_errors=True)
                direct_times.append(dt)
                log(f"  {'raw O_DIRECT':16s} round {r + 1}: {dt:.2f}s for {gb(raw_nbytes)} (right after ours_async)")
            if v != "none" and res["n_ckpts"] != n:
                log(f"  WARNING: {v} wrote {res['n_ckpts']} checkpoints, expected {n}")
            # keep the last checkpoint of the last round for the restore section; free the rest
            if v in ("ours_async", "lightning") and res["ckpts"]:
                if v in keep:
                    shutil.rmtree(os.path.dirname(os.path.dirname(keep[v])), ignore_errors=True)
                keep[v] = res["ckpts"][-1]
                for p in res["ckpts"][:-1]:
                    shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.unlink(p)
            else:
                shutil.rmtree(res["dir"], ignore_errors=True)
    # baseline: one extra no-checkpoint fit at the end, so drift over the run is averaged out
    res = run_fit("none", hp, args, base, max_steps, every)
    runs["none"].append(res)
    log(f"  {'none':16s} final  : fit {res['wall_s']:7.2f}s")
    shutil.rmtree(res["dir"], ignore_errors=True)

    del raw_state, raw_aligned
    gc.collect()
    base_wall = median([x["wall_s"] for x in runs["none"]])
    base_train = median([x["train_s"] for x in runs["none"]])
    base_end = median([x["end_of_fit_s"] for x in runs["none"]])
    base_step = median([i for x in runs["none"] for i in x["intervals"]])
    out: dict[str, Any] = {"steps": max_steps, "every_n_train_steps": every, "checkpoints": n, "batch": args.batch,
                           "rounds": args.fit_repeats, "fit_no_ckpt_s": base_wall,
                           "fit_no_ckpt_all_s": [x["wall_s"] for x in runs["none"]],
                           "end_of_fit_no_ckpt_s": base_end, "median_step_s": base_step, "variants": {},
                           "raw_write_fsync_s": median(raw_times), "raw_write_fsync_all_s": raw_times,
                           "raw_write_fsync_bytes": raw_nbytes, "raw_direct_s": median(direct_times),
                           "raw_direct_all_s": direct_times}
    for v in order[1:]:
        wall = median([x["wall_s"] for x in runs[v]])
        k = max(1, runs[v][-1]["n_ckpts"])
        # stall estimate from step intervals: excess of each step over the no-checkpoint median step
        excess = median([sum(i - base_step for i in x["intervals"]) for x in runs[v]]) / k
        out["variants"][v] = {
            "fit_s": wall,
            "fit_all_s": [x["wall_s"] for x in runs[v]],
            "lost_per_ckpt_s": (wall - base_wall) / k,
            # until training ended (every save's stall and the background work's interference) ...
            "steady_per_ckpt_s": (median([x["train_s"] for x in runs[v]]) - base_train) / k,
            # ... and after: the wait at the end of fit for the last save (beyond a fit without checkpoints)
            "end_of_fit_wait_s": median([x["end_of_fit_s"] for x in runs[v]]) - base_end,
            "end_of_fit_all_s": [x["end_of_fit_s"] for x in runs[v]],
            "step_excess_per_ckpt_s": excess,
            "max_step_s": max(max(x["intervals"] or [0.0]) for x in runs[v]),
            "sync_after_fit_s": median([x["sync_after_s"] for x in runs[v]]),
            "n_ckpts": k,
            "foreign_cores": max(x["foreign_cores"] for x in runs[v]),
        }
        if v.startswith("ours"):
            out["variants"][v]["breakdown"] = save_breakdown(runs[v])
    ref = out["variants"]["lightning"]["lost_per_ckpt_s"]
    log("")
    log(f"  no checkpoints: fit {base_wall:.2f}s (median of {len(runs['none'])}), median step {base_step * 1000:.0f} ms, "
        f"end of fit {base_end:.2f}s")
    log(f"  {'variant':52s} {'fit s':>7s} {'lost/ckpt s':>11s} {'x Lightning':>11s} {'steady/ckpt s':>13s} "
        f"{'end-of-fit s':>12s} {'max step s':>10s} {'os.sync after':>13s}")
    for v, label in VARIANTS.items():
        r = out["variants"][v]
        ratio = r["lost_per_ckpt_s"] / ref if ref > 0 else float("nan")  # nan: Lightning lost nothing measurable
        r["ratio_vs_lightning"] = ratio
        log(f"  {label:52s} {r['fit_s']:7.2f} {r['lost_per_ckpt_s']:11.3f} {ratio:10.2f}x {r['steady_per_ckpt_s']:13.3f} "
            f"{r['end_of_fit_wait_s']:12.2f} {r['max_step_s']:10.2f} {r['sync_after_fit_s']:12.2f}s")
    log("  (lost/ckpt: fit-time difference per checkpoint = steady/ckpt + end-of-fit / checkpoints; steady: until "
        "training ended (on_train_end);\n   end-of-fit: from then until fit returned, beyond a fit without "
        "checkpoints; os.sync after: time to flush what the fit left un-durable in the page cache;\n   Lightning's "
        "TorchCheckpointIO does not fsync, ours does before commit)")
    log("\n  where the time of our saves goes (median per save, seconds; stall = training blocked in the saving hook):")
    log(f"  {'variant':10s} " + " ".join(f"{k[:-2]:>13s}" for k in BREAKDOWN) + f" {'GB':>6s} {'left at end GB':>14s}")
    for v in ("ours_sync", "ours_async"):
        b = out["variants"][v]["breakdown"]
        log(f"  {v:10s} " + " ".join(f"{b.get(k, float('nan')):13.3f}" for k in BREAKDOWN)
            + f" {b.get('bytes', float('nan')) / 1e9:6.3f} {b.get('left_at_train_end_bytes', float('nan')) / 1e9:14.3f}")
    log("  (snapshot: copy into host buffers (async) or state shaping (sync); write_phase: all files written and "
        "fsynced; write_syscalls / fsync: time in those calls;\n   checksum: CRC32C (+ content hash) CPU time, in a helper "
        "thread; commit: manifest, renames, latest.json; write: from the start of the write to the commit)")
    return out, keep


# --------------------------------------------------------------------------------------------- 2. save
def build_state(hp: dict) -> dict:
    """A Lightning-like checkpoint dict: model weights and Adam state after one optimizer step."""
    model = make_model(hp)
    opt = model.configure_optimizers()["optimizer"]
    x = torch.randn(8, hp["in_features"])
    loss = torch.nn.functional.mse_loss(model(x), torch.zeros(8, hp["out_features"]))
    loss.backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    state = {"epoch": 0, "global_step": 1, "pytorch-lightning_version": lightning.__version__,
             "state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()], "lr_schedulers": []}
    return state


def save_ours(state: dict, d: str, i: int) -> tuple[float, int]:
    w = CheckpointWriter(os.path.join(d, "ours"), async_save=False)
    try:
        t0 = time.perf_counter()
        w.save(state, step=i, epoch=0)
        res = w.wait()
        dt = time.perf_counter() - t0
    finally:
        w.close()
    return dt, int(res.bytes)


def save_raw(state: dict, d: str, nbytes: int) -> tuple[float, int]:
    """``nbytes`` written with os.write straight from the state's tensor memory (padded with zeros to the same
    count), then fsync of the file and of its folder."""
    views = [tensor_bytes(t) for t in iter_tensors(state)]
    path = os.path.join(d, "raw.bin")
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    left = nbytes
    try:
        for v in views:
            v = v[: min(len(v), left)]
            while len(v):
                k = os.write(fd, v[: 1 << 30])
                v = v[k:]
                left -= k
            if not left:
                break
        pad = memoryview(bytes(min(left, 1 << 20) if left else 0))
        while left:
            left -= os.write(fd, pad[: min(left, len(pad))])
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(d)
    return time.perf_counter() - t0, nbytes


def aligned_copy(state: dict, nbytes: int, align: int = 4096) -> memoryview:
    """The state's tensor bytes, back to back, in a page-aligned buffer of ``nbytes`` rounded up to ``align``."""
    n = (nbytes + align - 1) // align * align
    raw = torch.zeros(n + align, dtype=torch.uint8)
    off = (-raw.data_ptr()) % align
    mv = memoryview(raw.numpy()).cast("B")[off: off + n]
    pos = 0
    for t in iter_tensors(state):
        v = tensor_bytes(t)[: max(0, min(t.numel() * t.element_size(), nbytes - pos))]
        mv[pos: pos + len(v)] = v
        pos += len(v)
    return mv


def save_raw_direct(src: memoryview, d: str, nbytes: int) -> tuple[float, int]:
    """The disk's own speed: ``nbytes`` written with O_DIRECT (no page cache) from a page-aligned buffer in 8 MiB
    writes, then fsync of the file and of its folder. Falls back to a buffered write where O_DIRECT is refused."""
    path = os.path.join(d, "raw-direct.bin")
    t0 = time.perf_counter()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0), 0o644)
    except OSError:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pos, n = 0, len(src)
        while pos < n:
            pos += os.write(fd, src[pos: min(n, pos + (8 << 20))])
        os.ftruncate(fd, nbytes)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(d)
    return time.perf_counter() - t0, nbytes


def save_torch(state: dict, d: str) -> tuple[float, int]:
    path = os.path.join(d, "state.pt")
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(d)
    dt = time.perf_counter() - t0
    return dt, os.path.getsize(path)


def bench_save(hp: dict, args, base: str) -> dict:
    log(f"\n== 2. Durable save throughput  ({args.io_repeats} repeats each, order rotated, median)")
    state = build_state(hp)
    tbytes = sum(t.numel() * t.element_size() for t in iter_tensors(state))
    log(f"  state: {gb(tbytes)} of tensors (model + Adam exp_avg + exp_avg_sq)")
    # warm-up: first save pays one-time costs (DCP imports, git metadata, thread pools)
    d = tempfile.mkdtemp(prefix="save-warm-", dir=base)
    w = CheckpointWriter(d, async_save=False)
    w.save({"state_dict": {"w": torch.zeros(4)}}, step=0)
    w.close()
    shutil.rmtree(d, ignore_errors=True)

    nbytes_ref = None
    aligned = None
    methods = ["ours", "raw", "raw_direct", "torch_save"]
    times: dict[str, list[float]] = {m: [] for m in methods}
    sizes: dict[str, int] = {}
    for r in range(args.io_repeats):
        seq = methods[r % len(methods):] + methods[: r % len(methods)]
        if nbytes_ref is None and seq[0] != "ours":
            seq = ["ours"] + [m for m in seq if m != "ours"]  # raw needs ours' byte count
        for m in seq:
            d = tempfile.mkdtemp(prefix=f"save-{m}-", dir=base)
            os.sync()
            wait_quiet()
            meter = ForeignLoad()
            if m == "ours":
                dt, nb = save_ours(state, d, r)
                nbytes_ref = nb
            elif m == "raw":
                dt, nb = save_raw(state, d, nbytes_ref)
            elif m == "raw_direct":
                if aligned is None:
                    aligned = aligned_copy(state, nbytes_ref)
                dt, nb = save_raw_direct(aligned, d, nbytes_ref)
            else:
                dt, nb = save_torch(state, d)
            times[m].append(dt)
            sizes[m] = nb
            fl = meter.cores()
            LOAD_SEEN.append(fl)
            log(f"  {m:10s} repeat {r + 1}: {dt:6.2f}s  {nb / dt / 1e9:6.3f} GB/s  ({gb(nb)})  outside {fl:.2f} cores")
            shutil.rmtree(d, ignore_errors=True)
    del state, aligned
    gc.collect()
    out = {}
    for m in methods:
        t = median(times[m])
        out[m] = {"median_s": t, "bytes": sizes[m], "gbps": sizes[m] / t / 1e9, "all_s": times[m]}
    out["ratio_ours_vs_raw"] = out["ours"]["gbps"] / out["raw"]["gbps"]
    out["ratio_ours_vs_torch_save"] = out["ours"]["gbps"] / out["torch_save"]["gbps"]
    out["ratio_ours_vs_raw_direct"] = out["ours"]["gbps"] / out["raw_direct"]["gbps"]
    log("")
    log(f"  {'method':40s} {'median s':>9s} {'GB/s':>7s} {'ours / it':>10s}")
    labels = {"ours": "ours CheckpointWriter(sync) save+wait", "raw": "raw os.write + fsync (same bytes)",
              "raw_direct": "raw O_DIRECT write + fsync (the disk)", "torch_save": "torch.save + fsync"}
    for m in methods:
        ratio = out["ours"]["gbps"] / out[m]["gbps"]
        log(f"  {labels[m]:40s} {out[m]['median_s']:9.2f} {out[m]['gbps']:7.3f} {ratio:9.2f}x")
    return out


# --------------------------------------------------------------------------------------------- 3. restore
def read_raw(paths: list[str], buf: torch.Tensor) -> int:
    mv = tensor_bytes(buf)
    off = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            end = off + size
            while off < end:
                k = f.readinto(mv[off:end])
                if not k:
                    raise IOError(f"{p} ended early")
                off += k
    return off


def resume_fit(hp: dict, args, base: str, ckpt_path: Optional[str], max_steps: int, n_train_steps: int,
               ours: bool) -> tuple[float, float]:
    """A Trainer.fit doing (almost) no training. Returns (fit wall time, setup -> on_train_start time)."""
    d = tempfile.mkdtemp(prefix="resume-", dir=base)
    model = make_model(hp, seed=1)
    dm = DemoDataModule(n_train=args.batch * n_train_steps, n_val=args.batch, batch_size=args.batch,
                        in_features=hp["in_features"], out_features=hp["out_features"])
    clock = StepClock()
    callbacks: list[Callback] = [clock]
    kw: dict = {"enable_checkpointing": False}
    if ours:
        # what a user has in the trainer when resuming: the callback, which also installs the CheckpointIO that
        # reads our folders; it saves nothing here
        callbacks.append(PeriodicCheckpoint(os.path.join(d, "ckpts"), every_n_train_steps=10**9, async_save=False,
                                            save_on_train_end=False))
        kw = {}
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(d, max_steps), **kw)
    gc.collect()
    t0 = time.perf_counter()
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    wall = time.perf_counter() - t0
    restore = clock.setup_to_train_start()
    if ckpt_path is not None and int(trainer.global_step) != max_steps:
        log(f"  WARNING: resume ended at step {trainer.global_step}, expected {max_steps}")
    del trainer, model, dm, callbacks
    gc.collect()
    shutil.rmtree(d, ignore_errors=True)
    return wall, restore


def bench_restore(hp: dict, args, base: str, keep: dict, train_steps: int) -> dict:
    log(f"\n== 3. Restore  ({args.io_repeats} repeats each, order rotated, median; page cache dropped before each read)")
    for v in ("ours_async", "lightning"):
        if v not in keep:  # section 1 was skipped: make a real Lightning-run checkpoint of each kind
            res = run_fit(v, hp, args, base, train_steps, train_steps)
            keep[v] = res["ckpts"][-1]
    path = keep["ours_async"]
    paths = files_under(path)
    nbytes = sum(os.path.getsize(p) for p in paths)
    lpath = keep.get("lightning")
    saved_step = int(json.load(open(os.path.join(path, "manifest.json")))["step"])
    log(f"  checkpoint: {path}  ({len(paths)} files, {gb(nbytes)}, step {saved_step})")

    buf = torch.empty(nbytes, dtype=torch.uint8)
    buf.zero_()  # preallocated and faulted in: the raw read measures only the reads
    modes: set[str] = set()
    methods = ["raw", "load", "fit", "fit_base"] + (["fit_lightning"] if lpath else [])
    times: dict[str, list[float]] = {m: [] for m in methods}
    restore_times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.io_repeats):
        seq = methods[r % len(methods):] + methods[: r % len(methods)]
        for m in seq:
            wait_quiet()
            meter = ForeignLoad()
            if m == "raw":
                modes.add(drop_page_cache(paths))
                t0 = time.perf_counter()
                got = read_raw(paths, buf)
                dt = time.perf_counter() - t0
                assert got == nbytes
            elif m == "load":
                modes.add(drop_page_cache(paths))
                t0 = time.perf_counter()
                ck = load_checkpoint(path)
                dt = time.perf_counter() - t0
                del ck
                gc.collect()
            elif m == "fit":
                modes.add(drop_page_cache(paths))
                dt, rs = resume_fit(hp, args, base, path, saved_step + 1, train_steps, ours=True)
                restore_times[m].append(rs)
            elif m == "fit_lightning":
                modes.add(drop_page_cache([lpath]))
                dt, rs = resume_fit(hp, args, base, lpath, saved_step + 1, train_steps, ours=False)
                restore_times[m].append(rs)
            else:  # fit_base: same fit, no checkpoint, one training step
                dt, rs = resume_fit(hp, args, base, None, 1, train_steps, ours=True)
                restore_times[m].append(rs)
            times[m].append(dt)
            fl = meter.cores()
            LOAD_SEEN.append(fl)
            extra = f"  setup->train_start {restore_times[m][-1]:.2f}s" if restore_times[m] else ""
            log(f"  {m:13s} repeat {r + 1}: {dt:6.2f}s{extra}  outside {fl:.2f} cores")
    del buf
    gc.collect()
    mode = " + ".join(sorted(modes))
    raw_s = median(times["raw"])
    load_s = median(times["load"])
    fit_diff = median(times["fit"]) - median(times["fit_base"])
    fit_hook = median(restore_times["fit"]) - median(restore_times["fit_base"])
    out = {
        "cache": mode, "bytes": nbytes, "path": path,
        "raw_read_s": raw_s, "raw_read_gbps": nbytes / raw_s / 1e9,
        "load_checkpoint_s": load_s, "load_checkpoint_gbps": nbytes / load_s / 1e9,
        "fit_resume_s": median(times["fit"]), "fit_base_s": median(times["fit_base"]),
        "fit_restore_by_fit_diff_s": fit_diff, "fit_restore_by_hooks_s": fit_hook,
        "ratio_load_vs_raw": raw_s / load_s,
        "ratio_fit_vs_raw": raw_s / fit_hook if fit_hook > 0 else float("nan"),
        "ratio_fit_diff_vs_raw": raw_s / fit_diff if fit_diff > 0 else float("nan"),
        "all_s": times, "setup_to_train_start_all_s": restore_times,
    }
    if lpath:
        lf_hook = median(restore_times["fit_lightning"]) - median(restore_times["fit_base"])
        out["lightning_ckpt_bytes"] = os.path.getsize(lpath)
        out["lightning_fit_resume_s"] = median(times["fit_lightning"])
        out["lightning_fit_restore_by_hooks_s"] = lf_hook
        out["lightning_fit_restore_by_fit_diff_s"] = median(times["fit_lightning"]) - median(times["fit_base"])
    log("")
    log(f"  page cache: {mode}")
    log(f"  {'method':58s} {'seconds':>8s} {'GB/s':>7s} {'raw / it':>9s}")
    rows = [
        ("raw open + readinto preallocated buffer", raw_s),
        ("ours load_checkpoint (every byte CRC32C-verified)", load_s),
        ("ours Trainer.fit(ckpt_path) restore, by hooks", fit_hook),
        ("ours Trainer.fit(ckpt_path) restore, by fit-time diff", fit_diff),
    ]
    if lpath:
        rows += [("Lightning .ckpt Trainer.fit(ckpt_path) restore, by hooks*", out["lightning_fit_restore_by_hooks_s"]),
                 ("Lightning .ckpt Trainer.fit(ckpt_path) restore, by fit diff*", out["lightning_fit_restore_by_fit_diff_s"])]
    for label, s in rows:
        gbps = nbytes / s / 1e9 if s > 0 else float("nan")
        ratio = raw_s / s if s > 0 else float("nan")
        log(f"  {label:58s} {s:8.2f} {gbps:7.3f} {ratio:8.2f}x")
    log(f"  (fit restore 'by hooks' = (end of setup -> on_train_start) with ckpt_path minus the same without; "
        f"'by fit diff' = fit(max_steps={saved_step + 1}, ckpt_path) - fit(max_steps=1)."
        + ("\n   * informational: Lightning's own .ckpt from section 1 (torch.load), GB/s computed on our byte count)"
           if lpath else ")"))
    return out


# --------------------------------------------------------------------------------------------- main
def fmt_ratio(key: str, value: float) -> str:
    op, tgt = TARGETS[key]
    if value != value or value < 0:
        return f"{value:6.2f}x   (target {op} {tgt}x: not measurable in this run (noise), see the table above)"
    if LOAD_SEEN and max(LOAD_SEEN) > 0.25:
        ok = value <= tgt if op == "<=" else value >= tgt
        return f"{value:6.2f}x   (target {op} {tgt}x: {'met' if ok else 'NOT met'}, UNRELIABLE: machine was shared)"
    ok = value <= tgt if op == "<=" else value >= tgt
    return f"{value:6.2f}x   (target {op} {tgt}x: {'met' if ok else 'NOT met'})"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="default",
                   help="default: DemoModel sized by --gb, batch 64, training leaves the cores partly idle; compute: "
                        "4 x Linear(4096, 4096) + Adam, batch 4 (0.81 GB of state), training keeps both cores busy, "
                        "a save every 4 steps, 12 steps, 3 rounds")
    p.add_argument("--gb", type=float, default=0.8, help="full training state size in GB (weights + 2 Adam moments, fp32)")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="folder on the disk under test (a temp folder is made in it)")
    p.add_argument("--json", default=None, help="also write the results as JSON to this path")
    p.add_argument("--ckpts", type=int, default=None, help="checkpoints per training run (default: 4; compute: 3)")
    p.add_argument("--every", type=int, default=None, help="checkpoint every N training steps (default: 8; compute: 4)")
    p.add_argument("--batch", type=int, default=None, help="training batch size (default: 64; compute: 4)")
    p.add_argument("--layers", type=int, default=4, help="hidden layers of the MLP (default workload)")
    p.add_argument("--fit-repeats", type=int, default=None, help="rounds of the checkpointing fits (default: 1; compute: 3)")
    p.add_argument("--retries", type=int, default=2,
                   help=f"runs of a fit again (at most this many times) when other processes used more than "
                        f"{RETRY_ABOVE_CORES} cores during it")
    p.add_argument("--io-repeats", type=int, default=3, help="repeats of each save / restore measurement")
    p.add_argument("--prefault-gib", type=float, default=None,
                   help="GiB of memory to touch once before measuring (default: min(4 + 14 x gb, 70%% of available))")
    p.add_argument("--wait-idle", type=float, default=120.0,
                   help="seconds (in total) the benchmark may wait for other processes to go quiet before a measurement")
    p.add_argument("--only", default="train,save,restore", help="comma-separated subset of train,save,restore")
    args = p.parse_args(argv)
    for k, v in WORKLOADS[args.workload]["args"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.workload == "compute":
        TARGETS["train_ours_async_vs_lightning"] = ("<=", 0.5)
    quiet()
    sections = set(args.only.split(","))
    _QUIET_BUDGET[0] = args.wait_idle

    t_start = time.perf_counter()
    facts = machine_facts(args)
    hp = WORKLOADS[args.workload]["hparams"] or model_hparams(args.gb, args.layers)
    m = make_model(hp)
    P = n_params(m)
    del m
    state_gb = 3 * P * 4 / 1e9
    log("== lightning_ckpt foundation benchmark")
    for k, v in facts.items():
        log(f"  {k:16s} {v}")
    log(f"  model            DemoModel({', '.join(f'{k}={v}' for k, v in hp.items())})")
    log(f"  parameters       {P:,}  -> full state (weights + Adam exp_avg + exp_avg_sq) {state_gb:.3f} GB")

    pf = args.prefault_gib if args.prefault_gib is not None else min(4 + 14 * args.gb, 0.7 * mem_available_gib())
    if pf >= 1:
        log(f"  prefault        touched {int(pf)} GiB once in {prefault(pf):.1f}s (first-touch cost kept out of the timings)")
    base = tempfile.mkdtemp(prefix="lc-bench-", dir=args.dir)
    results: dict[str, Any] = {"machine": facts, "args": vars(args), "workload": args.workload,
                               "model": {"hparams": hp, "params": P, "state_gb": state_gb},
                               "loadavg_start": os.getloadavg()}
    log(f"  workload         {args.workload}; load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    try:
        keep: dict = {}
        train_steps = args.every * args.ckpts
        if "train" in sections:
            results["training"], keep = bench_training(hp, args, base)
        if "save" in sections:
            results["save"] = bench_save(hp, args, base)
        if "restore" in sections:
            results["restore"] = bench_restore(hp, args, base, keep, train_steps)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    summary: dict[str, Any] = {}
    if "training" in results:
        tr = results["training"]["variants"]
        summary["train_lost_per_ckpt_s"] = {v: round(tr[v]["lost_per_ckpt_s"], 4) for v in VARIANTS}
        summary["train_ours_async_vs_lightning"] = tr["ours_async"]["ratio_vs_lightning"]
        summary["train_ours_sync_vs_lightning"] = tr["ours_sync"]["ratio_vs_lightning"]
        summary["train_lightning_async_vs_lightning"] = tr["lightning_async"]["ratio_vs_lightning"]
        summary["train_steady_per_ckpt_s"] = {v: round(tr[v]["steady_per_ckpt_s"], 4) for v in VARIANTS}
        summary["train_end_of_fit_wait_s"] = {v: round(tr[v]["end_of_fit_wait_s"], 4) for v in VARIANTS}
        a, sy = tr["ours_async"]["lost_per_ckpt_s"], tr["ours_sync"]["lost_per_ckpt_s"]
        summary["train_ours_async_vs_ours_sync"] = a / sy if sy > 0 else float("nan")
    if "save" in results:
        s = results["save"]
        summary["save_gbps"] = {k: round(s[k]["gbps"], 4) for k in ("ours", "raw", "raw_direct", "torch_save")}
        summary["save_ours_vs_raw"] = s["ratio_ours_vs_raw"]
        summary["save_ours_vs_raw_direct"] = s["ratio_ours_vs_raw_direct"]
        summary["save_ours_vs_torch_save"] = s["ratio_ours_vs_torch_save"]
    if "training" in results:
        # raw write + fsync of the same bytes, measured next to the ours_sync fits (section 1)
        sy = tr["ours_sync"]["lost_per_ckpt_s"]
        summary["train_raw_s"] = results["training"]["raw_write_fsync_s"]
        summary["train_raw_vs_ours_sync"] = summary["train_raw_s"] / sy if sy > 0 else float("nan")
        # the end-of-fit wait against the time the disk needs (O_DIRECT raw rate measured next to the async fits)
        # for what was left to write of the last save when training ended
        b = tr["ours_async"].get("breakdown", {})
        left = b.get("left_at_train_end_bytes")
        if left is None or left != left:
            left = b.get("bytes", results["model"]["state_gb"] * 1e9)
        disk_s = left * results["training"]["raw_direct_s"] / results["training"]["raw_write_fsync_bytes"]
        summary["end_of_fit_left_bytes"] = left
        summary["end_of_fit_disk_s"] = disk_s
        summary["end_of_fit_vs_disk"] = tr["ours_async"]["end_of_fit_wait_s"] / disk_s if disk_s > 0 else float("nan")
    if "training" in results and "save" in results:
        raw_s = s["raw"]["median_s"] * results["model"]["state_gb"] * 1e9 / s["raw"]["bytes"]
        sy = tr["ours_sync"]["lost_per_ckpt_s"]
        summary["train_raw_section2_vs_ours_sync"] = raw_s / sy if sy > 0 else float("nan")
    if "restore" in results:
        r = results["restore"]
        summary["restore_cache"] = r["cache"]
        summary["restore_s"] = {"raw": round(r["raw_read_s"], 4), "load_checkpoint": round(r["load_checkpoint_s"], 4),
                                "fit_by_hooks": round(r["fit_restore_by_hooks_s"], 4),
                                "fit_by_fit_diff": round(r["fit_restore_by_fit_diff_s"], 4)}
        summary["restore_load_vs_raw"] = r["ratio_load_vs_raw"]
        summary["restore_fit_vs_raw"] = r["ratio_fit_vs_raw"]
        summary["restore_fit_diff_vs_raw"] = r["ratio_fit_diff_vs_raw"]
    summary["total_wall_s"] = time.perf_counter() - t_start
    summary["loadavg_end"] = os.getloadavg()
    summary["discarded_fits"] = list(DISCARDED)
    summary["max_foreign_load_cores"] = max(LOAD_SEEN) if LOAD_SEEN else None
    summary["median_foreign_load_cores"] = median(LOAD_SEEN) if LOAD_SEEN else None
    results["summary"] = summary

    log("\n== SUMMARY  (ratios from this run; machine: "
        f"{facts['cores']} cores, torch {facts['torch']}, lightning {facts['lightning']}, state {state_gb:.2f} GB)")
    if "training" in results:
        for v, label in VARIANTS.items():
            log(f"  lost per checkpoint {label:52s} {tr[v]['lost_per_ckpt_s']:7.3f}s  ({tr[v]['ratio_vs_lightning']:.2f}x)")
        for v, label in VARIANTS.items():
            log(f"  steady-state per checkpoint / end-of-fit wait {v:16s} {tr[v]['steady_per_ckpt_s']:7.3f}s / "
                f"{tr[v]['end_of_fit_wait_s']:6.3f}s")
        log(f"  train: ours async / Lightning default            {fmt_ratio('train_ours_async_vs_lightning', summary['train_ours_async_vs_lightning'])}")
        log(f"  train: ours async / ours sync                     {fmt_ratio('train_ours_async_vs_ours_sync', summary['train_ours_async_vs_ours_sync'])}")
    if "train_raw_vs_ours_sync" in summary:
        log(f"  train: raw write+fsync / ours sync lost per ckpt  {fmt_ratio('train_raw_vs_ours_sync', summary['train_raw_vs_ours_sync'])}"
            f"  (raw {summary['train_raw_s']:.2f}s, measured next to the ours_sync fits)")
        if "train_raw_section2_vs_ours_sync" in summary:
            log(f"         (against section 2's raw write+fsync, minutes later: "
                f"{summary['train_raw_section2_vs_ours_sync']:.2f}x)")
        log(f"  end-of-fit wait (async) / disk time of the {summary['end_of_fit_left_bytes'] / 1e9:.2f} GB left "
            f"({summary['end_of_fit_disk_s']:.2f}s at the O_DIRECT raw rate measured next to the async fits) {fmt_ratio('end_of_fit_vs_disk', summary['end_of_fit_vs_disk'])}")
    if "save" in results:
        log(f"  save:  ours / raw write+fsync                     {fmt_ratio('save_ours_vs_raw', summary['save_ours_vs_raw'])}")
        log(f"  save:  ours / torch.save+fsync                    {fmt_ratio('save_ours_vs_torch_save', summary['save_ours_vs_torch_save'])}")
    if "restore" in results:
        log(f"  restore ({r['cache']}):")
        log(f"  load_checkpoint vs raw read                       {fmt_ratio('restore_load_vs_raw', summary['restore_load_vs_raw'])}")
        log(f"  Trainer.fit(ckpt_path) restore vs raw (hooks)     {fmt_ratio('restore_fit_vs_raw', summary['restore_fit_vs_raw'])}")
        log(f"  Trainer.fit(ckpt_path) restore vs raw (fit diff)  {fmt_ratio('restore_fit_vs_raw', summary['restore_fit_diff_vs_raw'])}")
    if DISCARDED:
        log(f"  fits run again because other processes used CPU during them: {len(DISCARDED)} ("
            + ", ".join(f"{d['variant']} {d['foreign_cores']:.2f} cores" for d in DISCARDED) + ")")
    log(f"  load average at start {' '.join(f'{x:.2f}' for x in results['loadavg_start'])}, at end "
        f"{' '.join(f'{x:.2f}' for x in summary['loadavg_end'])}")
    finish(results, args.json, LOAD_SEEN, facts["cores"], summary["total_wall_s"],
           outside="this process (other processes, kernel writeback)")
    return 0


def finish(results: dict, json_path: Optional[str], load_seen: list[float], cores: int, total_s: float, outside: str) -> None:
    """The end of a benchmark's report: the CPU others used while it measured, its wall time, and its JSON."""
    if load_seen:
        worst = max(load_seen)
        log(f"  CPU used outside {outside} during measurements: median {median(load_seen):.2f}, max {worst:.2f} "
            f"of {cores} cores" + ("   WARNING: the machine was shared; timings are skewed" if worst > 0.25 else ""))
    log(f"  total benchmark wall time {total_s:.0f}s")
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2, default=str)
        log(f"  JSON written to {json_path}")


if __name__ == "__main__":
    sys.exit(main())
