"""Copying committed checkpoints between a local folder and S3: ``push`` (upload) and ``pull`` (download), each a
transaction of the destination store, so an interrupted copy is never seen as a checkpoint.

A push uploads every data object (with its whole-file CRC32C as object metadata), verifying the local copy while
the objects go up, then the manifest (the commit on S3), then ``latest.json``. Pushing a checkpoint that is already
there repairs it: objects that are missing, of the wrong size, or whose recorded checksum differs from the manifest's
are uploaded again, so after a push the remote copy verifies. Packs of the content store already there are not sent
again; a push that references one marks it as reused right before its commit (a collection in another process then
leaves it alone) and checks it is still there after the commit. A pull downloads into a partial folder, fsyncs and
verifies every byte, then commits it (replacing an older local copy of the same name atomically), under the local
folder's lock: never into a folder another process's run is writing; a checkpoint already there with the same
manifest is verified and kept.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import stat
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..errors import CheckpointError, CheckpointNotFoundError
from ..format import manifest as mf
from ..format.tensorfile import file_crc32c
from ..read import Opened, verify_files, verify_checkpoint
from ..store import LocalStore, locate, open_store
from ..store.blobs import BlobStore
from ..store.fs import OPS, open_member
from ..store.lock import FolderBusyError

log = logging.getLogger("lightning_ckpt")

ProgressFn = Optional[Callable[[int], None]]
CRC_META = "lc-crc32c"  # object metadata: the CRC32C of the whole file, as the manifest's regions give it


@dataclass
class TransferResult:
    uri: str
    files: int
    bytes: int
    packs: tuple[str, ...] = ()  # packs of the content store sent (the others were there already)


def remote_location(dest: Any, what: Any = None) -> Any:
    """The store of an ``s3://bucket/prefix`` location (a push's destination, a backup location: copies go to another
    machine's storage, never to a local folder), or ValueError saying how to write one (``what``: the argument)."""
    try:
        store = open_store(dest)
    except ValueError as e:
        if what is None:
            raise
        raise ValueError(f"{what}: {e}") from None
    if not store.remote:  # the one question of this kind here: what the user named must be a remote location
        raise ValueError(f"{what}={dest!r} is not a remote location; write it as s3://bucket/prefix" if what else
                         f"{dest!r} is not a remote location; write it as s3://bucket/prefix")
    return store


_remote = remote_location


def _stale(store: Any, keys: dict[str, dict], listed: dict[str, dict]) -> list[str]:
    """The names among ``keys`` (name -> manifest entry) whose object (``listed``: name -> listing, of the same folder
    at the S3 ``store``) is missing, of another size, or was uploaded with another checksum (or none)."""
    bad = []
    for fname, entry in sorted(keys.items()):
        obj = listed.get(fname)
        if obj is None or int(obj.get("Size", -1)) != int(entry["size"]):
            bad.append(fname)
            continue
        meta = store.head(obj["Key"]).get("Metadata") or {}
        if meta.get(CRC_META) != f"{file_crc32c(entry):08x}":
            bad.append(fname)
    return bad


def stale_objects(store: Any, name: str, m: dict) -> list[str]:
    """Files of checkpoint ``name`` at the S3 ``store`` that do not hold what manifest ``m`` says."""
    return _stale(store, m["files"], store.objects(name))


def _push_packs(src: Any, remote: Any, m: dict, progress: ProgressFn) -> tuple[int, list[str], list[str]]:
    """Upload the packs of the content store that ``m`` references and ``remote`` lacks (or holds damaged): a pack
    never changes under its name, so one already there is never sent again. Returns the bytes and packs sent, and
    the packs found there (reused: see :func:`_keep_reused`)."""
    packs = m.get("packs") or {}
    if not packs:
        return 0, [], []
    listed, _ = remote.blob_listing()
    folder = src.packs_folder(packs)
    sent, names = 0, []
    for pack in _stale(remote, packs, listed):
        remote.put_file(remote.key(mf.BLOBS, pack), os.path.join(folder, pack), progress,
                        {CRC_META: f"{file_crc32c(packs[pack]):08x}"})
        sent += int(packs[pack]["size"])
        names.append(pack)
    return sent, names, sorted(set(packs) - set(names))


