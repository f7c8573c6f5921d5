"""The listing of an S3 location kept in memory while this process uploads to it (a run's uploader,
``session/backups.py``), so that the work of each save there (the location's retention, the callbacks' listings of
an ``s3://`` dirpath, the pack collection) makes no LIST request whose pages grow with the checkpoints it holds, and
no pass over every checkpoint either.

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

What a save costs here does not grow with the location (issue 22): the sorted listing is updated by ``bisect`` at
each change, each change is also written to a log (the names changed since the last listing, one per version), and
``scan`` (``read.scan_checkpoints``' sorted records) moves only the records of the names logged since its last call,
the same objects kept for the others (``folder/index.py`` finds its changes by identity). A new listing starts a new
log, and the next scan is a whole pass again (manifests still read once per ETag).
"""
from __future__ import annotations

import bisect
import hashlib
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Optional

RELIST_EVERY = 64  # commits and deletions noted between two listings
RELIST_S = 300.0  # the longest a listing is kept (a checkpoint of another process is seen within this time)
MANIFEST_CACHE_BYTES = 256 << 20  # the parsed manifests kept by ETag in this process, in estimated bytes (``ManifestCache``)
PARSED_PER_BYTE = 20  # a parsed manifest's Python objects per byte of its JSON: 18x at 3,000 tensors, 19x at 50,000


def _key(store: Any) -> tuple[str, str]:
    return store.bucket, store.prefix


