"""An entry being uploaded to S3: the transaction of ``S3Store`` (the commit protocol is stated once, in ``base``).

Where its objects go: under ``<prefix>/<name>/`` when ``<name>`` has no manifest at the first write (the common case:
a push, a backup), else under a staging prefix ``<prefix>/.partial-<name>~<owner>~<id>/`` that no listing shows, so
that a committed entry's objects are never overwritten before the commit decides (``if_exists``); the commit then
copies them in on the server. Files a caller writes into ``path`` (a local staging folder) are uploaded by ``sync``
and by ``commit``, before the manifest.

What S3 cannot make atomic (stated in ``base``'s table): the check of a name's manifest and the PUT that commits are
two requests, so two writers of one name at the same moment are not excluded (one run writes an S3 location);
``"replace"`` of a committed entry removes its manifest first, so a reader sees the old entry, none, or the new one,
never a mix it would take for a checkpoint.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from typing import Any, Optional

from ..errors import CheckpointNotFoundError, CheckpointWriteError
from ..format import manifest as mf
from ..format.tensorfile import EncodedFile, FileRecord
from .base import IfExists, Transaction, check_entry_name, check_if_exists, first_free, new_id, partial_name
from .fs import OPS

log = logging.getLogger("lightning_ckpt")
MAX_MANIFEST_BYTES = 64 * 1024 * 1024  # as s3.MAX_MANIFEST_BYTES


class S3Transaction(Transaction):
    """An entry being uploaded: objects first, the manifest last."""

    direct_io = False  # tensor files are staged in ``path`` and uploaded; O_DIRECT has nothing to gain there

    def __init__(self, store: Any, name: str, tx_id: Optional[str] = None, owner: Optional[str] = None) -> None:
        self.store = store
        self.name = name
        self.tx_id = tx_id or new_id()
        self.owner = owner  # in the staging prefix's name (default: this process's token), for the cleanup policy
        self.put: list[str] = []  # the keys uploaded so far
        self.committed: Optional[str] = None
        self._where: Optional[str] = None  # the key folder the objects go under (decided at the first write)
        self._uploaded: set[str] = set()  # files of ``path`` already uploaded
        self._lock = threading.Lock()
        self._path: Optional[str] = None

    # ---------------------------------------------------------------- where the bytes go
    @property
    def path(self) -> str:  # type: ignore[override]
        """A local staging folder (created on first use) whose files ``sync``/``commit`` upload as the entry's."""
        with self._lock:
            if self._path is None:
                self._path = tempfile.mkdtemp(prefix=partial_name(self.name, self.tx_id) + SUFFIX)
            return self._path

    def where(self) -> str:
        """The key folder (relative to the store's prefix) this transaction's objects go under."""
        with self._lock:
            if self._where is None:
                taken = bool(self.store.head(self.store.key(self.name, mf.MANIFEST)))
                self._where = partial_name(self.name, self.tx_id, self.owner) if taken else self.name
            return self._where

    def open(self) -> "S3Transaction":
        self.path  # noqa: B018 - makes the staging folder
        return self

    # ---------------------------------------------------------------- the data
    def put_file(self, fname: str, src: str, progress: Any = None, metadata: dict | None = None) -> None:
        key = self.store.key(self.where(), mf.check_member_name(fname, "a file of the entry"))
        self.store.put_file(key, src, progress, metadata)
        with self._lock:
            self.put.append(key)

    def write_file(self, encoded: EncodedFile) -> FileRecord:
        """Staged in ``path`` (one local file), uploaded, then removed from the staging folder."""
        local = self.file(encoded.name)
        OPS.write_file(local, encoded.pieces, fsync=False)
        try:
            self.put_file(encoded.name, local)
        finally:
            OPS.unlink(local)
        return encoded.record()

    def sync(self) -> None:
        """Upload the files written into ``path`` since the last sync (each put is durable once it returns)."""
        with self._lock:
            folder = self._path
        if folder is None:
            return
        for fname in sorted(os.listdir(folder)):
            if fname not in self._uploaded and os.path.isfile(os.path.join(folder, fname)):
                self.put_file(fname, os.path.join(folder, fname))
                self._uploaded.add(fname)

    # ---------------------------------------------------------------- the commit
    def _committed(self, name: str) -> bool:
        return bool(self.store.head(self.store.key(name, mf.MANIFEST)))

    def _manifest_of(self, name: str) -> bytes | None:
        try:
            return self.store.get_bytes(self.store.key(name, mf.MANIFEST), MAX_MANIFEST_BYTES)
        except CheckpointNotFoundError:
            return None

    def commit(self, manifest: bytes | None, *, name: str | None = None, if_exists: IfExists = "version") -> str | None:
        """See ``Transaction.commit`` and the module's docstring (``push_checkpoint`` passes ``"replace"``: a push
        commits the checkpoint's own name, whose earlier copy it un-committed or repairs)."""
        if manifest is None:
            raise ValueError("an S3 entry is committed by its manifest: pass the manifest bytes")
        check_if_exists(if_exists)
        store = self.store
        self.sync()
        base = check_entry_name(name or self.name)
        where = self.where()
        if if_exists == "replace":
            final = base
        elif if_exists == "version":
            final = first_free(base, lambda n: n != where and self._committed(n))
        else:
            final = base
            if where != base and self._committed(base):
                self.abort()
                return None
        if where == final and if_exists != "replace" and self._committed(final):
            raise CheckpointWriteError(
                f"another writer committed {store.path(final)} while this upload wrote under that name; S3 cannot "
                "exclude two writers of one name (one run writes an S3 location)")
        if where != final:  # staged (or begun under another name): the objects are copied in on the server
            if if_exists == "replace" and self._committed(final) and self._manifest_of(final) != manifest:
                store.uncommit(final)  # another entry leaves the listing before its objects are overwritten (a
                # repair of the same entry keeps it listed: every object copied in matches its manifest)
            skip = len(store.key(where)) + 1
            for key in list(self.put):
                store.copy_key(key, store.key(final, key[skip:]))
        store.put_bytes(store.key(final, mf.MANIFEST), manifest)  # the commit point on S3
        if where != final:
            self._drop(self.put)
        store.committed(final, manifest)  # the kept listing and the manifest cache take it in
        store.last_commit = (final, manifest)
        self._clear_staging()
        self.committed = final
        return final

    def abort(self) -> None:
        self._drop(self.put)
        self._clear_staging()

    def _drop(self, keys: list[str]) -> None:
        try:
            self.store.delete_keys(list(keys))
        except Exception as e:  # noqa: BLE001 - S3Store.cleanup removes them later
            log.warning("lightning_ckpt: could not remove the objects of an upload to %s (%r)",
                        self.store.path(self.name), e)

    def _clear_staging(self) -> None:
        with self._lock:
            folder, self._path = self._path, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


SUFFIX = "~stage-"  # after the partial name of a local staging folder (tempfile adds a random tail)
