"""The local filesystem store: the commit protocol, the deletion path, the partial cleanup and the folder lock, once.

Every folder this package writes (run folders, S3 staging folders, stage caches, exports, HPO trial folders, the S3
read cache) goes through :class:`LocalStore`. The filesystem calls themselves go through :data:`OPS`, one
:class:`FsOps`: the fault-injection tests replace its methods (and those of the store classes) to kill a process at
each step of the protocol, so what is tested is exactly what runs.

Commit, locally (``LocalTransaction.commit``): every file is written and fsynced into ``.partial-<name>~<owner>~<id>``
-> ``manifest.json`` is written last and fsynced -> the partial folder is fsynced -> renamed to ``<name>`` (the commit
point) -> the parent is fsynced. ``publish_latest`` then replaces ``latest.json`` through a temp file and a rename.
Readers open members without following links, check that each is a regular file of the size the manifest says, and
never read more bytes than that (a FIFO, a device or a link planted in a checkpoint folder is refused, not read).

One cohesive object, the local side of the whole store contract (``store/base.py``): its length is that contract's.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from typing import Any, Iterable, Iterator

from ..errors import CheckpointError, CheckpointNotFoundError, CheckpointWriteError
from ..format import manifest as mf
from ..format.manifest import is_plain_name
from ..format.tensorfile import EncodedFile, FileRecord
from .base import (
    PROBE_PREFIX,
    SEP,
    TMP_PREFIX,
    TRASH_PREFIX,
    IfExists,
    Store,
    Transaction,
    check_entry_name,
    check_folder_file,
    check_if_exists,
    first_free,
    debris_in,
    new_id,
    owner_gone,
    owner_of,
    owner_token,
    partial_name,
)
from . import direct
from .blobs import BlobStore
from .fs import OPS, is_real_dir, is_real_file, open_member, read_member
from .listing import LISTINGS, changed as _changed
from .lock import FolderLock

log = logging.getLogger("lightning_ckpt")

MAX_MANIFEST_BYTES = 64 * 1024 * 1024

MAX_LATEST_BYTES = 16 << 20  # latest.json with the index of a folder of ~1M checkpoints (store/hint.py)


class LocalStore(Store):
    """A local folder of committed entries.

    Args:
        root: the folder (made absolute; created by writes, never by reads).
        fsync: make data, manifests and renames durable (off only for caches and throwaway runs).
    """

    remote = False
    last_commit: tuple[str, bytes] | None = None  # (name, manifest bytes) of this store object's latest commit

    def __init__(self, root: str | os.PathLike, *, fsync: bool = True) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.uri = self.root
        self.fsync = fsync

    def __repr__(self) -> str:
        return f"LocalStore({self.root!r})"

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    # ---------------------------------------------------------------- reading
    def exists(self) -> bool:
        return os.path.isdir(self.root)

    def names(self) -> list[str]:
        if not os.path.isdir(self.root):
            if os.path.exists(self.root):
                raise CheckpointNotFoundError(f"{self.root} is a file; pass the folder that holds the checkpoints")
            return []
        try:
            entries = os.listdir(self.root)
        except OSError as e:
            raise CheckpointError(f"cannot list {self.root} ({e.strerror or e})") from None
        return [e for e in entries if is_plain_name(e) and is_real_dir(os.path.join(self.root, e))
                and is_real_file(os.path.join(self.root, e, mf.MANIFEST))]

    def read_manifest(self, name: str) -> tuple[dict, bytes]:
        folder = self.path(name)
        if not is_real_dir(folder):
            if os.path.lexists(folder):
                what = "a symbolic link" if os.path.islink(folder) else "a file"
                raise CheckpointNotFoundError(
                    f"{folder} is {what}, not a lightning_ckpt checkpoint folder. Pass the folder that holds "
                    "manifest.json.")
            raise CheckpointNotFoundError(f"no checkpoint at {folder}: the folder does not exist")
        if not os.path.lexists(os.path.join(folder, mf.MANIFEST)):
            raise CheckpointNotFoundError(
                f"{folder} has no manifest.json, so it is not a committed checkpoint (it may be an interrupted save). "
                "Use latest_checkpoint(dirpath) to find the newest complete one.")
        where = os.path.join(folder, mf.MANIFEST)
        try:
            raw = read_member(folder, mf.MANIFEST, MAX_MANIFEST_BYTES, where=where)
        except CheckpointError:
            if not os.path.lexists(folder):  # deleted (retention) between the listing and the read
                raise CheckpointNotFoundError(f"{folder} was deleted while it was being read") from None
            raise
        return mf.parse_manifest(raw, where), raw

    def local_folder(self, name: str, files: Iterable[str] | None = None, manifest: tuple[dict, bytes] | None = None,
                     *, refresh: bool = False) -> str:
        return self.path(name)

    def packs_folder(self, entries: dict[str, dict] | None = None, *, refresh: bool = False) -> str:
        return os.path.join(self.root, mf.BLOBS)

    def manifests(self) -> list[tuple[str, dict | CheckpointError]]:
        got: list[tuple[str, dict | CheckpointError]] = []
        for name in sorted(self.names()):
            try:
                got.append((name, self.read_manifest(name)[0]))
            except CheckpointNotFoundError:
                continue  # deleted (retention) since the folder was listed
            except CheckpointError as err:
                got.append((name, err))
        return got

    def looks_committed(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.path(name), mf.MANIFEST))

    def kept(self, info: Any, order: Any) -> tuple[list, list] | None:
        """Kept while this process holds the folder's lock (``store/listing.py``): complete, since nobody else
        writes the folder then."""
        return LISTINGS.scan(self, lambda name: info(name, self.read_manifest(name)[0]), order)

    def listing_kept(self) -> bool:
        return LISTINGS.kept(self.root)

    def read_file(self, fname: str, limit: int, *, tail: bool = False) -> bytes | None:
        check_folder_file(fname)
        if not os.path.lexists(os.path.join(self.root, fname)):
            return None
        if not tail:
            return read_member(self.root, fname, limit, follow_folder=True)  # the user's folder
        with os.fdopen(open_member(self.root, fname, follow_folder=True), "rb", buffering=0) as f:  # never a link
            if os.fstat(f.fileno()).st_size > limit:
                f.seek(-limit, os.SEEK_END)
            return f.read(limit)

    def read_latest(self) -> dict | None:
        try:
            raw = read_member(self.root, mf.LATEST, MAX_LATEST_BYTES, follow_folder=True)  # the user's folder
            doc = json.loads(raw)
        except (CheckpointError, OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    # ---------------------------------------------------------------- writing
    def makedirs(self) -> None:
        os.makedirs(self.root, exist_ok=True)

    def begin(self, name: str, tx_id: str | None = None, owner: str | None = None) -> "LocalTransaction":
        check_entry_name(name)
        return LocalTransaction(self, name, tx_id or new_id(), owner)

    def publish_latest(self, doc: dict, manifest: tuple[dict, bytes] | None = None) -> None:
        from .hint import hint_json, publish_local, written_local

        self.write_atomic(mf.LATEST, hint_json(publish_local(self, doc, manifest)))
        written_local(self.root)

    def newest_hinted(self, run_name: Any, any_run: bool) -> list[tuple[str, dict]] | None:
        """The newest checkpoint of a run through ``latest.json`` (``store/hint.py``), or None: list the folder."""
        from .hint import newest

        return newest(self, run_name, any_run)

    def write_atomic(self, fname: str, data: bytes) -> None:
        """Replace the file ``fname`` of the folder: readers see the old or the new content, never a part."""
        with self.replacing(check_folder_file(fname)) as tmp:
            OPS.write_file(tmp, data, fsync=self.fsync)

    @contextlib.contextmanager
    def replacing(self, fname: str) -> Iterator[str]:
        """A temp path in the folder; when the block succeeds it replaces ``fname`` atomically (fsynced as the
        store is), when it fails it is removed."""
        self.makedirs()
        dst = os.path.join(self.root, fname)
        tmp = os.path.join(self.root, f"{TMP_PREFIX}{fname[:100]}{SEP}{owner_token()}{SEP}{new_id()}")
        try:
            yield tmp
            OPS.replace(tmp, dst)
        except BaseException:
            OPS.unlink(tmp)
            raise
        if self.fsync:
            OPS.fsync_dir(self.root)

    def taken(self, name: str) -> list[str]:
        """Committed or not, the names of this folder that a new entry ``name`` may not take (``name``, ``name-vN``)."""
        try:
            entries = os.listdir(self.root)
        except OSError:
            return []
        return [e for e in entries if e == name or e.startswith(name + "-v")]

    # ---------------------------------------------------------------- deleting
    def trash(self, name: str) -> str | None:
        """Take entry ``name`` out of the listing atomically (a rename); returns where it went, None if it was gone."""
        if not is_plain_name(name):
            return None
        trash = os.path.join(self.root, f"{TRASH_PREFIX}{name}{SEP}{owner_token()}{SEP}{new_id()}")
        try:
            OPS.rename(self.path(name), trash)
        except FileNotFoundError:
            return None
        _changed(self.root, name)
        return trash

    def purge(self, trash: str) -> None:
        """Remove the bytes of an entry :meth:`trash` took out of the listing."""
        OPS.rmtree(trash)

    def delete(self, name: str, *, collect: bool = False, lock: Any = None) -> bool:
        trash = self.trash(name)
        if trash is not None:
            self.purge(trash)
        if collect:
            self.collect_orphans(lock=lock)
        return trash is not None

    def may_collect(self, lock: Any = None) -> bool:
        return self.owns(lock) or FolderLock(self.root).mine() or not self.live_writer()

    def owns(self, lock: Any = None) -> bool:
        """With locks disabled (``LIGHTNING_CKPT_LOCK=0``) nobody owns the folder: a leftover is debris only when its
        writer is gone (a disabled lock disables waiting, not safety)."""
        if lock is not None:
            return bool(lock.held)
        return FolderLock.enabled() and self.lock_holder() is None

    def live_writer(self) -> bool:
        return any(not owner_gone(owner_of(os.path.basename(p))) for p in self.debris(everyone=True)
                   if not os.path.basename(p).startswith(TRASH_PREFIX))

    def debris(self, everyone: bool = False, older_than_s: float = 3600.0) -> list[str]:
        """Paths of what interrupted writes and deletions left: trash always; partial, temp and probe entries whose
        writer is gone (``everyone``: all of them, for the holder of the folder's lock, who alone writes there)."""
        return debris_in(self.root, everyone)

    def cleanup(self, everyone: bool = False, older_than_s: float = 3600.0) -> list[str]:
        """Remove :meth:`debris`; returns the paths removed (``older_than_s`` is unused: every partial name here
        carries its writer, ``owners_recorded``)."""
        removed = []
        for p in self.debris(everyone):
            if is_real_dir(p):
                OPS.rmtree(p)
            else:
                OPS.unlink(p)
            removed.append(p)
        if removed:
            log.warning("lightning_ckpt: removed %d leftover partial save(s) in %s", len(removed), self.root)
        return removed

    # ---------------------------------------------------------------- the content store
    def pack_names(self) -> list[str]:
        return BlobStore(self.root).names()

    def pack_sizes(self) -> dict[str, int]:
        return BlobStore(self.root).sizes()

    def collect_packs(self, *, mine: "set[str] | frozenset" = frozenset(), grace_s: float = 3600.0,
                      dry_run: bool = False) -> tuple[list[str], int]:
        """Local packs are pinned by the writers that reuse them (``BlobStore.pin``): no grace period is needed."""
        return BlobStore(self.root, fsync=self.fsync).collect(self, dry_run=dry_run)

    # ---------------------------------------------------------------- lock
    def lock(self, info: dict | None = None) -> "FolderLock":
        """Take the folder's lock (see :class:`FolderLock`) or raise :class:`FolderBusyError`."""
        lk = FolderLock(self.root)
        lk.acquire(info or {})
        return lk

    def lock_unless_mine(self, info: dict | None = None) -> "FolderLock | None":
        """For a tool that writes into the folder (a pull): take its lock, or None when this process already holds
        it (a run that pulls its own backup). Raises :class:`FolderBusyError` when another process holds it."""
        if FolderLock(self.root).mine():
            return None
        return self.lock(info)

    def lock_holder(self) -> dict | None:
        """Who holds the folder's lock (their recorded details), or None when nobody does."""
        return FolderLock(self.root).holder()


class LocalTransaction(Transaction):
    """An entry being written into ``path`` (``.partial-<name>~<owner>~<id>``). Every process that took part writes
    its files there; only one commits."""

    def __init__(self, store: LocalStore, name: str, tx_id: str, owner: str | None = None) -> None:
        self.store = store
        self.name = name
        self.tx_id = tx_id
        self.path = os.path.join(store.root, partial_name(name, tx_id, owner))
        self.committed: str | None = None

    @property
    def direct_io(self) -> bool:  # type: ignore[override]
        return self.store.fsync

    def open(self) -> "LocalTransaction":
        os.makedirs(self.path, exist_ok=True)
        return self

    def write_file(self, encoded: EncodedFile) -> FileRecord:
        OPS.write_file(self.file(encoded.name), encoded.pieces, fsync=self.store.fsync)
        return encoded.record()

    def tensor_align(self, nbytes: int) -> int | None:
        return direct.ALIGN if self.store.fsync and direct.wanted(nbytes, self.path) else None

    def put_file(self, fname: str, src: str, progress: Any = None, metadata: dict | None = None) -> None:
        dst = self.file(fname)
        OPS.copy_file(src, dst, fsync=self.store.fsync)
        if progress is not None:
            progress(os.path.getsize(dst))

    def sync(self) -> None:
        """Make the entries of the partial folder durable (after a rank wrote its files)."""
        if self.store.fsync:
            OPS.fsync_dir(self.path)

    def commit(self, manifest: bytes | None, *, name: str | None = None, if_exists: IfExists = "version") -> str | None:
        check_if_exists(if_exists)
        store = self.store
        if manifest is not None:
            OPS.write_file(os.path.join(self.path, mf.MANIFEST), manifest, fsync=store.fsync)
        if store.fsync:
            OPS.fsync_dir(self.path)
        base = name or self.name
        final = None
        if if_exists == "version":
            while final is None:
                cand = first_free(base, lambda n: os.path.lexists(store.path(n)))
                try:
                    OPS.rename(self.path, store.path(cand))  # the commit point
                    final = cand
                except OSError as e:  # taken by a concurrent writer between the check and the rename
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
        elif if_exists == "discard":
            try:
                OPS.rename(self.path, store.path(base))
                final = base
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                self.abort()
                return None
        else:  # replace: swap atomically where the filesystem can, else trash the old one first
            dst = store.path(base)
            if os.path.lexists(dst) and OPS.exchange(self.path, dst):
                OPS.rmtree(self.path)  # the old entry, swapped out
            else:
                if os.path.lexists(dst):
                    store.trash(base) if is_plain_name(base) else OPS.rmtree(dst)
                OPS.rename(self.path, dst)
            final = base
        _changed(store.root, final)
        if manifest is not None:  # for the index of latest.json (store/hint.py), published next
            store.last_commit = (final, manifest)
        if store.fsync:
            OPS.fsync_dir(store.root)
        self.committed = final
        return final

    def abort(self) -> None:
        OPS.rmtree(self.path)


def check_writable_dir(dirpath: str) -> None:
    """Create ``dirpath`` and check that this process can write there; a clear error otherwise."""
    if os.path.exists(dirpath) and not os.path.isdir(dirpath):
        raise CheckpointWriteError(
            f"dirpath {dirpath!r} is a file, not a folder. Give a folder path for checkpoints (it is created if missing).")
    try:
        os.makedirs(dirpath, exist_ok=True)
        probe = os.path.join(dirpath, f"{PROBE_PREFIX}w{SEP}{owner_token()}{SEP}{new_id()}")
        OPS.write_file(probe, b"ok", fsync=False)
        OPS.unlink(probe)
    except OSError as e:
        raise CheckpointWriteError(
            f"dirpath {dirpath!r} is not writable ({e.strerror or e}). Choose a folder this process can write to, or "
            "fix its permissions.") from e
