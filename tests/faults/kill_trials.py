"""Fork server for ``tests/test_fault_injection.py``: kill -9 a training process at chosen and at random moments.

Started once as a subprocess (``python tests/faults/kill_trials.py``). It imports torch, Lightning, lightning_ckpt and
boto3 once, runs no torch compute and starts no thread, then answers one JSON command per stdin line with one JSON
line on stdout:

``{"op": "trial", ...}``
    fork a child that fine-tunes the demo model (frozen layers, refreshed now and then: see ``BackboneRefresh``; a
    deduplicated checkpoint every step, ``RetentionPolicy(keep_last=2)``, backups to S3 with the location's own
    retention; see ``training_setup``), resuming from the newest valid checkpoint, local or on S3. The child dies by SIGKILL: either it kills itself at the ``k``-th pass
    through a kill point (``plan``; it writes a marker file just before), or the server kills it after a random delay
    (``random_kill``). The reply says how it ended, which kill point fired, where training had got to, the last
    instrumented event before the end, and (for ``count`` runs) how often each kill point was passed.
``{"op": "resume", ...}``
    fork a child that resumes a Trainer from a checkpoint for a few steps; the reply holds its exit status.
``{"op": "env", "env": {...}}``
    set environment variables (the S3 server's address and credentials) for the children to come.
``{"op": "quit"}``

Children write their output to a log file (never to the protocol's stdout), die with the server (PR_SET_PDEATHSIG)
and share its process group, so killing the group ends everything.
"""
from __future__ import annotations

import ctypes
import datetime as dt
import fcntl
import json
import logging
import mmap
import os
import select
import shutil
import signal
import struct
import sys
import threading
import time
import traceback
import warnings
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# a thread pool started by an import (OpenBLAS, OpenMP) would not survive fork: keep every library single-threaded
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
warnings.filterwarnings("ignore")

import boto3  # noqa: E402,F401
import boto3.s3.transfer  # noqa: E402,F401
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402,F401

import lightning_ckpt.store.blobs as store_blobs  # noqa: E402
import lightning_ckpt.store.direct as store_direct  # noqa: E402
import lightning_ckpt.store.fs as store_fs  # noqa: E402
import lightning_ckpt.store.lock as store_lock  # noqa: E402
import lightning_ckpt.store.local as store_local  # noqa: E402
import lightning_ckpt.store.s3 as store_s3  # noqa: E402
from lightning_ckpt import BackupToS3, PeriodicCheckpoint, RetentionPolicy, latest_checkpoint, resume_path  # noqa: E402
from lightning_ckpt.errors import CheckpointError, CheckpointNotFoundError  # noqa: E402
from lightning_ckpt.format.manifest import BLOBS, PACK_RE  # noqa: E402
from lightning_ckpt.store.base import LOCK_FILE  # noqa: E402
from lightning_ckpt.read import read_checkpoint_manifest  # noqa: E402
from lightning_ckpt.writer.meta import run_info  # noqa: E402
from lightning_ckpt.demo import DemoDataModule, DemoModel  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# Backups and resume: the saving callback's own backup_uri= and resume="auto" (True), or the older way, a BackupToS3
# callback and fit(ckpt_path=resume_path(dirpath, uri)) (False). This is the one line to change;
# LC_FAULT_BACKUP=callback runs the older way without editing.
BUILTIN_BACKUP_AND_RESUME = os.environ.get("LC_FAULT_BACKUP", "builtin") == "builtin"
# ---------------------------------------------------------------------------------------------------------------

KEEP_LAST = 2  # local retention
S3_KEEP_LAST = 3  # the S3 location's own retention (keeps the prefix small, and kills land in S3 deletions too)
MAX_STEPS = 1_000_000  # never reached: each child trains `budget` steps and stops, unless it is killed first
# a fine-tune: the first two of three hidden layers frozen, so deduplicated saves put them into packs of the folder's
# content store (a literal: tests/test_fault_injection.py reads it without importing this script)
MODEL_KW = {"layers": 3, "frozen_layers": 2}
REFRESH_PERIOD = 4  # BackboneRefresh: the frozen layers change before every 4th save (see there)
# S3 packs no manifest references are collected once this old even when another process uploaded them (the
# default, an hour, protects another machine's upload in progress; here one process at a time writes a prefix, so
# the packs of a killed run's uploads are collected by the relaunch's first S3 retention pass)
S3_PACK_GRACE_S = 0.0


