#!/usr/bin/env python
"""Folders of many checkpoints (issue 22): what finding, listing and the callbacks' per-save work cost as a folder
grows, locally (10 -> 3,000 checkpoints) and on S3 (10 -> 1,000, a SeaweedFS server started here as the tests do).

Per folder size N (the checkpoints are copies of one small real checkpoint, each with its own manifest, made by
``tests/support/clones.py``; the folder's ``latest.json`` index is built once, as the first save into an existing
folder does):

- ``latest_checkpoint``: wall time and manifests read (requests on S3), through the hint, and (local) with the
  index removed from ``latest.json``, which is what every release before this one did at every call;
- ``list_checkpoints``, ``lightning-ckpt ls``, ``lineage`` and ``report`` (local: ``report`` writes the HTML page);
- the callbacks' added time per save (CPU time of the process, all threads; wall time beside it) in a real
  ``Trainer.fit`` (``DemoModel``; ``PeriodicCheckpoint`` every step,
  ``BestMetricCheckpoint`` top 2 every step, ``RetentionPolicy(keep_last=2, keep_every_n_steps=10)``; synchronous
  saves, so that all the per-save work is in the training step; not fsynced unless ``--fsync``, so that the disk's
  flush time, which does not depend on the folder, does not hide the callbacks' own work): the median step time with the callbacks minus the
  median step time of the same fit without them, the first steps left out (on S3 also those before the uploader's
  first retention pass ended). The one-time cost of a fit into a big folder (its listing, and on S3 its manifests,
  read once) is reported apart (``first_save_extra_s``: the wall time of the steps left out beyond their median). Beside it, the CPU time of the
  committing thread in the session's after-commit work (metric history, best-k evictions, retention: what depends
  on the folder's size) and in ``publish_latest`` per save, medians: the numbers the shared machine disturbs least. On S3 the folder is the ``s3://``
  location itself (staged locally, uploaded after each commit, retention applied there): the fit's wall time per
  save minus that of a fit without callbacks (the uploads run in the background; the fit waits for the last). On
  S3 each size is fitted ``--s3-rounds`` times, the sizes taking turns (10, 1000, 1000, 10, 10, 1000, ...), each fit
  into a location built afresh, and the step samples of a size are pooled: a SeaweedFS server and the fit share the
  two cores, and one fit per size left the ratio to whichever minute of the machine each fit fell in.

No pass/fail; ratios are only taken between numbers of the same run. ``run(args) -> dict``; ``python
benchmarks/_scale_folders.py`` prints the table and writes ``benchmarks/results/scale-folders-cpu.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
try:
    import lightning_ckpt  # noqa: F401
except ImportError:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402

from lightning_ckpt import CheckpointWriter, latest_checkpoint, list_checkpoints  # noqa: E402
from lightning_ckpt.store import LocalStore, hint  # noqa: E402

MILESTONE = 10


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning_ckpt", "lightning.fabric", "botocore", "boto3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of ``fn`` over ``repeats`` calls, and its last result."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


class Counter:
    """Counts ``LocalStore.read_manifest`` calls (manifests read) while installed."""

    def __init__(self) -> None:
        self.n = 0
        self.real = LocalStore.read_manifest

    def __enter__(self) -> "Counter":
        real = self.real

        def counted(store: Any, name: str) -> Any:
            self.n += 1
            return real(store, name)

        LocalStore.read_manifest = counted  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        LocalStore.read_manifest = self.real  # type: ignore[method-assign]


def seed_checkpoint(base: str) -> str:
    w = CheckpointWriter(os.path.join(base, "seed"), async_save=False)
    try:
        torch.manual_seed(0)
        return w.save({"state_dict": {"w": torch.randn(64, 64)}, "global_step": 1}, step=1).result().path
    finally:
        w.close()


def build_local(seed: str, folder: str, n: int) -> None:
    from support.clones import clone

    clone(seed, folder, [1_000_000 + MILESTONE * i for i in range(n)])
    LocalStore(folder).publish_latest({"name": f"step={1_000_000 + MILESTONE * (n - 1):06d}",
                                       "step": 1_000_000 + MILESTONE * (n - 1), "epoch": 0})


def without_index(folder: str) -> Callable[[], None]:
    """Strip the index from ``latest.json`` (the hint older releases wrote); returns the undo."""
    path = os.path.join(folder, "latest.json")
    with open(path) as f:
        doc = json.load(f)
    with open(path, "w") as f:
        json.dump({k: v for k, v in doc.items() if k != "index"}, f)

    def undo() -> None:
        with open(path, "w") as f:
            json.dump(doc, f)

    return undo


def cli(*argv: str) -> None:
    from lightning_ckpt.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = main(list(argv))
    assert rc in (0, None), (argv, rc)


# ------------------------------------------------------------------------------------------------ a real fit
def fit_steps(dirpath: str | None, steps: int, **cb_options: Any) -> tuple[list[float], list[float], float, list[float]]:
    """Step durations (s) of a real fit (with the saving callbacks on ``dirpath``, none when None): wall time, and CPU
    time of the process (every thread; far less sensitive than wall time to other jobs on a shared machine), the
    fit's wall time, and when each step began (``perf_counter``)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    from lightning_ckpt.callbacks import BestMetricCheckpoint, PeriodicCheckpoint, RetentionPolicy
    from lightning_ckpt.demo import DemoDataModule, DemoModel

    marks: list[float] = []
    cpu: list[float] = []

    class Clock(Callback):
        def on_train_batch_end(self, *a: Any) -> None:
            marks.append(time.perf_counter())
            cpu.append(time.process_time())

    cbs: list = [Clock()]
    if dirpath is not None:
        cbs += [PeriodicCheckpoint(dirpath, every_n_train_steps=1, allow_existing=True, async_save=False,
                                   verbose=False, **cb_options),
                BestMetricCheckpoint(dirpath, monitor="train_loss", every_n_train_steps=1, top_k=2,
                                     async_save=False, verbose=False, **cb_options),
                RetentionPolicy(dirpath, keep_last=2, keep_every_n_steps=MILESTONE)]
    tr = pl.Trainer(callbacks=cbs, max_steps=steps, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, log_every_n_steps=1, limit_val_batches=0,
                    default_root_dir=tempfile.mkdtemp(prefix="lc-scale-root-"))
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        tr.fit(DemoModel(), datamodule=DemoDataModule())
    wall = time.perf_counter() - t
    return [b - a for a, b in zip(marks, marks[1:])], [b - a for a, b in zip(cpu, cpu[1:])], wall, marks[:-1]