class KeptListings:
    """The listings of the S3 locations that an uploader of this process holds (see the module's docstring).

    Per location (``_memo``): ``entries`` {name: ETag} (None: list at the next call) and ``sorted`` (its items by
    name); ``v``, bumped at every change of them; ``log``, the name of each change since the listing taken at version
    ``log_from``; ``made`` {name: (ETag, record or error)}, what was built from each manifest; ``scan``, the sorted
    records of the last scan and the version they are of; ``scan_lock``, one scan at a time moves them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._memo: dict[tuple[str, str], dict] = {}
        self.listings = 0  # full listings taken (tests and the benchmark count them)
        self.passes = 0  # scans that went over every entry (tests count them)

    def hold(self, store: Any) -> None:
        with self._lock:
            memo = self._memo.setdefault(_key(store), {"holders": 0, "entries": None, "sorted": None, "listed": -1e18,
                                                       "changes": 0, "v": 0, "log": [], "log_from": 0, "made": {},
                                                       "scan": None, "scan_lock": threading.Lock()})
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
                entries = dict(list_fn())
                memo["listed"], memo["changes"] = started, 0
                self._reset(memo, entries)
                self.listings += 1
            return list(memo["sorted"])

    @staticmethod
    def _reset(memo: dict, entries: Optional[dict]) -> None:
        """A new listing (None: list at the next call): a new version, and a new log from it."""
        memo["entries"] = entries
        memo["sorted"] = None if entries is None else sorted(entries.items())
        memo["v"] += 1
        memo["log"], memo["log_from"] = [], memo["v"]

    @staticmethod
    def _change(memo: dict, name: str, etag: Optional[str]) -> None:
        """``name`` is committed under ``etag`` now (None: it is gone): one version, one line of the log."""
        entries, items = memo["entries"], memo["sorted"]
        i = bisect.bisect_left(items, (name,))
        there = i < len(items) and items[i][0] == name
        if etag is None:
            entries.pop(name, None)
            if there:
                del items[i]
        else:
            entries[name] = etag
            if there:
                items[i] = (name, etag)
            else:
                items.insert(i, (name, etag))
        memo["changes"] += 1
        memo["v"] += 1
        memo["log"].append(name)

    def scan(self, store: Any, info: Callable[[str, dict], Any], order: Callable[[Any], Any]) -> Optional[tuple[list, list]]:
        """For ``read.scan_checkpoints``: the results of ``info(name, manifest)`` of the committed entries, sorted by
        ``order``, and ``(path, error)`` of the manifests that cannot be read; each made once per manifest ETag, and
        kept across calls: a scan after a few changes moves their records only (see the module's docstring). None
        when not held."""
        with self._lock:
            memo = self._memo.get(_key(store))
        if memo is None:
            return None
        listed = store._listed()  # takes the listing again when it is due
        with memo["scan_lock"]:
            with self._lock:
                v, last, entries = memo["v"], memo["scan"], memo["entries"]
                if last is not None and last["order"] is not order:
                    last = None
                if last is not None and last["v"] == v:
                    return _results(last)
                changes = None
                if last is not None and entries is not None and memo["log_from"] <= last["v"]:
                    changes = {n: entries.get(n) for n in memo["log"][last["v"] - memo["log_from"]:]}
                elif memo["sorted"] is not None:
                    listed = list(memo["sorted"])  # the listing of version v exactly
                else:
                    v = None  # dropped meanwhile: scan what _listed gave, keep nothing
            if changes is not None:
                made = self._make(store, memo["made"], info, [(n, e) for n, e in changes.items() if e is not None],
                                  whole=False)
                for n, e in changes.items():
                    _move(last, order, n, e, made.get(n), store)
                last["v"] = v
                return _results(last)
            self.passes += 1
            made = self._make(store, memo["made"], info, listed, whole=True)
            state: dict = {"order": order, "v": v, "by": {}, "infos": [], "bad": {}}
            for n, e in listed:
                _move(state, order, n, e, made.get(n), store, sort=False)
            state["infos"].sort(key=order)
            if v is not None:  # the listing of version v: the next scans move it
                memo["scan"] = state
            return _results(state)

    @staticmethod
    def _make(store: Any, made: dict, info: Callable[[str, dict], Any], items: list[tuple[str, str]], *,
              whole: bool) -> dict:
        """{name: (ETag, record or error)} for every item of ``items`` [(name, ETag)], each manifest read once per
        ETag (``made`` keeps them; a manifest gone since the listing is an error, like any unreadable one).
        ``whole``: ``items`` is the whole listing, and ``made`` forgets the names not in it. Raises
        ``StorageUnavailableError`` (the endpoint): ``made`` may have grown, nothing else changed."""
        from ..errors import CheckpointError

        fresh = [(n, e) for n, e in items if (made.get(n) or ("",))[0] != e]
        for (n, m), (_, e) in zip(store.fetch_manifests(fresh), fresh):  # (16 at a time: the first scan)
            made[n] = (e, m if isinstance(m, CheckpointError) else info(n, m))
        if whole and len(made) > 2 * len(items) + 64:  # forget what was deleted
            names = {n for n, _ in items}
            for n in [n for n in made if n not in names]:
                made.pop(n, None)
        return {n: made[n] for n, e in items}

    def committed(self, store: Any, name: str, manifest: bytes) -> Optional[str]:
        """This process committed ``name`` with these manifest bytes; returns the ETag it is listed under (the MD5 of
        a one-part upload), or None when the location is not held."""
        with self._lock:
            memo = self._memo.get(_key(store))
            if memo is None or memo["entries"] is None:
                return None
            etag = f'"{hashlib.md5(manifest).hexdigest()}"'
            self._change(memo, name, etag)
            return etag

    def deleted(self, store: Any, name: str) -> None:
        """This process removed the manifest of ``name`` (it is no checkpoint any more)."""
        with self._lock:
            memo = self._memo.get(_key(store))
            if memo is not None and memo["entries"] is not None:
                self._change(memo, name, None)

    def expire(self, store: Any, max_age_s: float) -> None:
        """List the location at the next call if the kept listing is older than ``max_age_s``."""
        with self._lock:
            memo = self._memo.get(_key(store))
            if memo is not None and time.monotonic() - memo["listed"] > max_age_s:
                self._reset(memo, None)

    def invalidate(self, store: Any) -> None:
        """The kept listing was found wrong: list the location at the next call."""
        with self._lock:
            memo = self._memo.get(_key(store))
            if memo is not None:
                self._reset(memo, None)


def _move(state: dict, order: Callable[[Any], Any], name: str, etag: Optional[str], got: Optional[tuple],
          store: Any, sort: bool = True) -> None:
    """Put ``name``'s record in ``state`` as ``got`` (ETag, record or error) says, in place of the one it had (none:
    the name is gone, or was deleted before its manifest could be read). ``sort``: insert in ``order``."""
    from ..errors import CheckpointError

    old = state["by"].pop(name, None)
    if old is not None:
        if isinstance(old[1], CheckpointError):
            state["bad"].pop(name, None)
        else:
            infos = state["infos"]
            i = bisect.bisect_left(infos, order(old[1]), key=order)
            while i < len(infos) and infos[i] is not old[1]:
                i += 1
            if i < len(infos):
                del infos[i]
    if etag is None or got is None:
        return
    state["by"][name] = got
    if isinstance(got[1], CheckpointError):
        state["bad"][name] = (store.path(name), got[1])
    elif sort:
        bisect.insort(state["infos"], got[1], key=order)
    else:
        state["infos"].append(got[1])


def _results(state: dict) -> tuple[list, list]:
    """Copies of a scan's sorted records and its (path, error) pairs (by name)."""
    return list(state["infos"]), [state["bad"][n] for n in sorted(state["bad"])]