def training_setup(dirpath: str, uri: str) -> tuple[list, str | None]:
    """The callbacks of the crash-looping job and the ``ckpt_path`` to give ``fit``."""
    if BUILTIN_BACKUP_AND_RESUME:
        ckpt = PeriodicCheckpoint(dirpath, every_n_train_steps=1, backup_uri=[{"uri": uri, "keep_last": S3_KEEP_LAST}],
                                  resume="auto")
        return [ckpt, RetentionPolicy(dirpath, keep_last=KEEP_LAST)], None
    ckpt = PeriodicCheckpoint(dirpath, every_n_train_steps=1)
    return ([ckpt, BackupToS3(dirpath, uri, keep_last=S3_KEEP_LAST), RetentionPolicy(dirpath, keep_last=KEEP_LAST)],
            resume_path(dirpath, uri))


def make_model_and_data() -> tuple[DemoModel, DemoDataModule]:
    # 4 batches per epoch: saves fall on epoch boundaries too
    return DemoModel(**MODEL_KW), DemoDataModule(n_train=64, n_val=16, batch_size=16)


class BackboneRefresh(pl.Callback):
    """Changes the frozen layers now and then (a backbone refreshed from elsewhere, or unfrozen for a while), so that
    the content store sees every part of a pack's life in a few steps: packs written, reused, left unreferenced by
    retention and collected. Before save ``n`` (the step that starts at ``global_step == n - 1``), ``net.0`` changes
    when ``n % 4 == 0`` and ``net.3`` when ``n % 4`` is 0 or 1. So save ``4k`` writes both into its own files, save
    ``4k+1`` packs ``net.0``, ``4k+2`` packs ``net.3``, ``4k+3`` references both packs, which become unreferenced
    together when retention deletes save ``4k+3`` (a sweep that removes two packs). Deterministic in the step, so a
    resumed run changes them exactly as the run it continues."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        n = int(trainer.global_step) + 1
        phase = n % REFRESH_PERIOD
        with torch.no_grad():
            for i, when in ((0, (0,)), (3, (0, 1))):
                if phase in when:
                    for p in pl_module.net[i].parameters():
                        p.add_(1e-3)


def make_trainer(callbacks: list, max_steps: int) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps, callbacks=callbacks, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )


# ------------------------------------------------------------------------------------------------ shared memory
# One page shared by the server and the child it forks (MAP_SHARED survives fork): the child records where it is,
# the server reads it after the child died (SIGKILL leaves no chance to write anything on the way out).
_SHM = mmap.mmap(-1, 4096)
_OFF_STARTED, _OFF_START_STEP, _OFF_PROGRESS, _OFF_NEVENTS, _OFF_EVENT = 0, 8, 16, 24, 32
_EVENT_LEN = 120
_START_FD: int | None = None  # in a trial child: the pipe to the server, written once when training starts


def shm_reset() -> None:
    _SHM[:] = b"\0" * len(_SHM)
    struct.pack_into("<q", _SHM, _OFF_START_STEP, -1)
    struct.pack_into("<q", _SHM, _OFF_PROGRESS, -1)


def shm_read() -> dict:
    started = struct.unpack_from("<d", _SHM, _OFF_STARTED)[0]
    start_step = struct.unpack_from("<q", _SHM, _OFF_START_STEP)[0]
    progress = struct.unpack_from("<q", _SHM, _OFF_PROGRESS)[0]
    n = struct.unpack_from("<q", _SHM, _OFF_NEVENTS)[0]
    ev = bytes(_SHM[_OFF_EVENT:_OFF_EVENT + _EVENT_LEN]).split(b"\0", 1)[0].decode("utf-8", "replace")
    return {"train_started": started or None, "started_step": None if start_step < 0 else start_step,
            "progress": None if progress < 0 else progress, "events": n, "last_event": ev or None}


def shm_event(label: str) -> None:
    raw = label.encode()[: _EVENT_LEN - 1]
    _SHM[_OFF_EVENT:_OFF_EVENT + _EVENT_LEN] = raw + b"\0" * (_EVENT_LEN - len(raw))
    n = struct.unpack_from("<q", _SHM, _OFF_NEVENTS)[0]
    struct.pack_into("<q", _SHM, _OFF_NEVENTS, n + 1)


# ------------------------------------------------------------------------------------------------ kill points
KILL_POINTS = {
    "write": [
        "write.mid_file",       # half of a header/tensor buffer written into a shard or state file, then killed
        "write.after_file",     # a shard/state file complete in the .partial folder, the next not started
    ],
    "commit": [
        "commit.before_manifest",   # every file written, manifest not started
        "commit.mid_manifest",      # half of manifest.json written
        "commit.before_rename",     # manifest written and fsynced, .partial folder not renamed
        "commit.after_rename",      # renamed into place (the commit point), parent not fsynced, latest.json stale
        "commit.before_latest",     # about to replace latest.json
        "commit.mid_latest",        # latest.json's temp file written, not yet renamed over latest.json
        "commit.after_latest",      # latest.json replaced, commit hooks (retention, upload queue) not run
    ],
    "retention": [
        "retention.before_trash",   # retention chose what to delete, nothing renamed yet
        "retention.after_trash",    # a doomed checkpoint renamed to .trash-*, its removal not queued
        "retention.before_remove",  # the background deleter is about to remove a .trash-* folder
        "retention.mid_remove",     # some files of a .trash-* folder removed, the rest not
        "retention.s3_before_delete",   # the S3 location's retention is about to delete a checkpoint's manifest
        "retention.s3_after_manifest",  # its manifest deleted on S3 (not a checkpoint any more), objects not yet
    ],
    "upload": [
        "upload.before_object",     # about to upload a data object of a checkpoint
        "upload.mid_object",        # a data object's upload under way (bytes being sent)
        "upload.after_object",      # a data object uploaded, others maybe not
        "upload.before_manifest",   # every data object uploaded, manifest.json not
        "upload.after_manifest",    # manifest.json uploaded (the commit on S3), latest.json not updated
        "upload.after_latest",      # latest.json updated on S3
    ],
    "gc": [
        "gc.after_adopt",           # the save's pack moved into <dir>/.blobs (fsynced), its manifest not yet written
        "gc.before_sweep",          # a collection marked what the committed manifests reference, removed nothing yet
        "gc.mid_sweep",             # a collection removed an unreferenced pack, the rest of its sweep (if any) not
        "gc.s3_after_pack",         # a pack uploaded to <prefix>/.blobs, the checkpoint's manifest not yet
        "gc.s3_mid_collect",        # the S3 pack collection deleted some of the unreferenced packs, not the others
    ],
    "lock": [
        "lock.after_flock",         # the folder's lock taken (flock), the holder's details not yet written into it
        "lock.after_acquire",       # the lock taken and recorded, the previous crash's debris not yet cleaned up
    ],
    "restore": [
        "restore.after_download",   # the run folder is gone; a relaunch pulling the newest checkpoint from S3 dies
        "restore.mid_pack_copy",    # ... or dies half way through copying a pack into the folder's content store
    ],
}
PHASE_OF = {p: ph for ph, pts in KILL_POINTS.items() for p in pts}


class KillPoints:
    """Counts passes through each kill point; at the planned pass, writes the marker file and SIGKILLs itself."""

    def __init__(self, plan: dict | None, marker: str, gc_log: str | None = None) -> None:
        self.plan = plan
        self.marker = marker
        self.gc_log = gc_log
        self.counts: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()

    def record(self, rec: dict) -> None:
        """Append one JSON line to the trial's collection log (one write: it survives the SIGKILL that may follow)."""
        if self.gc_log is None:
            return
        fd = os.open(self.gc_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (json.dumps(rec) + "\n").encode())
        finally:
            os.close(fd)

    def claim(self, point: str) -> int:
        """Count a pass through ``point``; return its number if it is the planned pass (the caller dies), else 0."""
        with self.lock:
            self.counts[point] += 1
            n = self.counts[point]
        return n if self.plan is not None and self.plan["point"] == point and n == self.plan["k"] else 0

    def hit(self, point: str, **info) -> None:
        """Pass through ``point``; die here if this is the planned pass."""
        n = self.claim(point)
        shm_event(f"{point} {info.get('name', '')}")
        if n:
            self.die(point, n, **info)

    def die(self, point: str, n: int, **info) -> None:
        rec = {"point": point, "phase": PHASE_OF[point], "k": n, "time": time.time(),
               "thread": threading.current_thread().name, **info}
        with open(self.marker, "w") as f:
            f.write(json.dumps(rec))
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # never reached


