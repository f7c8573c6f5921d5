"""The listing of a run's own folder, kept in memory while the run holds the folder's lock (``Store.kept``, read by ``read.scan_checkpoints``)."""
from __future__ import annotations

import bisect
import os
import stat
import threading
import time
from typing import Any, Callable

from ..errors import CheckpointError, CheckpointNotFoundError
from ..format.manifest import MANIFEST
from .fs import is_real_file
from .hint import local_entries
from .lock import FolderLock


_WATCHED: dict[str, list[str]] = {}  # root -> names committed or trashed there by this process since it was watched
_WATCH_LOCK = threading.Lock()


def watch(root: str) -> None:
    """Start recording the names this process commits or deletes in ``root`` (``Listings``)."""
    with _WATCH_LOCK:
        _WATCHED[root] = []


def unwatch(root: str) -> None:
    with _WATCH_LOCK:
        _WATCHED.pop(root, None)


def changed_since(root: str, seen: int) -> tuple[list[str], int] | None:
    """The names changed in a watched ``root`` after the first ``seen`` changes, and the new count (None: not
    watched)."""
    with _WATCH_LOCK:
        log_ = _WATCHED.get(root)
        return None if log_ is None else (log_[seen:], len(log_))


def changed(root: str, name: str) -> None:
    """Note that this process committed or deleted ``name`` in ``root`` (``LocalStore``)."""
    with _WATCH_LOCK:
        log_ = _WATCHED.get(root)
        if log_ is not None:
            log_.append(name)


class Listings:
    """The listings of the local folders whose lock this process holds (a run's folder during ``fit``), kept in
    memory, so that the readers of every save (retention, best-k, the callbacks' paths,
    ``latest_checkpoint(verify=False)``) read no manifest again, however many checkpoints the folder holds.

    Nobody else writes such a folder (that is what the lock is for): the listing is updated from the names this
    process commits or deletes there (:func:`watch`), each read once. The entry names are also listed again
    (``scandir``, no ``stat`` per entry) at most every ``RELIST_S`` seconds, and an entry whose inode changed is read
    again, so that a change by other means (a checkpoint removed by hand) is seen within that time. A folder whose
    lock this process does not hold is listed and read in full at every call, as before."""

    RELIST_S = 2.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_root: dict[str, dict] = {}

    def kept(self, root: str) -> bool:
        """Whether the listing of ``root`` is in memory now (its lock is held and it was listed since)."""
        with self._lock:
            memo = self._by_root.get(root)
        return memo is not None and memo["lock"] is FolderLock._held.get(FolderLock(root).path)

    def scan(self, store: Any, read: Callable[[str], Any], order: Callable[[Any], Any]) -> tuple[list, list] | None:
        """The (sorted by ``order``) results of ``read(name)`` for the checkpoints of a local folder whose lock this
        process holds, and ``(path, error)`` of those it raised ``CheckpointError`` for; None for any other folder."""
        root = store.root
        held = FolderLock._held.get(FolderLock(root).path)
        with self._lock:
            memo = self._by_root.get(root)
            if held is None:
                if memo is not None:
                    del self._by_root[root]
                    unwatch(root)
                return None
            if memo is None or memo["lock"] is not held:
                watch(root)  # before the listing: nothing committed after it is missed
                memo = self._by_root[root] = {"lock": held, "seen": 0, "listed": -1e9, "entries": {}, "sorted": None,
                                              "added": [], "removed": []}
            changed = changed_since(root, memo["seen"])
            if changed is None:  # unwatched meanwhile (another reader saw the lock released): start over
                del self._by_root[root]
                return None
            names, memo["seen"] = changed
            entries = memo["entries"]
            now = time.monotonic()
            if now - memo["listed"] >= self.RELIST_S:
                memo["listed"] = now
                present = local_entries(root)
                for name in [n for n, (ino, _) in entries.items() if present.get(n) != ino]:
                    memo["removed"].append(entries.pop(name)[1])
                todo = [(n, ino) for n, ino in present.items() if n not in entries]
            else:  # only what this process changed
                todo = []
                for name in set(names):
                    try:
                        st = os.lstat(os.path.join(root, name))
                    except OSError:
                        st = None
                    ino = st.st_ino if st is not None and stat.S_ISDIR(st.st_mode) else None
                    if name in entries and entries[name][0] != ino:
                        memo["removed"].append(entries.pop(name)[1])
                    if ino is not None and name not in entries:
                        todo.append((name, ino))
            for name, ino in todo:
                try:
                    if not is_real_file(os.path.join(root, name, MANIFEST)):
                        raise CheckpointNotFoundError(name)
                    got: Any = read(name)
                except CheckpointNotFoundError:
                    got = None  # not a checkpoint (no manifest), or deleted since the listing
                except CheckpointError as err:
                    got = err
                entries[name] = (ino, got)
                memo["added"].append(got)
            self._resort(memo, store, order)
            infos, bad = memo["sorted"]
        return list(infos), list(bad)

    @staticmethod
    def _resort(memo: dict, store: Any, order: Callable[[Any], Any]) -> None:
        """Keep the sorted results in step with the entries: a commit or a deletion moves one item (``bisect``), not
        the whole folder."""
        added, removed = memo["added"], memo["removed"]
        memo["added"], memo["removed"] = [], []
        if memo["sorted"] is not None and not any(isinstance(g, CheckpointError) for g in added + removed):
            infos = memo["sorted"][0]
            for g in removed:
                if g is None:
                    continue
                i = bisect.bisect_left(infos, order(g), key=order)
                while i < len(infos) and infos[i] is not g:
                    i += 1
                if i < len(infos):
                    del infos[i]
            for g in added:
                if g is not None:
                    bisect.insort(infos, g, key=order)
            return
        entries = memo["entries"]
        infos = sorted((g for _, g in entries.values() if g is not None and not isinstance(g, CheckpointError)),
                       key=order)
        bad = sorted(((store.path(n), g) for n, (_, g) in entries.items() if isinstance(g, CheckpointError)),
                     key=lambda pe: pe[0])
        memo["sorted"] = (infos, bad)


LISTINGS = Listings()
