"""The content store of a local checkpoint folder: ``<folder>/.blobs/``, packs of tensor bytes that several
checkpoints reference (deduplicated checkpoints, manifest format 2).

A pack is a safetensors file written by one save (``pack-<save id>-rank<r>.safetensors``), immutable once it is in
``.blobs``. Checkpoints reference tensors inside packs by name, and every manifest that does carries the pack's whole
record (size, checksums, content hashes), so a pack is verified like any file of the checkpoint.

Two rules keep it crash-safe (see docs/DESIGN.md, "Deduplicated checkpoints"):

* A pack enters ``.blobs`` before the manifest that first references it is written (``adopt``, inside the commit),
  so no committed manifest ever references a pack that is not there.
* Garbage collection (``collect``) marks every pack referenced by a committed manifest of the folder, then removes
  only unmarked ones that no save of this process may still reference (``pin``). It runs with the folder's lock held
  (the only process that writes there) and, inside the process, under the same lock as the commit, so a pack adopted
  for a commit in flight is never swept. A manifest that cannot be read stops the sweep: it may reference anything.
  A kill -9 anywhere leaves at worst unreferenced packs, and temp files of a copy into the store cut short (a pull),
  both removed by the next collection.

Every entry of ``.blobs`` is checked for its type (``lstat``, never following a link) before it is listed, read or
deleted: only regular files are packs. Anything else under a pack's name (a folder, a link, a FIFO, a device) is left
alone with a warning: it is never read as a pack, never deleted, and never stops a collection, which runs after
checkpoints were deleted and must not die half-way.
"""
from __future__ import annotations

import logging
import os
import stat
import threading
from collections import Counter
from typing import Any, Iterable

from ..errors import CheckpointError, CheckpointNotFoundError, CheckpointWriteError
from ..format import manifest as mf
from .base import Store, debris_in
from .fs import OPS, is_real_dir, is_real_file, open_member

log = logging.getLogger("lightning_ckpt")

PACK_RE = mf.PACK_RE
pack_name = mf.pack_name

_LOCKS: dict[str, threading.RLock] = {}
_PINS: dict[str, Counter] = {}
_GUARD = threading.Lock()


def referenced_packs(manifests: Iterable[dict]) -> set[str]:
    """Every pack the given manifests reference."""
    out: set[str] = set()
    for m in manifests:
        out.update((m.get("packs") or {}).keys())
    return out