def fit_samples(folder: str, steps: int, skip: int, **cb_options: Any) -> dict:
    """The callbacks' added time per save, as raw samples for :func:`summarize`: one fit with the callbacks and one
    without, per step and per call of the timed methods, and the fits' wall times. Left out: the first ``skip`` steps and calls, and on
    S3 also the steps that began before the uploader's first retention pass ended (that pass reads the manifests of
    the location once per fit, in the background: a one-time cost, in ``first_save_extra``)."""
    from lightning_ckpt.session.backups import Uploader
    from lightning_ckpt.session.session import FolderSession

    # the folder was just built (thousands of files): its writeback would run during the fits and slow every file
    # operation there (a profile at 1,000 showed each open 5x slower than at 10); flush it first
    os.sync()
    base_wall_steps, base_cpu_steps, base_wall, _ = fit_steps(None, steps)
    spent: dict[str, list[float]] = {"after_commit": [], "publish_latest": [], "upload": [], "upload_retention": []}
    real = {"after_commit": FolderSession._after_commit, "publish_latest": LocalStore.publish_latest,
            "upload": Uploader._upload, "upload_retention": Uploader._apply_retention}
    walls: dict[str, list[float]] = {"upload": []}
    ended: dict[str, list[float]] = {}

    def timed_method(what: str) -> Callable:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t = time.thread_time()  # CPU time of the committing thread: other jobs on the machine barely show
            w = time.perf_counter()
            try:
                return real[what](*a, **kw)
            finally:
                spent[what].append(time.thread_time() - t)
                walls.setdefault(what, []).append(time.perf_counter() - w)
                ended.setdefault(what, []).append(time.perf_counter())
        return wrapper

    FolderSession._after_commit = timed_method("after_commit")  # type: ignore[method-assign]
    LocalStore.publish_latest = timed_method("publish_latest")  # type: ignore[method-assign]
    Uploader._upload = timed_method("upload")  # type: ignore[method-assign]
    Uploader._apply_retention = timed_method("upload_retention")  # type: ignore[method-assign]
    try:
        cb_wall_steps, cb_cpu_steps, cb_wall, began = fit_steps(folder, steps, **cb_options)
    finally:
        FolderSession._after_commit = real["after_commit"]  # type: ignore[method-assign]
        LocalStore.publish_latest = real["publish_latest"]  # type: ignore[method-assign]
        Uploader._upload = real["upload"]  # type: ignore[method-assign]
        Uploader._apply_retention = real["upload_retention"]  # type: ignore[method-assign]
    first_pass = (ended.get("upload_retention") or [-1e18])[0]
    steady = max([skip] + [i + 1 for i, t in enumerate(began) if t < first_pass])
    steady = min(steady, max(skip, len(began) - 10))  # (a pass that outlasted the fit: the last 10 steps)
    return {"after_commit": spent["after_commit"][skip:], "publish_latest": spent["publish_latest"][skip:],
            "upload_wall": walls["upload"][skip:], "upload_retention": spent["upload_retention"][skip:],
            "cpu_with": cb_cpu_steps[steady:], "cpu_without": base_cpu_steps[skip:],
            "wall_with": cb_wall_steps[steady:], "wall_without": base_wall_steps[skip:],
            "first_save_extra": [sum(cb_wall_steps[:steady]) - statistics.median(cb_wall_steps[steady:]) * steady
                                 if cb_wall_steps else 0.0],
            "steady_from": [steady], "wall_added": [(cb_wall - base_wall) / steps]}


