"""The ``latest.json`` hint, and finding a folder's newest checkpoint with it without reading every manifest.

``latest.json`` keeps its first fields (``name``, ``step``, ``epoch``: the checkpoint just committed) and adds an
``index``: for each run of the folder (``lineage.run_name``) its newest checkpoint (name, version, step, commit
time, SHA-256 of the manifest's bytes), and the ids of every entry whose manifest the index accounts for (8 bytes
each: XXH3-64 of name and version; the version is the entry folder's inode locally, the manifest object's ETag on S3).

Reading (``newest``): list the entry names (locally ``scandir``, no ``stat``; on S3 the one paginated LIST that
any reader makes). Entries whose id the index lacks (committed since, by a writer that died before it published,
pulled, copied in) are read; so is the run's entry of the index, whose version and SHA-256 must match. Anything
that does not add up (no index, an unknown index version, a run's entry gone or changed, a manifest that cannot be
read) returns None: the caller lists and reads every manifest, as before. The hint can therefore only make a reader
faster: a lost or stale update leaves more entries to read, never a wrong answer, with one residual window named in
``publish_local``.

Writing (``publish_local`` / ``publish_s3``): the old index plus the entry just committed (one manifest, which the
writer passes). Locally the entry names are listed again (``scandir``) at the first publish of a process and every
``RESCAN_EVERY`` publishes, so the ids of deleted entries go and entries committed without a publish are accounted;
on S3 the ids are re-listed when they outgrow the last listing by ``RESCAN_EVERY`` or an eighth of it, whichever is
more (a listing of the location costs pages in proportion to its size, so it is taken in proportion less often: the
same cost per publish at any size; an id of a deleted entry left meanwhile only makes the index a little larger).
A folder without an index (a first save, or written by an older release) is indexed once by reading every manifest.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import struct
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable

import xxhash

from ..errors import CheckpointError, CheckpointNotFoundError
from ..format import manifest as mf

log = logging.getLogger("lightning_ckpt")

VERSION = 1
RESCAN_EVERY = 64
MAX_IDS = 1 << 20  # 8 MiB of ids: a hint larger than that is ignored (and rebuilt at the next publish)


def entry_id(name: str, version: Any) -> int:
    return xxhash.xxh3_64_intdigest(f"{name}\0{version}".encode())


def run_of(m: dict) -> str | None:
    lin = m.get("lineage")
    name = lin.get("run_name") if isinstance(lin, dict) else None
    return name if isinstance(name, str) else None


def order_key(step: int, created: Any, name: str) -> tuple:
    """The order ``list_checkpoints`` sorts by: step, then commit time, then name."""
    return (step, float(created) if isinstance(created, (int, float)) and not isinstance(created, bool) else 0.0, name)


def _created(m: dict) -> float:
    c = m.get("created_unix")
    return float(c) if isinstance(c, (int, float)) and not isinstance(c, bool) else 0.0


@dataclass
class Index:
    runs: dict = field(default_factory=dict)  # run_name (None: the main line) -> entry dict
    ids: set = field(default_factory=set)

    @staticmethod
    def parse(doc: Any) -> "Index | None":
        """The index of a ``latest.json`` document, or None when there is none or it is not exactly as written here."""
        idx = doc.get("index") if isinstance(doc, dict) else None
        if not isinstance(idx, dict) or idx.get("v") != VERSION:
            return None
        runs, ids_text = idx.get("runs"), idx.get("ids")
        if not isinstance(runs, list) or not isinstance(ids_text, str) or len(ids_text) > MAX_IDS * 8 * 4 // 3 + 4:
            return None
        out = Index()
        for e in runs:
            if not (isinstance(e, dict) and isinstance(e.get("name"), str) and mf.is_plain_name(e["name"])
                    and isinstance(e.get("version"), str) and isinstance(e.get("sha"), str)
                    and isinstance(e.get("step"), int) and not isinstance(e.get("step"), bool)
                    and isinstance(e.get("created"), (int, float)) and not isinstance(e.get("created"), bool)
                    and (e.get("run_name") is None or isinstance(e.get("run_name"), str))):
                return None
            if e["run_name"] in out.runs:
                return None
            out.runs[e["run_name"]] = e
        try:
            raw = base64.b64decode(ids_text, validate=True)
        except ValueError:
            return None
        if len(raw) % 8:
            return None
        out.ids = set(struct.unpack(f"<{len(raw) // 8}Q", raw))
        return out

    def to_doc(self) -> dict:
        """The ``index`` field of ``latest.json``. The ids go in the set's order (readers take them as a set; sorting
        3,000 of them cost 0.2 ms a publish)."""
        return {"v": VERSION, "runs": [self.runs[k] for k in sorted(self.runs, key=lambda k: (k is not None, k or ""))],
                "ids": base64.b64encode(struct.pack(f"<{len(self.ids)}Q", *self.ids)).decode()}

    def copy(self) -> "Index":
        return Index(dict(self.runs), set(self.ids))

    def add(self, name: str, version: Any, m: dict, raw: bytes) -> bool:
        """Account for committed entry ``name`` (its manifest ``m``, bytes ``raw``). False when that cannot be done
        from the index alone: the run's newest entry was replaced under its name by an older checkpoint, so which
        one is now the run's newest needs every manifest (the caller indexes the folder again)."""
        self.ids.add(entry_id(name, version))
        e = {"run_name": run_of(m), "name": name, "version": str(version), "step": int(m["step"]),
             "created": _created(m), "sha": hashlib.sha256(raw).hexdigest()}
        old = self.runs.get(e["run_name"])
        newer = old is None or (order_key(e["step"], e["created"], name)
                                >= order_key(old["step"], old["created"], old["name"]))
        if newer or old["name"] == name:
            self.runs[e["run_name"]] = e
        return newer or old["name"] != name


