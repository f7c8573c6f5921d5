"""The listing of an S3 location kept in memory while this process uploads to it (a run's uploader,
``session/backups.py``), so that the work of each save there (the location's retention, the callbacks' listings of
an ``s3://`` dirpath, the pack collection) makes no LIST request whose pages grow with the checkpoints it holds.

The listing is ``{name: ETag of its manifest}`` of the committed entries, taken from one LIST, then updated from the
commits and deletions this process makes there (``S3Transaction.commit`` and ``S3Store.uncommit`` note them); the
manifests themselves stay cached by ETag (``S3Store._cache``). Unlike a local folder under its lock, an S3 location
can be written by others (another run's pushes, ``lightning-ckpt prune``, a hand deletion), so the listing is taken
again after ``RELIST_EVERY`` changes (or an eighth of the entries, whichever is more: a listing costs pages in
proportion to the location, so it is taken in proportion less often), at least every ``RELIST_S`` seconds, and when
the uploader finds it wrong (a deletion that found nothing). Until then a checkpoint added by another process is not
in the listing: retention then ranks a subset of the location's checkpoints, and a rule that keeps the best, the
newest or the milestones of a subset keeps at least those of them it would keep of the whole, so it never deletes
more; a checkpoint another process deleted is dropped at the next listing. The pack collection, which must see every
manifest that references a pack, asks for a listing younger than half its grace period (``S3Store.collect_packs``):
a manifest committed by another process since then marked or uploaded its packs less than that long ago, so they are
within the grace. A location no uploader of this process holds is listed at every call, as before.
"""
from __future__ import annotations

import hashlib
import threading
import time
from typing import Any, Callable, Optional

RELIST_EVERY = 64  # commits and deletions noted between two listings
RELIST_S = 300.0  # the longest a listing is kept (a checkpoint of another process is seen within this time)


def _key(store: Any) -> tuple[str, str]:
    return store.bucket, store.prefix


class KeptListings:
    """The listings of the S3 locations that an uploader of this process holds (see the module's docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._memo: dict[tuple[str, str], dict] = {}
        self.listings = 0  # full listings taken (tests and the benchmark count them)

    def hold(self, store: Any) -> None:
        with self._lock:
            memo = self._memo.setdefault(_key(store), {"holders": 0, "entries": None, "listed": -1e18, "changes": 0,
                                                       "v": 0})  # v: bumped at every change of the entries
            memo["holders"] += 1

    def release(self, store: Any) -> None:
        with self._lock:
            memo = self._memo.get(_key(store))
            if memo is not None:
                memo["holders"] -= 1
                if memo["holders"] <= 0:
                    del self._memo[_key(store)]

    def held(self, store: Any) -> bool:
        with self._lock:
            return _key(store) in self._memo

    def listed(self, store: Any, list_fn: Callable[[], dict[str, str]]) -> Optional[list[tuple[str, str]]]:
        """``[(name, manifest ETag)]`` of the committed entries, sorted by name, from memory (``list_fn`` lists the
        location when the kept listing is missing or due); None when no uploader holds the location (the caller lists
        it)."""
        with self._lock:  # a listing due is taken under the lock: a commit noted meanwhile cannot be lost
            memo = self._memo.get(_key(store))
            if memo is None:
                return None
            age = time.monotonic() - memo["listed"]
            due = max(RELIST_EVERY, len(memo["entries"] or ()) // 8)  # in proportion to the pages a listing costs
            if memo["entries"] is None or memo["changes"] >= due or age >= RELIST_S:
                started = time.monotonic()
                memo["entries"] = dict(list_fn())
                memo["listed"], memo["changes"] = started, 0
                memo["v"] += 1
                self.listings += 1
            kept = memo.get("sorted")
            if kept is None or kept[0] != memo["v"]:  # sorted once per change, not at every read
                kept = memo["sorted"] = (memo["v"], sorted(memo["entries"].items()))
            return list(kept[1])

    def scan(self, store: Any, info: Callable[[str, dict], Any], order: Callable[[Any], Any]) -> Optional[tuple[list, list]]:
        """For ``read.scan_checkpoints``: the results of ``info(name, manifest)`` of the committed entries, sorted by
        ``order``, and ``(path, error)`` of the manifests that cannot be read; each made once per manifest ETag, and
        the whole result kept until the listing changes, so that a save costs no pass over every entry. None when not
        held."""
        from ..errors import CheckpointError, StorageUnavailableError

        with self._lock:
            memo = self._memo.get(_key(store))
            made = None if memo is None else memo.setdefault("made", {})  # name -> (ETag, info or error)
        if made is None:
            return None
        listed = store._listed()
        with self._lock:
            v, last = memo["v"], memo.get("scanned")
        if last is not None and last[0] == v and last[1] is order and memo["entries"] is not None:
            return list(last[2]), list(last[3])  # nothing changed since the last scan: its results, not a new pass
        fresh = [(n, e) for n, e in listed if (made.get(n) or ("",))[0] != e]
        if len(fresh) > 1:  # the first scan: the manifests are fetched 16 at a time
            got = dict(store.manifests())
            for n, e in fresh:
                if n in got:
                    m = got[n]
                    made[n] = (e, m if isinstance(m, CheckpointError) else info(n, m))
        else:
            for n, e in fresh:
                try:
                    made[n] = (e, info(n, store._manifest(n, e)[0]))
                except StorageUnavailableError:
                    raise
                except CheckpointError as err:
                    made[n] = (e, err)
        infos, bad = [], []
        for n, e in listed:
            got = made.get(n)
            if got is None or got[0] != e:
                continue  # deleted between the listing and the read
            (bad.append((store.path(n), got[1])) if isinstance(got[1], CheckpointError) else infos.append(got[1]))
        if len(made) > 2 * len(listed) + 64:  # forget what was deleted
            names = {n for n, _ in listed}
            for n in [n for n in made if n not in names]:
                made.pop(n, None)
        infos.sort(key=order)
        if len(infos) + len(bad) == len(listed):  # complete (nothing deleted in between): the next scan may reuse it
            with self._lock:
                if memo.get("v") == v:
                    memo["scanned"] = (v, order, list(infos), list(bad))
        return infos, bad

    def committed(self, store: Any, name: str, manifest: bytes) -> Optional[str]:
        """This process committed ``name`` with these manifest bytes; returns the ETag it is listed under (the MD5 of
        a one-part upload), or None when the location is not held."""
        with self._lock:
            memo = self._memo.get(_key(store))
            if memo is None or memo["entries"] is None:
                return None
            etag = f'"{hashlib.md5(manifest).hexdigest()}"'
            memo["entries"][name] = etag
            memo["changes"] += 1
            memo["v"] += 1
            return etag

    def deleted(self, store: Any, name: str) -> None:
        """This process removed the manifest of ``name`` (it is no checkpoint any more)."""
        with self._lock:
            memo = self._memo.get(_key(store))
            if memo is not None and memo["entries"] is not None:
                memo["entries"].pop(name, None)
                memo["changes"] += 1
                memo["v"] += 1

    def expire(self, store: Any, max_age_s: float) -> None:
        """List the location at the next call if the kept listing is older than ``max_age_s``."""
        with self._lock:
            memo = self._memo.get(_key(store))
            if memo is not None and time.monotonic() - memo["listed"] > max_age_s:
                memo["entries"] = None
                memo["v"] += 1

    def invalidate(self, store: Any) -> None:
        """The kept listing was found wrong: list the location at the next call."""
        with self._lock:
            memo = self._memo.get(_key(store))
            if memo is not None:
                memo["entries"] = None
                memo["v"] += 1


KEPT = KeptListings()