def _upload_missing_packs(src: Any, remote: Any, m: dict, names: list[str], progress: ProgressFn) -> list[str]:
    """Upload again those of the packs ``names`` (referenced by ``m``) that are not at ``remote`` with their size;
    returns them."""
    packs = m.get("packs") or {}
    gone = [n for n in names
            if int(remote.head(remote.key(mf.BLOBS, n)).get("ContentLength", -1)) != int(packs[n]["size"])]
    if gone:
        folder = src.packs_folder(packs)
        for n in gone:
            remote.put_file(remote.key(mf.BLOBS, n), os.path.join(folder, n), progress,
                            {CRC_META: f"{file_crc32c(packs[n]):08x}"})
    return gone


def _keep_reused(src: Any, remote: Any, m: dict, reused: list[str], progress: ProgressFn) -> None:
    """Right before the commit: the packs this push found at ``remote`` and did not upload get a fresh reuse mark,
    so a collection in another process (which may have judged them unreferenced before this manifest existed)
    leaves them alone (``S3Store.collect_packs``); one collected before the mark is uploaded again."""
    if not reused:
        return
    remote.mark_reused(reused)
    gone = _upload_missing_packs(src, remote, m, reused, progress)
    if gone:
        log.info("lightning_ckpt: %s: pack(s) %s were collected since this push found them; uploaded again",
                 remote.uri, ", ".join(gone))


def push_checkpoint(path: Any, dest: Any, *, progress: ProgressFn = None, verify: bool = True) -> TransferResult:
    """Upload the committed checkpoint at ``path`` to ``dest`` (``s3://bucket/prefix``): it becomes
    ``s3://bucket/prefix/<name>/``, and ``s3://bucket/prefix/latest.json`` points at it (never back to an older step).
    With ``verify`` (default) a local copy that fails verification is not committed on S3 (``CheckpointCorruptError``).
    A copy already at ``dest`` is checked object by object and repaired."""
    src, name = locate(path)
    m, raw = src.read_manifest(name)
    folder = src.local_folder(name)
    remote = _remote(dest)
    # each member a regular file of its size inside the folder, never through a link, before a byte goes up (the
    # upload opens it by path; the concurrent verification catches a swap after this check)
    for fname, entry in m["files"].items():
        os.close(open_member(folder, fname, int(entry["size"])))
    packs = m.get("packs") or {}
    packs_at = src.packs_folder(packs) if packs else ""
    for pack, entry in packs.items():
        os.close(open_member(packs_at, pack, int(entry["size"])))
    try:
        existing = remote.get_bytes(remote.key(name, mf.MANIFEST), 64 << 20)
    except CheckpointNotFoundError:
        existing = None
    if existing == raw:  # committed there before: re-upload only what does not match
        files = stale_objects(remote, name, m)
        if files:
            log.warning("lightning_ckpt: %s/%s had %d damaged or missing object(s) (%s); uploading them again",
                        remote.uri, name, len(files), ", ".join(files))
    else:
        files = sorted(m["files"])
        if existing is not None:
            # another checkpoint of that name is there: un-commit it first, so that an interrupted overwrite is never
            # listed as a checkpoint whose files do not match its manifest
            remote.uncommit(name)
    total, packs_sent, reused = _push_packs(src, remote, m, progress)  # before the manifest that references them
    tx = remote.begin(name)

    def up(fname: str) -> int:
        tx.put_file(fname, os.path.join(folder, fname), progress, {CRC_META: f"{file_crc32c(m['files'][fname]):08x}"})
        return int(m["files"][fname]["size"])

    if files:
        # the local copy is verified while its objects go up (read from the page cache, off the upload's critical
        # path); the manifest, which makes the checkpoint visible on S3, goes up only if every byte checked out
        with cf.ThreadPoolExecutor(1) as vex:
            checked = vex.submit(verify_checkpoint, path) if verify else None
            try:
                with cf.ThreadPoolExecutor(4) as ex:
                    total += sum(ex.map(up, files))
            finally:
                bad = checked.exception() if checked is not None else None
            if bad is not None:
                if existing != raw:
                    tx.abort()  # never committed: remove what went up
                raise bad
    if files or existing != raw:
        _keep_reused(src, remote, m, reused, progress)
        tx.commit(raw, if_exists="replace")  # the commit point on S3
        if reused:  # a collection's delete already on its way when the marks were written: put the pack back
            gone = _upload_missing_packs(src, remote, m, reused, progress)
            if gone:
                log.warning("lightning_ckpt: %s/%s: pack(s) %s were deleted by a collection elsewhere while this push "
                            "committed; uploaded them again", remote.uri, name, ", ".join(gone))
    remote.last_commit = (name, raw)  # for the index of latest.json (store/hint.py): no GET of what was just pushed
    remote.publish_latest({"name": name, "step": m["step"], "epoch": m.get("epoch")})
    return TransferResult(remote.path(name), len(files) + 1, total + len(raw), tuple(packs_sent))