def summarize(fits: list[dict]) -> dict:
    """Medians over the samples of one or more fits (:func:`fit_samples`; several: pooled), and with several the
    added step time of each on its own (``added_per_save_s_each``)."""
    med = statistics.median

    def pooled(key: str) -> float:
        vals = [v for f in fits for v in f[key]]
        return med(vals) if vals else 0.0

    out = {"after_commit_cpu_s": pooled("after_commit"), "publish_latest_cpu_s": pooled("publish_latest"),
           # S3: the uploader's work per save (its thread: the push, then the location's retention planned and
           # applied there): wall time of one upload, CPU time of its retention pass
           "upload_wall_s": pooled("upload_wall"), "upload_retention_cpu_s": pooled("upload_retention"),
           "added_per_save_s": pooled("cpu_with") - pooled("cpu_without"),
           "step_cpu_s_without": pooled("cpu_without"), "step_cpu_s_with": pooled("cpu_with"),
           "added_per_save_wall_s": pooled("wall_with") - pooled("wall_without"),
           "first_save_extra_s": pooled("first_save_extra"), "wall_added_per_save_s": pooled("wall_added")}
    if len(fits) > 1:
        out["added_per_save_s_each"] = [med(f["cpu_with"]) - med(f["cpu_without"]) for f in fits]
    return out