class ManifestCache:
    """Parsed manifests of S3 entries by ``(bucket, key, ETag)`` (a committed manifest never changes under one ETag,
    so a hit needs no GET), for every ``S3Store`` of this process. Bounded by the memory of the manifests it holds,
    estimated as ``PARSED_PER_BYTE`` times their bytes on disk (``MANIFEST_CACHE_BYTES`` in all, about 13 MiB of
    manifests; the least recently used dropped first), and the manifests of a name this process
    uncommits are dropped at once: a week of saves into S3 (each manifest cached as it is pushed) does not pile up
    in memory. A held location's records do not depend on it (``KeptListings`` keeps them by ETag)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: "OrderedDict[tuple, tuple[dict, bytes]]" = OrderedDict()
        self._of: dict[tuple[str, str], set] = {}  # (bucket, key) -> its cached ETags
        self.nbytes = 0
        self.budget: Optional[int] = None  # None: MANIFEST_CACHE_BYTES (tests set a smaller one)

    def __contains__(self, k: tuple) -> bool:
        with self._lock:
            return k in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def get(self, k: tuple) -> Optional[tuple[dict, bytes]]:
        with self._lock:
            got = self._items.get(k)
            if got is not None:
                self._items.move_to_end(k)
            return got

    def put(self, k: tuple, got: tuple[dict, bytes]) -> None:
        """Cache ``got`` (parsed, raw bytes) under ``k``; one larger than the whole budget is not kept."""
        budget = MANIFEST_CACHE_BYTES if self.budget is None else self.budget
        with self._lock:
            self._pop(k)
            if _weight(got) > budget:
                return
            self._items[k] = got
            self._of.setdefault(k[:2], set()).add(k)
            self.nbytes += _weight(got)
            while self.nbytes > budget:
                self._pop(next(iter(self._items)))

    def drop(self, bucket: str, key: str) -> None:
        """Forget every cached manifest of ``key`` (its entry was uncommitted)."""
        with self._lock:
            for k in list(self._of.get((bucket, key), ())):
                self._pop(k)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._of.clear()
            self.nbytes = 0

    def _pop(self, k: tuple) -> None:
        got = self._items.pop(k, None)
        if got is None:
            return
        self.nbytes -= _weight(got)
        keys = self._of.get(k[:2])
        if keys is not None:
            keys.discard(k)
            if not keys:
                del self._of[k[:2]]


def _weight(got: tuple[dict, bytes]) -> int:
    return PARSED_PER_BYTE * len(got[1])


KEPT = KeptListings()
MANIFESTS = ManifestCache()