def pull_checkpoint(src: Any, dest_dir: Any, *, progress: ProgressFn = None) -> str:
    """Download the checkpoint at ``src`` (``s3://bucket/prefix/<name>``, or ``s3://bucket/prefix`` for the one its
    ``latest.json`` names) into ``dest_dir/<name>``, verify every byte, and return the local path."""
    store, name = locate(src)
    try:
        got = store.read_manifest(name)
    except CheckpointNotFoundError:
        store = _remote(src)  # a run folder: take the checkpoint its latest.json names
        latest = store.read_latest()
        if latest is None:
            raise CheckpointNotFoundError(
                f"nothing to pull: {src} does not exist as a committed checkpoint, and has no latest.json. List what is "
                f"there with `lightning-ckpt ls {store.uri}`.") from None
        name = mf.check_member_name(latest.get("name"), store.path(mf.LATEST))
        got = store.read_manifest(name)
    m, raw = got
    local = LocalStore(dest_dir)
    local.makedirs()
    lock = _lock_for_pull(local)
    try:
        try:  # already here, the same checkpoint (another rank's pull of it, a repeated command): nothing to fetch
            if local.read_manifest(name)[1] == raw:
                verify_checkpoint(local.path(name))
                return local.path(name)
        except CheckpointError:
            pass  # absent, or damaged: fetched again and replaced atomically
        return _pull_into(store, name, m, raw, local, progress)
    finally:
        if lock is not None:
            lock.release()


PULL_RUN_ID = "lightning-ckpt pull"
PULL_WAIT_S = 3600.0  # the longest wait for another process's pull into the same folder


def _lock_for_pull(local: LocalStore) -> Any:
    """The folder's lock for a pull (None when this process holds it already). A run writing into the folder (another
    process) makes the pull fail at once with :class:`FolderBusyError`: it must not get a checkpoint and packs it did
    not write under its retention and collection. Another process's pull (each rank of a job pulling the newest
    backup for ``ckpt_path="last"``) is waited for."""
    deadline = time.monotonic() + PULL_WAIT_S
    while True:
        try:
            return local.lock_unless_mine({"run_id": PULL_RUN_ID})
        except FolderBusyError:
            holder = local.lock_holder()
            if holder is not None and (holder.get("run_id") != PULL_RUN_ID or time.monotonic() > deadline):
                raise
            time.sleep(0.1)


def _pull_into(store: Any, name: str, m: dict, raw: bytes, local: LocalStore, progress: ProgressFn) -> str:
    tx = local.begin(name).open()
    blobs = BlobStore(local.root, fsync=local.fsync)
    try:
        def down(fname: str) -> None:
            dst = tx.file(fname)
            store.download(store.key(name, fname), dst, m["files"][fname]["size"], progress)
            if local.fsync:
                OPS.fsync_file(dst)

        with cf.ThreadPoolExecutor(4) as ex:
            list(ex.map(down, sorted(m["files"])))
        packs = m.get("packs") or {}
        if packs:  # downloaded into the read cache, each checked as it arrives
            store.packs_folder(packs, progress=progress)
        with blobs.lock:  # this process collects no pack between their arrival and the commit
            if packs:  # into the local content store first, then the checkpoint
                _copy_packs(store.packs_folder(None), local, packs)
            verify_files(Opened(local, name, m, raw, tx.path), None)
            return local.path(tx.commit(raw, if_exists="replace"))
    except BaseException:
        tx.abort()
        raise


def _copy_packs(cache: str, local: LocalStore, packs: dict[str, dict]) -> None:
    """Put packs downloaded into the S3 read cache into ``local``'s content store (a pack already there is kept)."""
    import shutil

    BlobStore(local.root, fsync=local.fsync)._check_dir()  # never through a .blobs that is a link or a file
    blobs = LocalStore(local.packs_folder(None), fsync=local.fsync)
    blobs.makedirs()
    for pack in packs:
        try:  # lstat: a pack already there is a regular file of its size; a link or a FIFO under its name is replaced
            st = os.lstat(blobs.path(pack))
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == int(packs[pack]["size"]):
            continue
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise CheckpointError(f"{blobs.path(pack)} is a folder where a pack of the content store must be; move it "
                                  "away and pull again")
        with blobs.replacing(pack) as tmp:
            shutil.copyfile(os.path.join(cache, pack), tmp)
            if blobs.fsync:
                OPS.fsync_file(tmp)