# ------------------------------------------------------------------------------------------------ local folders
_MEMO: dict[str, int] = {}  # local root -> publishes by this process since its last scan
_MEMO_LOCK = threading.Lock()
_BUILT: dict[str, Index] = {}  # local root -> the index publish_local built last (not written yet)
_WRITTEN: dict[str, tuple[tuple, Index]] = {}  # local root -> (latest.json's signature, the index written there)


def _signature(root: str) -> tuple | None:
    """Inode, size and modification time of a folder's ``latest.json``: any other writer (``os.replace`` of a new
    file) changes it."""
    try:
        st = os.lstat(os.path.join(root, mf.LATEST))
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def written_local(root: str) -> None:
    """``LocalStore.publish_latest`` wrote the document ``publish_local`` built last for ``root``: its index is the
    next publish's starting point, while ``latest.json`` keeps this signature (no parse of the file each save)."""
    sig = _signature(root)
    with _MEMO_LOCK:
        idx = _BUILT.pop(root, None)
        if idx is not None and sig is not None:
            _WRITTEN[root] = (sig, idx)
        else:
            _WRITTEN.pop(root, None)


def _last_local(store: Any) -> Index | None:
    """The index in ``latest.json``: the one this process wrote there when the file is still that one (a copy),
    else parsed from the file."""
    sig = _signature(store.root)
    with _MEMO_LOCK:
        known = _WRITTEN.get(store.root)
    if known is not None and sig is not None and known[0] == sig:
        return known[1].copy()
    return Index.parse(store.read_latest())


def local_entries(root: str) -> dict[str, int]:
    """{name: inode} of the plain entry folders of ``root`` (``scandir``: no ``stat`` per entry)."""
    out = {}
    try:
        with os.scandir(root) as it:
            for e in it:
                if mf.is_plain_name(e.name) and e.is_dir(follow_symlinks=False):
                    out[e.name] = e.inode()
    except OSError:
        return {}
    return out