def _ckpt_name_of(path: str) -> str:
    """``.../.partial-step=000007~<owner>~<id>/x``, ``.../.trash-step=000007~...`` or ``.../step=000007[/x]`` ->
    ``step=000007``."""
    for part in reversed(os.path.normpath(path).split(os.sep)):
        for prefix in (".partial-", ".trash-"):
            if part.startswith(prefix):
                return part[len(prefix):].split("~", 1)[0]
        if part.startswith("step="):
            return part
    return ""


def _name_of_key(key: str) -> str:
    return key.rsplit("/", 2)[-2] if key.count("/") >= 1 else ""


def install_kill_points(kp: KillPoints) -> None:
    """Wrap the store's methods that each phase goes through (only in the forked child): the filesystem calls of
    ``store.local.OPS``, the local store and transaction, and the S3 store and transaction. Nothing else is patched:
    the kills land exactly where the one commit protocol and deletion path run."""
    ops = store_fs.OPS

    # -- write: shard and state files inside the .partial folder (OPS.write_all), each file complete
    real_write_all = ops.write_all

    def write_all(fd, data):
        path = os.readlink(f"/proc/self/fd/{fd}")
        in_partial = "/.partial-" in path
        if in_partial and not path.endswith("/manifest.json"):
            n = kp.claim("write.mid_file")
            if n:
                mv = memoryview(data).cast("B")
                half = len(mv) // 2
                if half:  # (an O_DIRECT descriptor takes only aligned writes: through the page cache)
                    store_direct.write_through_cache(fd, bytes(mv[:half]))
                kp.die("write.mid_file", n, path=path, name=_ckpt_name_of(path), bytes_written=half, of=len(mv))
        elif in_partial:  # the manifest, written last into the partial folder
            n = kp.claim("commit.mid_manifest")
            if n:
                mv = memoryview(data).cast("B")
                store_direct.write_through_cache(fd, bytes(mv[: len(mv) // 2]))
                kp.die("commit.mid_manifest", n, path=path, name=_ckpt_name_of(path), bytes_written=len(mv) // 2,
                       of=len(mv))
        return real_write_all(fd, data)

    ops.write_all = write_all

    real_write_file = store_local.LocalTransaction.write_file

    def write_file(tx, encoded):
        rec = real_write_file(tx, encoded)
        kp.hit("write.after_file", path=tx.file(encoded.name), name=tx.name)
        return rec

    store_local.LocalTransaction.write_file = write_file

    # -- commit: the transaction's commit (manifest, rename), then latest.json
    real_commit = store_local.LocalTransaction.commit

    def commit(tx, manifest, **kw):
        if manifest is not None:
            kp.hit("commit.before_manifest", name=tx.name)
        return real_commit(tx, manifest, **kw)

    store_local.LocalTransaction.commit = commit

    real_rename = ops.rename

    def rename(src, dst):
        if "/.partial-" in src and f"/{BLOBS}/" not in dst:  # (a pack moving into .blobs is gc.after_adopt)
            kp.hit("commit.before_rename", path=src, name=_ckpt_name_of(dst))
            real_rename(src, dst)
            kp.hit("commit.after_rename", path=dst, name=_ckpt_name_of(dst))
            return
        real_rename(src, dst)
        if "/.trash-" in dst:
            kp.hit("retention.after_trash", path=dst, name=_ckpt_name_of(dst))

    ops.rename = rename

    real_publish = store_local.LocalStore.publish_latest
    in_latest = threading.local()

    def publish_latest(store, doc):
        name = doc.get("name", "")
        kp.hit("commit.before_latest", path=store.root, name=name)
        in_latest.name = name
        try:
            real_publish(store, doc)
        finally:
            in_latest.name = None
        kp.hit("commit.after_latest", path=store.root, name=name)

    store_local.LocalStore.publish_latest = publish_latest

    real_replace = ops.replace

    def replace(src, dst):
        name = getattr(in_latest, "name", None)
        if name is not None and dst.endswith("latest.json"):
            kp.hit("commit.mid_latest", path=src, name=name)
        return real_replace(src, dst)

    ops.replace = replace

    # -- retention: out of the listing (a rename to .trash-*), then a background removal
    real_trash = store_local.LocalStore.trash

    def trash(store, name):
        kp.hit("retention.before_trash", names=[name], name=name)
        return real_trash(store, name)

    store_local.LocalStore.trash = trash

    real_purge = store_local.LocalStore.purge

    def purge(store, path):
        kp.hit("retention.before_remove", path=path, name=_ckpt_name_of(path))
        n = kp.claim("retention.mid_remove")
        if n:
            files = sorted(os.listdir(path))
            gone = files[: max(1, len(files) // 2)]
            for f in gone:  # what rmtree does, interrupted half way
                os.unlink(os.path.join(path, f))
            kp.die("retention.mid_remove", n, path=path, name=_ckpt_name_of(path), removed=gone)
        return real_purge(store, path)

    store_local.LocalStore.purge = purge

    # -- upload: data objects (parallel), manifest.json (the commit on S3), latest.json; S3 retention; restore
    real_put = store_s3.S3Transaction.put_file

    def put_file(tx, fname, path, progress=None, metadata=None):
        key = tx.store.key(tx.name, fname)
        kp.hit("upload.before_object", key=key, name=tx.name)
        n = kp.claim("upload.mid_object")

        def die_mid_upload(nbytes, _n=n):  # s3transfer calls it as the request body is read and sent
            kp.die("upload.mid_object", _n, key=key, name=tx.name, sent=nbytes)

        real_put(tx, fname, path, die_mid_upload if n else progress, metadata)
        kp.hit("upload.after_object", key=key, name=tx.name)

    store_s3.S3Transaction.put_file = put_file

    real_s3_commit = store_s3.S3Transaction.commit

    def s3_commit(tx, manifest, **kw):
        kp.hit("upload.before_manifest", key=tx.store.key(tx.name, "manifest.json"), name=tx.name)
        out = real_s3_commit(tx, manifest, **kw)
        kp.hit("upload.after_manifest", key=tx.store.key(tx.name, "manifest.json"), name=tx.name)
        return out

    store_s3.S3Transaction.commit = s3_commit

    real_s3_publish = store_s3.S3Store.publish_latest

    def s3_publish(store, doc):
        real_s3_publish(store, doc)
        kp.hit("upload.after_latest", key=store.key("latest.json"), name=doc.get("name", ""))

    store_s3.S3Store.publish_latest = s3_publish

    real_uncommit = store_s3.S3Store.uncommit

    def uncommit(store, name):
        kp.hit("retention.s3_before_delete", key=store.key(name, "manifest.json"), name=name)
        real_uncommit(store, name)
        kp.hit("retention.s3_after_manifest", key=store.key(name, "manifest.json"), name=name)

    store_s3.S3Store.uncommit = uncommit

    real_download = store_s3.S3Store.download

    def download(store, key, dest, size, progress=None):
        real_download(store, key, dest, size, progress)
        kp.hit("restore.after_download", key=key, name=_name_of_key(key), path=dest)

    store_s3.S3Store.download = download

    install_gc_points(kp)
    install_lock_points(kp)


def _local_references(blobs) -> tuple[set[str], bool]:
    """The packs the committed manifests of ``blobs``' folder reference, and whether every manifest could be read."""
    store = store_local.LocalStore(blobs.root)
    out: set[str] = set()
    for name in store.names():
        try:
            m, _ = store.read_manifest(name)
        except CheckpointNotFoundError:
            continue
        except CheckpointError:
            return out, False
        out.update((m.get("packs") or {}).keys())
    return out, True


def install_gc_points(kp: KillPoints) -> None:
    """The content store: a pack's adoption into ``.blobs`` (inside the commit), the sweep of a collection (its
    unlinks), the upload of a pack and the S3 pack collection (its deletion request). Each collection is also
    checked as it ends: what it leaves must be referenced (``KillPoints.record``, asserted by the test)."""
    ops = store_fs.OPS

    real_adopt = store_blobs.BlobStore.adopt

    def adopt(blobs, src_folder, names):
        names = list(names)
        real_adopt(blobs, src_folder, names)
        if names:
            kp.hit("gc.after_adopt", name=_ckpt_name_of(src_folder), packs=names)

    store_blobs.BlobStore.adopt = adopt

    sweep = threading.local()  # .n: packs this thread's collection removed so far (None: not collecting)
    real_unlink = ops.unlink

    def unlink(path):
        n = getattr(sweep, "n", None)
        if n is None or f"/{BLOBS}/" not in path or not PACK_RE.match(os.path.basename(path)):
            return real_unlink(path)
        if n == 0:
            kp.hit("gc.before_sweep", path=path)
        real_unlink(path)
        sweep.n = n + 1
        kp.hit("gc.mid_sweep", path=path, removed=n + 1)

    ops.unlink = unlink

    real_collect = store_blobs.BlobStore.collect

    def collect(blobs, *args, dry_run=False, **kwargs):  # (store, ...): whatever the real one takes, passed on
        if dry_run:
            return real_collect(blobs, *args, dry_run=True, **kwargs)
        with blobs.lock:  # no commit in between: what the manifests reference now is what the collection sees
            referenced, readable = _local_references(blobs)
            pinned = blobs.pinned()
            sweep.n = 0
            try:
                out = real_collect(blobs, *args, **kwargs)
            finally:
                sweep.n = None
            left = set(blobs.names()) - referenced - pinned - blobs.pinned()
            kp.record({"where": "local", "removed": out[0], "left": sorted(left) if readable else [],
                       "readable": readable})
        return out

    store_blobs.BlobStore.collect = collect

    real_put = store_s3.S3Store.put_file

    def put_file(store, key, path, progress=None, metadata=None):
        real_put(store, key, path, progress, metadata)
        if f"/{BLOBS}/" in key:
            kp.hit("gc.s3_after_pack", key=key)

    store_s3.S3Store.put_file = put_file

    s3_sweep = threading.local()
    real_delete_keys = store_s3.S3Store.delete_keys

    def delete_keys(store, keys):
        if getattr(s3_sweep, "on", False) and keys:
            n = kp.claim("gc.s3_mid_collect")
            if n:
                gone = keys[: max(1, len(keys) // 2)]
                real_delete_keys(store, gone)
                kp.die("gc.s3_mid_collect", n, deleted=gone, kept=keys[len(gone):])
        return real_delete_keys(store, keys)

    store_s3.S3Store.delete_keys = delete_keys

    real_s3_collect = store_s3.S3Store.collect_packs
    real_list_objects = store_s3.S3Store.list_objects
    real_manifests = store_s3.S3Store.manifests

    def list_objects(store, sub=""):  # the collection's own listings, kept for the check after it (no extra LIST)
        out = real_list_objects(store, sub)
        seen = getattr(s3_sweep, "seen", None)
        if seen is not None and sub == BLOBS:
            seen.setdefault("packs", out)
        return out

    def manifests(store):
        out = real_manifests(store)
        seen = getattr(s3_sweep, "seen", None)
        if seen is not None:
            seen.setdefault("manifests", out)
        return out

    store_s3.S3Store.list_objects = list_objects
    store_s3.S3Store.manifests = manifests

    def collect_packs(store, *, grace_s=3600.0, mine=frozenset(), dry_run=False):
        if dry_run:
            return real_s3_collect(store, grace_s=grace_s, mine=mine, dry_run=True)
        grace_s, mine = S3_PACK_GRACE_S, set(mine)
        now = dt.datetime.now(dt.timezone.utc)  # before the collection reads its clock: a pack is older there
        s3_sweep.on, s3_sweep.seen = True, {}
        try:
            out = real_s3_collect(store, grace_s=grace_s, mine=mine)
        finally:
            s3_sweep.on, seen, s3_sweep.seen = False, s3_sweep.seen, None
        # what the collection saw: the packs listed, and the manifests, unless it found none (then nothing is due)
        listed = {o["Key"].rsplit("/", 1)[-1]: o for o in seen.get("packs", ())}
        listed = {n: o for n, o in listed.items() if PACK_RE.match(n)}
        referenced, readable = set(), True
        for _, m in seen.get("manifests", ()):
            if isinstance(m, CheckpointError):
                readable = False
            else:
                referenced.update((m.get("packs") or {}).keys())
        due = {n for n, o in listed.items() if n not in referenced
               and (n in mine or (now - o["LastModified"]).total_seconds() >= grace_s)}
        after = {o["Key"].rsplit("/", 1)[-1] for o in real_list_objects(store, BLOBS)} if due else set()
        kp.record({"where": "s3", "removed": out[0], "left": sorted(due & after) if readable else [],
                   "readable": readable})
        return out

    store_s3.S3Store.collect_packs = collect_packs

    real_copyfile = shutil.copyfile

    def copyfile(src, dst, *args, **kwargs):  # a pull (restore) copies the packs it fetched into .blobs
        if f"/{BLOBS}/" in str(dst):
            n = kp.claim("restore.mid_pack_copy")
            if n:
                with open(src, "rb") as fi, open(dst, "wb") as fo:
                    data = fi.read()
                    fo.write(data[: len(data) // 2])
                kp.die("restore.mid_pack_copy", n, path=str(dst), bytes_written=len(data) // 2, of=len(data))
        return real_copyfile(src, dst, *args, **kwargs)

    shutil.copyfile = copyfile


def install_lock_points(kp: KillPoints) -> None:
    """The folder's lock (``store/lock.py``): killed holding it, the relaunch must take it over (the kernel releases
    a dead process's flock)."""
    real_flock = fcntl.flock

    def flock(fd, op):
        real_flock(fd, op)
        if op & fcntl.LOCK_EX:
            num = fd if isinstance(fd, int) else fd.fileno()
            path = os.readlink(f"/proc/self/fd/{num}")
            if os.path.basename(path) == LOCK_FILE:
                kp.hit("lock.after_flock", path=path)

    fcntl.flock = flock

    real_acquire = store_lock.FolderLock.acquire

    def acquire(lock, info):
        real_acquire(lock, info)
        kp.hit("lock.after_acquire", path=lock.path)

    store_lock.FolderLock.acquire = acquire


# ------------------------------------------------------------------------------------------------ child bodies
class Probe(pl.Callback):
    """Records where training is (in shared memory) and stops after ``budget`` steps in this process.

    Non-checkpoint callbacks run before the checkpoint callbacks in each hook, so when ``progress = p`` is recorded
    at the start of a batch, the save of step ``p`` was requested and the one of step ``p - 1`` is committed.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.start_step = 0

    def on_train_start(self, trainer, pl_module):
        self.start_step = int(trainer.global_step)
        struct.pack_into("<q", _SHM, _OFF_START_STEP, self.start_step)
        struct.pack_into("<d", _SHM, _OFF_STARTED, time.monotonic())  # CLOCK_MONOTONIC: the same in every process
        shm_event(f"train_start@{self.start_step}")
        if _START_FD is not None:
            os.write(_START_FD, b"s")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        struct.pack_into("<q", _SHM, _OFF_PROGRESS, int(trainer.global_step))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.start_step + self.budget:
            trainer.should_stop = True


def _child_common(log_path: str) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the server
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(threadName)s %(name)s: %(message)s", force=True)


def child_trial(cmd: dict) -> int:
    t0 = time.monotonic()
    kp = KillPoints(cmd.get("plan"), cmd["marker"], cmd.get("gc_log"))
    install_kill_points(kp)
    pl.seed_everything(int(cmd.get("seed", 0)), verbose=False)
    callbacks, ckpt_path = training_setup(cmd["dir"], cmd["uri"])
    how = "resume='auto'" if BUILTIN_BACKUP_AND_RESUME else f"ckpt_path={ckpt_path}"
    print(f"[trial {cmd.get('trial')}] fit with {how} (set up in {time.monotonic() - t0:.3f}s)", flush=True)
    model, data = make_model_and_data()
    trainer = make_trainer([Probe(int(cmd["budget"])), BackboneRefresh(), *callbacks], MAX_STEPS)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    print(f"[trial {cmd.get('trial')}] finished at global_step={trainer.global_step}", flush=True)
    if cmd.get("counts_file"):
        with open(cmd["counts_file"], "w") as f:
            json.dump(dict(kp.counts), f)
    return 0


def child_resume(cmd: dict) -> int:
    """Resume a Trainer from ``path`` for ``steps`` steps into a scratch folder; exit 0 if it got there."""
    path, steps = cmd["path"], int(cmd["steps"])
    start = int(read_checkpoint_manifest(path)["step"])
    pl.seed_everything(0, verbose=False)
    model, data = make_model_and_data()
    trainer = make_trainer([PeriodicCheckpoint(cmd["dir"], every_n_train_steps=1)], start + steps)
    trainer.fit(model, data, ckpt_path=path)
    got = latest_checkpoint(cmd["dir"])
    ok = trainer.global_step == start + steps and got is not None and os.path.basename(got) == f"step={start + steps:06d}"
    print(f"resumed {path} at step {start}: global_step={trainer.global_step} latest={got}", flush=True)
    return 0 if ok else 1


def run_child(body, cmd: dict) -> None:
    """In the forked child: never returns."""
    code = 3
    try:
        _child_common(cmd["log"])
        code = body(cmd)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        code = 3
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


# ------------------------------------------------------------------------------------------------ server
def _tail(path: str, n: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def fork_and_wait(body, cmd: dict) -> dict:
    threads = _os_threads()
    if threads != 1:
        return {"outcome": "error", "error": f"the fork server has {threads} threads; forking now could deadlock the child"}
    shm_reset()
    global _START_FD
    started_r, started_w = os.pipe()  # the child writes a byte when training starts
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(started_r)
        _START_FD = started_w
        run_child(body, cmd)
    os.close(started_w)
    try:
        pidfd = os.pidfd_open(pid)  # readable when the child exits: wait on events, not by polling
    except (AttributeError, OSError):
        pidfd = None
    rk = cmd.get("random_kill")  # {"after": "fork"|"train", "delay": seconds}
    deadline = t0 + float(cmd.get("timeout", 120))
    kill_at = t0 + float(rk["delay"]) if rk is not None and rk["after"] == "fork" else None
    killed_by_server = False
    kill_time = None
    watch_start = True
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            now = time.monotonic()
            if kill_at is not None and not killed_by_server and now >= kill_at:
                os.kill(pid, signal.SIGKILL)
                killed_by_server, kill_time = True, now - t0
                continue
            if now >= deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return {"outcome": "timeout", "wall": round(now - t0, 3), **shm_read(), "log_tail": _tail(cmd["log"])}
            wait_s = deadline - now
            if kill_at is not None and not killed_by_server:
                wait_s = min(wait_s, kill_at - now)
            fds = ([pidfd] if pidfd is not None else []) + ([started_r] if watch_start else [])
            if pidfd is None:
                wait_s = min(wait_s, 0.005)
            ready, _, _ = select.select(fds, [], [], max(0.0, wait_s))
            if started_r in ready:
                watch_start = False  # a byte (training started) or EOF (the child is gone)
                if os.read(started_r, 16) and rk is not None and rk["after"] == "train":
                    kill_at = time.monotonic() + float(rk["delay"])
    finally:
        os.close(started_r)
        if pidfd is not None:
            os.close(pidfd)
    wall = time.monotonic() - t0
    rep = {"wall": round(wall, 3), **shm_read()}
    if os.WIFSIGNALED(status):
        rep["signal"] = os.WTERMSIG(status)
        rep["outcome"] = "killed"
    else:
        rep["rc"] = os.WEXITSTATUS(status)
        rep["outcome"] = "exit"
    rep["killed_by_server"] = killed_by_server
    if kill_time is not None:
        rep["kill_time"] = round(kill_time, 3)
    if rep["train_started"]:
        rep["train_start_s"] = round(rep["train_started"] - t0, 3)  # from fork to the first batch
    marker = cmd.get("marker")
    if marker and os.path.exists(marker):
        with open(marker) as f:
            rep["fired"] = json.loads(f.read() or "null")
    else:
        rep["fired"] = None
    if cmd.get("counts_file") and os.path.exists(cmd["counts_file"]):
        with open(cmd["counts_file"]) as f:
            rep["counts"] = json.load(f)
    if rep["outcome"] != "killed" or rep.get("signal") != signal.SIGKILL or cmd.get("always_tail"):
        rep["log_tail"] = _tail(cmd["log"])
    return rep


def main() -> None:
    run_info()  # computed once here, not in every child (it runs `git`)
    out = sys.stdout
    out.write(json.dumps({"ready": True, "pid": os.getpid(), "threads": _os_threads()}) + "\n")
    out.flush()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        cmd = json.loads(line)
        op = cmd.get("op")
        if op == "quit":
            break
        try:
            if op == "env":  # the S3 server's address and credentials, known once it is up
                os.environ.update(cmd["env"])
                store_s3.client()  # warm boto3's loaded service model, which every child would otherwise load again
                rep = {"outcome": "ok"}
            elif op == "trial":
                rep = fork_and_wait(child_trial, cmd)
            elif op == "resume":
                rep = fork_and_wait(child_resume, cmd)
            else:
                rep = {"outcome": "error", "error": f"unknown op {op!r}"}
        except Exception:  # noqa: BLE001
            rep = {"outcome": "error", "error": traceback.format_exc()}
        rep["op"] = op
        rep["id"] = cmd.get("id")
        out.write(json.dumps(rep) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