# ------------------------------------------------------------------------------------------------ local
def bench_local(args: Any, base: str, seed: str) -> dict:
    from lightning_ckpt.folder.lineage import format_tree, lineage
    from lightning_ckpt.tools.report import collect_run, render_report

    out: dict = {}
    fits: dict[int, list[dict]] = {n: [] for n in args.local}
    # as on S3: the measured fits of the sizes take turns, each into a folder built afresh, samples pooled per size
    for r in range(args.rounds):
        for n in (args.local if r % 2 == 0 else list(reversed(args.local))):
            folder = os.path.join(base, f"local-{n}-r{r}")
            build_local(seed, folder, n)
            row: dict = out.setdefault(str(n), {})
            if r == 0:
                with Counter() as c:
                    row["latest_s"], got = timed(lambda: latest_checkpoint(folder), args.repeats)
                row["latest_manifest_reads"] = c.n / args.repeats
                assert got.endswith(f"step={1_000_000 + MILESTONE * (n - 1):06d}"), got
                undo = without_index(folder)
                with Counter() as c:
                    row["latest_no_index_s"], _ = timed(lambda: latest_checkpoint(folder), max(1, args.repeats // 2))
                row["latest_no_index_manifest_reads"] = c.n / max(1, args.repeats // 2)
                undo()
                row["list_s"], infos = timed(lambda: list_checkpoints(folder), 1)
                assert len(infos) == n
                row["ls_s"], _ = timed(lambda: cli("ls", folder), 1)
                row["lineage_s"], _ = timed(lambda: format_tree(lineage(folder), lambda b: f"{b}"), 1)
                row["report_s"], _ = timed(lambda: render_report(collect_run(folder)), 1)
                row["report_cli_s"], _ = timed(lambda: cli("report", folder, "-o", os.path.join(base, f"r{n}.html")), 1)
            fits[n].append(fit_samples(folder, args.steps, args.skip, fsync=args.fsync))
            shutil.rmtree(folder, ignore_errors=True)
    for n in args.local:
        row = out[str(n)]
        row.update(summarize(fits[n]))
        each = ", ".join(f"+{x * 1e3:.1f}" for x in row.get("added_per_save_s_each", []))
        log(f"local {n:5d}: latest {row['latest_s'] * 1e3:7.1f} ms ({row['latest_manifest_reads']:.0f} manifests; "
            f"without the index {row['latest_no_index_s'] * 1e3:7.1f} ms, {row['latest_no_index_manifest_reads']:.0f}) "
            f"| list {row['list_s'] * 1e3:6.0f} ms, ls {row['ls_s'] * 1e3:6.0f} ms, lineage {row['lineage_s'] * 1e3:6.0f}"
            f" ms, report {row['report_s'] * 1e3:6.0f} ms | after-commit {row['after_commit_cpu_s'] * 1e3:5.2f} ms + "
            f"latest.json {row['publish_latest_cpu_s'] * 1e3:5.2f} ms CPU/save | callbacks +"
            f"{row['added_per_save_s'] * 1e3:5.1f} ms CPU/save, {args.rounds} fits pooled; each {each} "
            f"(step {row['step_cpu_s_without'] * 1e3:.1f} -> {row['step_cpu_s_with'] * 1e3:.1f} ms CPU; wall "
            f"+{row['added_per_save_wall_s'] * 1e3:.1f} ms; one-time at the start +{row['first_save_extra_s'] * 1e3:.0f} ms)")
    return out


# ------------------------------------------------------------------------------------------------ S3
def build_s3(seed: str, uri: str, bucket: str, prefix: str, n: int) -> str:
    """``n`` checkpoints at ``uri``: ``n - 1`` manifests put directly (never read by the paths measured here unless
    a listing reads every manifest), the newest a real pushed checkpoint, and a ``latest.json`` index for all."""
    import concurrent.futures as cf

    from lightning_ckpt.store.s3 import client
    from lightning_ckpt.folder.transfer import push_checkpoint
    from support.clones import clone, manifest_for

    with open(os.path.join(seed, "manifest.json"), "rb") as f:
        template = json.loads(f.read())
    idx = hint.Index()
    items = []
    for i in range(n - 1):
        name, raw = f"step={1_000_000 + MILESTONE * i:06d}", manifest_for(template, 1_000_000 + MILESTONE * i,
                                                                           created=1.0 + i)
        items.append((name, raw))
        idx.add(name, hashlib.md5(raw).hexdigest(), json.loads(raw), raw)
    c = client()
    with cf.ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda it: c.put_object(Bucket=bucket, Key=f"{prefix}/{it[0]}/manifest.json", Body=it[1]), items))
    c.put_object(Bucket=bucket, Key=f"{prefix}/latest.json", Body=json.dumps(
        {"name": items[-1][0] if items else "", "step": 0, "epoch": 0,
         "index": {**idx.to_doc(), "listed": len(items)}}).encode())
    newest = 1_000_000 + MILESTONE * (n - 1)
    local = os.path.join(os.path.dirname(seed), f"s3-newest-{prefix}")
    (path,) = clone(seed, local, [newest])
    push_checkpoint(path, uri)
    return f"{uri}/step={newest:06d}"


def count_requests() -> tuple[list, Callable[[], None]]:
    from lightning_ckpt.store.s3 import client

    calls: list[str] = []

    def before(event_name: str, **kwargs: Any) -> None:
        calls.append(event_name.rsplit(".", 1)[-1])

    client().meta.events.register("before-call.s3", before)
    return calls, lambda: client().meta.events.unregister("before-call.s3", before)


def bench_s3(args: Any, base: str, seed: str) -> dict:
    from seaweed import s3_server

    from lightning_ckpt.store.s3 import S3Store

    out: dict = {}
    fits: dict[int, list[dict]] = {n: [] for n in args.s3}
    requests: dict[int, list[int]] = {n: [0, 0] for n in args.s3}  # LIST, all: over every measured fit
    with s3_server(os.path.join(base, "weed"), "bench"):
        # the measured fits of the sizes take turns (ABBA...), each into a location of its own built afresh, so that a
        # slower minute of the shared machine falls on every size alike; their samples are pooled per size
        for r in range(args.s3_rounds):
            for n in (args.s3 if r % 2 == 0 else list(reversed(args.s3))):
                uri = f"s3://bench/n{n}-r{r}"
                want = build_s3(seed, uri, "bench", f"n{n}-r{r}", n)
                row: dict = out.setdefault(str(n), {})
                if r == 0:
                    calls, stop = count_requests()
                    try:
                        row["latest_s"], got = timed(lambda: latest_checkpoint(uri), args.repeats)
                    finally:
                        stop()
                    assert got == want, (got, want)
                    row["latest_requests"] = len(calls) / args.repeats
                    row["latest_list_pages"] = calls.count("ListObjectsV2") / args.repeats
                    row["latest_get_requests"] = calls.count("GetObject") / args.repeats
                    S3Store._cache.clear()
                    calls, stop = count_requests()
                    try:
                        row["list_cold_s"], infos = timed(lambda: list_checkpoints(uri), 1)
                        row["list_cold_requests"] = len(calls)
                    finally:
                        stop()
                    assert len(infos) == n
                    calls, stop = count_requests()
                    try:
                        row["list_warm_s"], _ = timed(lambda: list_checkpoints(uri), 1)  # manifests cached by ETag
                        row["list_warm_requests"] = len(calls)
                    finally:
                        stop()
                    row["ls_s"], _ = timed(lambda: cli("ls", uri), 1)
                calls, stop = count_requests()
                try:
                    fits[n].append(fit_samples(uri, args.s3_steps, args.skip, fsync=args.fsync))
                finally:
                    stop()
                requests[n][0] += calls.count("ListObjectsV2")
                requests[n][1] += len(calls)
        for n in args.s3:
            row = out[str(n)]
            row.update(summarize(fits[n]))
            row["fit_list_requests_per_save"] = requests[n][0] / (args.s3_steps * args.s3_rounds)
            row["fit_requests_per_save"] = requests[n][1] / (args.s3_steps * args.s3_rounds)
            each = ", ".join(f"+{x * 1e3:.1f}" for x in row.get("added_per_save_s_each", []))
            log(f"S3    {n:5d}: latest {row['latest_s'] * 1e3:7.1f} ms ({row['latest_requests']:.0f} requests: "
                f"{row['latest_list_pages']:.0f} LIST, {row['latest_get_requests']:.0f} GET) | list cold "
                f"{row['list_cold_s'] * 1e3:6.0f} ms ({row['list_cold_requests']} requests), warm "
                f"{row['list_warm_s'] * 1e3:6.0f} ms ({row['list_warm_requests']}), ls {row['ls_s'] * 1e3:6.0f} ms "
                f"| after-commit {row['after_commit_cpu_s'] * 1e3:5.2f} ms CPU/save | upload {row['upload_wall_s'] * 1e3:5.1f}"
                f" ms wall/save, its retention {row['upload_retention_cpu_s'] * 1e3:5.2f} ms CPU | fit +"
                f"{row['wall_added_per_save_s'] * 1e3:6.1f} ms/save wall (step +"
                f"{row['added_per_save_s'] * 1e3:.1f} ms CPU, {args.s3_rounds} fits pooled; each {each}; one-time at the start "
                f"+{row['first_save_extra_s'] * 1e3:.0f} ms) | {row['fit_list_requests_per_save']:.1f} LIST, "
                f"{row['fit_requests_per_save']:.1f} requests/save")
    return out


def log(msg: str) -> None:
    print(msg, flush=True)


def run(args: Any) -> dict:
    """The benchmark; ``args`` as parsed by :func:`parser` (missing fields take its defaults)."""
    defaults = vars(parser().parse_args([]))
    args = argparse.Namespace(**{**defaults, **vars(args)})
    quiet()
    torch.set_num_threads(1)
    base = tempfile.mkdtemp(prefix="lc-bench-scale-", dir=args.dir)
    try:
        seed = seed_checkpoint(base)
        out: dict = {"local": bench_local(args, base, seed)}
        if not args.no_s3:
            out["s3"] = bench_s3(args, base, seed)
        for where in ("local", "s3"):
            rows = out.get(where) or {}
            if len(rows) >= 2:
                lo, hi = rows[min(rows, key=int)], rows[max(rows, key=int)]
                for key in ("added_per_save_s", "after_commit_cpu_s", "upload_wall_s", "upload_retention_cpu_s",
                            "wall_added_per_save_s"):
                    out[f"{where}_{key}_ratio"] = hi[key] / lo[key] if lo[key] > 0 else None
                each = list(zip(lo.get("added_per_save_s_each", []), hi.get("added_per_save_s_each", [])))
                if each:  # round by round (the two fits of a round ran next to each other)
                    out[f"{where}_added_per_save_s_round_ratios"] = [h / lo_ if lo_ > 0 else None for lo_, h in each]
                out[f"{where}_added_per_save_s_ratio_by_size"] = {  # every size against the smallest
                    n: r["added_per_save_s"] / lo["added_per_save_s"] if lo["added_per_save_s"] > 0 else None
                    for n, r in rows.items()}
        out["settings"] = {k: v for k, v in vars(args).items() if k != "json"}
        return out
    finally:
        shutil.rmtree(base, ignore_errors=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--local", type=int, nargs="+", default=[10, 1000, 3000], help="local folder sizes")
    p.add_argument("--s3", type=int, nargs="+", default=[10, 1000], help="S3 location sizes")
    p.add_argument("--steps", type=int, default=40, help="saves per measured local fit (one per step)")
    p.add_argument("--rounds", type=int, default=4, help="measured local fits per size, the sizes taking turns "
                   "(their samples pooled)")
    p.add_argument("--s3-steps", type=int, default=60, help="saves per measured S3 fit")
    p.add_argument("--s3-rounds", type=int, default=8, help="measured S3 fits per size, the sizes taking turns "
                   "(their samples pooled)")
    p.add_argument("--skip", type=int, default=3, help="first steps left out of the medians")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--fsync", action="store_true", help="fsync the saves of the measured fits (default off: the "
                   "disk's flush time, the same at every folder size, would hide the callbacks' own work)")
    p.add_argument("--no-s3", action="store_true")
    p.add_argument("--dir", default=tempfile.gettempdir())
    p.add_argument("--json", default=os.path.join(HERE, "results", "scale-folders-cpu.json"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out = run(args)
    for where in ("local", "s3"):
        for key, what in (("after_commit_cpu_s", "after-commit work per save (CPU)"),
                          ("added_per_save_s", "callbacks' added step time per save (CPU)"),
                          ("upload_wall_s", "one upload per save (wall, the uploader's thread)"),
                          ("upload_retention_cpu_s", "the location's retention per save (CPU)"),
                          ("wall_added_per_save_s", "the fit's wall time per save, one-time costs included")):
            r = out.get(f"{where}_{key}_ratio")
            if r is not None:
                log(f"{where}: {what}, largest folder / smallest: {r:.2f}x")
        by_size = out.get(f"{where}_added_per_save_s_ratio_by_size") or {}
        if by_size:
            log(f"{where}: callbacks' added step time per save (CPU) against the smallest folder: " + ", ".join(
                f"{n}: {r:.2f}x" for n, r in by_size.items() if r is not None))
        rounds = [r for r in out.get(f"{where}_added_per_save_s_round_ratios") or [] if r is not None]
        if rounds:
            log(f"{where}: the same, round by round: {', '.join(f'{r:.2f}x' for r in rounds)} (median "
                f"{statistics.median(rounds):.2f}x)")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