def _manifest_file(root: str, name: str) -> bool:
    import stat

    try:
        return stat.S_ISREG(os.lstat(os.path.join(root, name, mf.MANIFEST)).st_mode)
    except OSError:
        return False


def _account(store: Any, idx: Index, present: dict[str, Any], names: Iterable[str]) -> None:
    """Read the manifests of ``names`` and add them; unreadable ones stay out of the index (readers read them)."""
    for name in names:
        if not store.remote and not _manifest_file(store.root, name):
            continue
        try:
            m, raw = store.read_manifest(name)
        except CheckpointError:
            continue
        idx.add(name, present[name], m, raw)


def _rescan_local(store: Any, old: Index | None, adding: str | None = None) -> Index:
    """The index of what the folder holds, from ``old`` where it still holds, else from the manifests; ``adding``: a
    name whose manifest the caller adds itself (just committed: not read again)."""
    present = local_entries(store.root)
    if adding is not None:
        present.pop(adding, None)
    idx = Index()
    if old is not None and all(present.get(e["name"]) is not None and e["version"] == str(present[e["name"]])
                               for e in old.runs.values()):
        idx.runs = dict(old.runs)
        known = {entry_id(n, v) for n, v in present.items()} & old.ids
        idx.ids = known
        _account(store, idx, present, [n for n, v in present.items() if entry_id(n, v) not in known])
    else:  # no usable index, or a run's newest entry was deleted or replaced: read every manifest, once
        _account(store, idx, present, sorted(present))
    return idx


def publish_local(store: Any, doc: dict, manifest: tuple[dict, bytes] | None) -> dict:
    """``doc`` with the folder's index, for ``LocalStore.publish_latest``. Never raises: the hint is only a hint.

    The one window where a reader could trust the index wrongly: an entry deleted since the last scan whose name is
    then committed again, by a writer that dies before it publishes, into a folder whose inode number the filesystem
    reused for it. The first publish of each process rescans, so this needs a deletion and that commit in the same
    process, between two scans."""
    with _MEMO_LOCK:
        _BUILT.pop(store.root, None)  # (one built for a write that failed)
    try:
        name = doc["name"]
        version = os.lstat(store.path(name)).st_ino
        last = store.last_commit
        if manifest is None and last is not None and last[0] == name:
            manifest = (json.loads(last[1]), last[1])  # this store object's own commit, just written
        m, raw = manifest if manifest is not None else store.read_manifest(name)
        old = _last_local(store)
        with _MEMO_LOCK:
            n = _MEMO.get(store.root)
            rescan = old is None or n is None or n >= RESCAN_EVERY
            _MEMO[store.root] = 0 if rescan else n + 1
        idx = _rescan_local(store, old, adding=name) if rescan else old
        if not idx.add(name, version, m, raw):
            idx = _rescan_local(store, None)
        if len(idx.ids) > MAX_IDS:
            return doc
        with _MEMO_LOCK:
            _BUILT[store.root] = idx
        return {**doc, "index": idx.to_doc()}
    except Exception as e:  # noqa: BLE001 - a hint that cannot be built is left out, never a failed save
        log.warning("lightning_ckpt: latest.json of %s is written without its index (%r); readers list the folder",
                    store.uri, e)
        return doc


# ------------------------------------------------------------------------------------------------ S3 locations
def etag(obj: dict) -> str:
    return str(obj.get("ETag", "")).strip('"')