class BlobStore:
    """The ``.blobs`` folder of the checkpoint folder ``root``."""

    def __init__(self, root: str, *, fsync: bool = True) -> None:
        self.root = os.path.abspath(root)
        self.path = os.path.join(self.root, mf.BLOBS)
        self.fsync = fsync
        key = os.path.realpath(self.root)
        with _GUARD:
            self.lock = _LOCKS.setdefault(key, threading.RLock())  # one per folder in this process: commit vs collect
            self._pins = _PINS.setdefault(key, Counter())

    def pack(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _check_dir(self) -> None:
        if os.path.lexists(self.path) and not is_real_dir(self.path):
            raise CheckpointError(f"{self.path} is not a folder (a link or a file): it must be the folder's content "
                                  "store. Move it away; nothing is written or deleted through it.")

    # ---------------------------------------------------------------- writing (inside a commit, under self.lock)
    def adopt(self, src_folder: str, names: Iterable[str]) -> None:
        """Move packs written in a partial folder into the store (durably) before the manifest is written."""
        names = list(names)
        if not names:
            return
        self._check_dir()
        os.makedirs(self.path, exist_ok=True)
        for n in names:
            OPS.rename(os.path.join(src_folder, n), self.pack(n))
        if self.fsync:
            OPS.fsync_dir(self.path)
            OPS.fsync_dir(self.root)

    def check_present(self, packs: dict[str, dict]) -> None:
        """Every pack a manifest about to be committed references is in the store with its size (never commit a
        dangling reference)."""
        for n, entry in packs.items():
            p = self.pack(n)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                raise CheckpointWriteError(
                    f"{p} is missing: a pack this checkpoint shares with earlier ones was deleted by hand or by another "
                    "process. Nothing was committed; the next save writes the tensors again.") from None
            if not is_real_file(p) or st.st_size != int(entry["size"]):
                raise CheckpointWriteError(f"{p} is not the pack the checkpoint expects (size {st.st_size}, expected "
                                           f"{entry['size']}); nothing was committed")

    # ---------------------------------------------------------------- pins (packs a pending save may reference)
    def pin(self, names: Iterable[str]) -> None:
        with _GUARD:
            self._pins.update(names)

    def unpin(self, names: Iterable[str]) -> None:
        with _GUARD:
            self._pins.subtract(names)
            for n in [n for n, c in self._pins.items() if c <= 0]:
                del self._pins[n]

    def pinned(self) -> set[str]:
        with _GUARD:
            return set(self._pins)

    # ---------------------------------------------------------------- garbage collection
    def names(self) -> list[str]:
        """The packs in the store: regular files with a pack's name (an entry of another type under such a name is
        skipped with a warning, see :meth:`_entries`)."""
        return self._entries()[0]

    def sizes(self) -> dict[str, int]:
        """{pack: bytes} of the packs in the store (one collected since the listing is left out)."""
        out = {}
        for p in self.names():
            try:
                out[p] = os.lstat(self.pack(p)).st_size
            except FileNotFoundError:
                continue
        return out

    def _entries(self) -> tuple[list[str], list[str]]:
        """(packs, strays): the regular files with a pack's name, and the entries with a pack's name that are not
        regular files (checked with ``lstat``: a link is a stray whatever it points to)."""
        if not is_real_dir(self.path):
            return [], []
        try:
            listed = sorted(e for e in os.listdir(self.path) if PACK_RE.match(e))
        except OSError as e:
            log.warning("lightning_ckpt: cannot list the content store %s (%s)", self.path, e)
            return [], []
        packs, strays = [], []
        for e in listed:
            try:
                mode = os.lstat(self.pack(e)).st_mode
            except FileNotFoundError:
                continue  # removed since the listing
            except OSError as err:
                log.warning("lightning_ckpt: cannot inspect %s (%s); leaving it alone", self.pack(e), err)
                strays.append(e)
                continue
            if stat.S_ISREG(mode):
                packs.append(e)
            else:
                strays.append(e)
        if strays:
            log.warning("lightning_ckpt: %s holds %d entr%s with a pack's name that %s not a regular file (%s): never "
                        "read or deleted as a pack. Move %s away.", self.path, len(strays),
                        "y" if len(strays) == 1 else "ies", "is" if len(strays) == 1 else "are",
                        ", ".join(strays[:3]) + (", ..." if len(strays) > 3 else ""),
                        "it" if len(strays) == 1 else "them")
        return packs, strays

    def _remove_debris(self) -> None:
        """Remove the temp files of copies into the store whose process is gone (a pull killed while it copied a
        pack: ``.tmp-<pack>~<owner>~<id>``, see ``LocalStore.replacing``). In this process no copy runs meanwhile:
        pulls copy under ``self.lock``."""
        for p in debris_in(self.path):
            try:  # (lstat: a link is removed itself, never what it points to)
                if is_real_dir(p):
                    OPS.rmtree(p)
                else:
                    OPS.unlink(p)
            except OSError as e:
                log.warning("lightning_ckpt: could not remove %s, left by an interrupted copy into the content store "
                            "(%s)", p, e)
                continue
            log.info("lightning_ckpt: removed %s, left by an interrupted copy into the content store", p)

    def collect(self, store: "Store", *, dry_run: bool = False) -> tuple[list[str], int]:
        """Remove every pack no committed manifest of the folder references and no pending save may reference.
        Returns (removed pack names, bytes freed). Call it with the folder's lock held; ``store``: the
        folder's own store, whose committed manifests say what is referenced (callers use ``LocalStore.collect_packs``).

        Never raises for what it finds in the store: it runs after checkpoints were deleted (retention, ``prune``),
        and a collection that stopped there would leave the deletions reported as failed. A ``.blobs`` that is not
        a folder, an entry that is not a regular file, or a pack that cannot be removed is logged and left alone
        (the next collection tries again)."""
        if not os.path.lexists(self.path):
            return [], 0
        if not is_real_dir(self.path):
            log.warning("lightning_ckpt: not collecting unreferenced packs: %s is not a folder (a link or a file); it "
                        "must be the folder's content store. Move it away; nothing is deleted through it.", self.path)
            return [], 0
        with self.lock:
            if not dry_run:
                self._remove_debris()
            present, _ = self._entries()
            if not present:
                return [], 0
            marked: set[str] = set()
            try:
                names = store.names()
            except OSError as e:
                log.warning("lightning_ckpt: not collecting unreferenced packs in %s: the folder cannot be listed (%s)",
                            self.path, e)
                return [], 0
            for name in names:
                try:
                    m, _ = store.read_manifest(name)
                except CheckpointNotFoundError:
                    continue  # deleted since the listing: its references are gone with it
                except (CheckpointError, OSError) as e:
                    log.warning("lightning_ckpt: not collecting unreferenced packs in %s: the manifest of %s cannot be "
                                "read (%s), and it may reference any of them", self.path, name, e)
                    return [], 0
                marked.update((m.get("packs") or {}).keys())
            marked |= self.pinned()
            removed, freed = [], 0
            for n in (n for n in present if n not in marked):
                p = self.pack(n)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue  # gone since the listing
                if not stat.S_ISREG(st.st_mode):  # replaced since the listing: not a pack, left alone
                    log.warning("lightning_ckpt: %s is not a regular file; not deleting it", p)
                    continue
                if not dry_run:
                    try:
                        OPS.unlink(p)
                    except OSError as e:
                        log.warning("lightning_ckpt: could not remove the unreferenced pack %s (%s); the next "
                                    "collection tries again", p, e)
                        continue
                removed.append(n)
                freed += st.st_size
            if removed and not dry_run:
                if self.fsync:
                    try:
                        OPS.fsync_dir(self.path)
                    except OSError as e:
                        log.warning("lightning_ckpt: could not fsync %s after removing packs (%s)", self.path, e)
                log.info("lightning_ckpt: removed %d unreferenced pack(s) from %s (%.1f MB)", len(removed), self.path,
                         freed / 1e6)
            return removed, freed


class PackFiles:
    """Packs of a content store opened for reading, each once (``open_member``: a regular file of the recorded size,
    never through a link), all closed on leaving the ``with`` block: what one deduplication plan's spot checks read
    (``writer/dedup.py``). A pack that cannot be opened is remembered as such (None: its tensors are not reused)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.fds: dict[tuple[str, int], int | None] = {}

    def open(self, pack: str, size: int) -> int | None:
        key = (pack, size)
        if key not in self.fds:
            try:
                self.fds[key] = open_member(self.folder, pack, size)
            except (OSError, CheckpointError):
                self.fds[key] = None
        return self.fds[key]

    def __enter__(self) -> "PackFiles":
        return self

    def __exit__(self, *exc: Any) -> None:
        for fd in self.fds.values():
            if fd is not None:
                os.close(fd)
        self.fds.clear()