def publish_s3(store: Any, doc: dict, manifest: tuple[dict, bytes] | None, old_doc: Any) -> dict:
    """``doc`` with the location's index, for ``S3Store.publish_latest`` (``old_doc``: the current ``latest.json``).
    The version of an entry is its manifest's MD5 (the ETag of a one-part upload; an ETag that is not one just makes
    readers read that manifest). Never raises."""
    try:
        name = doc["name"]
        last = getattr(store, "last_commit", None)
        if manifest is None and last is not None and last[0] == name:
            manifest = (json.loads(last[1]), last[1])  # pushed just now by this store object
        m, raw = manifest if manifest is not None else store.read_manifest(name)
        old = Index.parse(old_doc)
        meta = old_doc.get("index", {}).get("listed", 0) if isinstance(old_doc, dict) and old is not None else 0
        listed = meta if isinstance(meta, int) and not isinstance(meta, bool) else 0
        if old is None or len(old.ids) >= listed + max(RESCAN_EVERY, listed // 8):  # amortized: O(1) per publish
            present = {n: etag(objs[mf.MANIFEST]) for n, objs in store.objects_by_name().items() if mf.MANIFEST in objs}
            if old is not None and all(present.get(e["name"]) == e["version"] for e in old.runs.values()):
                idx = Index(dict(old.runs), {entry_id(n, v) for n, v in present.items()} & old.ids)
                _account(store, idx, present, [n for n, v in present.items() if entry_id(n, v) not in idx.ids])
            else:
                idx = Index()
                _account(store, idx, present, sorted(present))
            listed = len(idx.ids) + 1
        else:
            idx = old
        if not idx.add(name, hashlib.md5(raw).hexdigest(), m, raw):
            present = {n: etag(objs[mf.MANIFEST]) for n, objs in store.objects_by_name().items() if mf.MANIFEST in objs}
            idx = Index()
            _account(store, idx, present, sorted(present))
            listed = len(idx.ids) + 1
        if len(idx.ids) > MAX_IDS:
            return doc
        return {**doc, "index": {**idx.to_doc(), "listed": listed}}
    except Exception as e:  # noqa: BLE001
        log.warning("lightning_ckpt: latest.json of %s is written without its index (%r)", store.uri, e)
        return doc


# ------------------------------------------------------------------------------------------------ reading
def newest(store: Any, run_name: Any, any_run: bool) -> list[tuple[str, dict]] | None:
    """The newest committed checkpoint of run ``run_name`` (every run's with ``any_run``) found through the hint,
    as ``[(name, manifest)]`` (``[]``: the run has none), or None when the hint cannot answer (the caller lists and
    reads every manifest)."""
    doc = store.read_latest()
    idx = Index.parse(doc)
    if idx is None:
        return None
    if store.remote:
        present = {n: etag(objs[mf.MANIFEST]) for n, objs in store.objects_by_name().items() if mf.MANIFEST in objs}
    else:
        present = local_entries(store.root)
    wanted = list(idx.runs.values()) if any_run else [e for k, e in idx.runs.items() if k == run_name]
    found: list[tuple[tuple, str, dict]] = []
    for e in wanted:
        if str(present.get(e["name"])) != e["version"]:
            return None  # deleted or replaced since it was published
        try:
            m, raw = store.read_manifest(e["name"])
        except CheckpointError:
            return None
        if (hashlib.sha256(raw).hexdigest() != e["sha"] or run_of(m) != e["run_name"]
                or int(m["step"]) != e["step"]):
            return None
        found.append((order_key(int(m["step"]), m.get("created_unix"), e["name"]), e["name"], m))
    for name, version in present.items():
        if entry_id(name, version) in idx.ids:
            continue
        if not store.remote and not _manifest_file(store.root, name):
            continue  # a folder that is not a checkpoint (an export, ``merged``)
        try:
            m, _ = store.read_manifest(name)
        except CheckpointNotFoundError:
            continue  # deleted since the listing
        except CheckpointError:
            return None  # corrupt or newer: the full listing warns, skips, or says to upgrade
        if any_run or run_of(m) == run_name:
            found.append((order_key(int(m["step"]), m.get("created_unix"), name), name, m))
    found.sort(key=lambda t: t[0])
    return [(found[-1][1], found[-1][2])] if found else []


def hint_json(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()
