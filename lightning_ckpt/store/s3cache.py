"""The local read cache of checkpoints on S3: readers read local files, so a checkpoint on S3 is read through here.

``fetch`` downloads only the files a caller needs into ``<cache>/s3/<bucket>/<prefix>/<name>-<crc32c of its
manifest>/`` (a checkpoint replaced under the same name never mixes with an old copy), in parallel, each through a temp
file that is checked against the manifest (size and every checksum) before it is renamed into place: a corrupt or
truncated download never enters the cache, and once the object is repaired on S3 the next read fetches it again.
A download never asks for more bytes than the manifest gives (an object replaced by a larger one is refused at the
first response, ``store/s3client.download``), so a hostile bucket cannot fill the disk.
Several processes may fetch the same checkpoint at once (a lock per file). The most recently read
``LIGHTNING_CKPT_CACHE_KEEP`` versions of each S3 folder are kept; the others are removed after an hour unread.
"""
from __future__ import annotations

import concurrent.futures as cf
import fcntl
import logging
import os
import re
import time
from typing import Iterable

from ..errors import CheckpointNotFoundError
from ..format import manifest as mf
from ..format.checksum import crc32c
from ..format.tensorfile import check_file
from .fs import OPS, open_member
from .local import LocalStore

log = logging.getLogger("lightning_ckpt")

_CACHED = re.compile(r".+-[0-9a-f]{8}\Z")  # <name>-<crc32c of its manifest>: one cached checkpoint version
CACHE_IDLE_S = 3600.0  # a cached checkpoint is pruned only after this long without a read


def cache_root() -> str:
    """Where checkpoints read from S3 are cached: ``$LIGHTNING_CKPT_CACHE``, else ``~/.cache/lightning_ckpt``."""
    return os.environ.get("LIGHTNING_CKPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lightning_ckpt")


def cache_keep() -> int:
    """How many checkpoint versions of one S3 folder the read cache keeps: ``$LIGHTNING_CKPT_CACHE_KEEP`` (default 2;
    0 keeps every one)."""
    raw = os.environ.get("LIGHTNING_CKPT_CACHE_KEEP", "2")
    try:
        keep = int(raw)
        if keep < 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"LIGHTNING_CKPT_CACHE_KEEP={raw!r} is invalid; give a whole number >= 0 (0 keeps every "
                         "cached checkpoint)") from None
    return keep


def prune(folder: str, keep: int, idle_s: float = CACHE_IDLE_S) -> list[str]:
    """Remove cached checkpoint versions in ``folder`` (one S3 folder's cache) beyond the ``keep`` most recently read,
    leaving alone any read in the last ``idle_s`` seconds (another process may be loading it). Returns what was
    removed. A week-long run that resumes from S3 after each preemption would otherwise fill the disk."""
    if keep <= 0:
        return []
    try:
        entries = [e for e in os.listdir(folder) if _CACHED.match(e) and os.path.isdir(os.path.join(folder, e))]
    except OSError:
        return []
    used = {}
    for e in entries:
        try:
            used[e] = os.stat(os.path.join(folder, e)).st_mtime
        except OSError:
            pass
    now = time.time()
    store = LocalStore(folder, fsync=False)
    removed = [e for e in sorted(used, key=used.get, reverse=True)[keep:]
               if now - used[e] >= idle_s and store.delete(e)]
    if removed:
        log.info("lightning_ckpt: pruned %d cached checkpoint(s) in %s (LIGHTNING_CKPT_CACHE_KEEP=%d)",
                 len(removed), folder, keep)
    return removed


def cache_folder(store, name: str, raw_manifest: bytes) -> str:
    parts = [p for p in store.prefix.split("/") if p not in ("", ".", "..")]
    return os.path.join(cache_root(), "s3", store.bucket, *parts, f"{name}-{crc32c(raw_manifest):08x}")


def fetch(store, name: str, files: Iterable[str] | None = None, *, manifest: tuple[dict, bytes] | None = None,
          progress=None, refresh: bool = False) -> str:
    """Make ``files`` of entry ``name`` of the S3 ``store`` (all when None) readable locally; returns the folder.
    ``refresh`` drops the cached copies of those files first (a reader found one corrupt)."""
    mf.check_member_name(name, store.uri)
    m, raw = manifest if manifest is not None else store.read_manifest(name)
    local = cache_folder(store, name, raw)
    os.makedirs(local, exist_ok=True)
    os.utime(local)  # read now: the cache prunes the versions read longest ago
    cache = LocalStore(local, fsync=False)
    if not os.path.isfile(os.path.join(local, mf.MANIFEST)):
        cache.write_atomic(mf.MANIFEST, raw)  # a cache: a lost copy is fetched again
    wanted = sorted(m["files"]) if files is None else sorted(set(files))
    for fname in wanted:
        if fname not in m["files"]:
            raise CheckpointNotFoundError(f"{store.path(name)} has no file {fname!r}")
    if refresh:
        for fname in wanted:
            OPS.unlink(os.path.join(local, fname))
    missing = [f for f in wanted if not os.path.isfile(os.path.join(local, f))]
    if not missing:
        return local

    def down(fname: str) -> None:
        dst = os.path.join(local, fname)
        with open(os.path.join(local, f".{fname}.lock"), "w") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)  # another rank on this node may be fetching the same file
            if os.path.isfile(dst):
                return
            with cache.replacing(fname) as tmp:
                store.download(store.key(name, fname), tmp, m["files"][fname]["size"], progress)
                fd = open_member(os.path.dirname(tmp), os.path.basename(tmp), m["files"][fname]["size"],
                                 where=f"{store.path(name)}/{fname}")
                with os.fdopen(fd, "rb", buffering=0) as f:  # a corrupt download never enters the cache
                    check_file(f, m["files"][fname], f"{store.path(name)}/{fname}")

    with cf.ThreadPoolExecutor(min(8, len(missing))) as ex:
        list(ex.map(down, missing))
    prune(os.path.dirname(local), cache_keep())  # this one was just read: it is among the kept
    return local


def fetch_packs(store, entries: dict[str, dict], *, progress=None, refresh: bool = False) -> str:
    """Make the packs ``entries`` (pack name -> manifest entry) of the S3 ``store``'s content store readable locally;
    returns the cache folder that holds them. A pack never changes under its name, so a cached copy that was checked
    when it was downloaded is reused by every checkpoint that references it."""
    parts = [p for p in store.prefix.split("/") if p not in ("", ".", "..")]
    local = os.path.join(cache_root(), "s3", store.bucket, *parts, mf.BLOBS)
    os.makedirs(local, exist_ok=True)
    cache = LocalStore(local, fsync=False)
    for name in entries:
        mf.check_member_name(name, store.uri)
    if refresh:
        for name in entries:
            OPS.unlink(os.path.join(local, name))
    missing = sorted(n for n in entries if not os.path.isfile(os.path.join(local, n)))

    def down(name: str) -> None:
        dst = os.path.join(local, name)
        where = f"{store.uri}/{mf.BLOBS}/{name}"
        with open(os.path.join(local, f".{name}.lock"), "w") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            if os.path.isfile(dst):
                return
            with cache.replacing(name) as tmp:
                store.download(store.key(mf.BLOBS, name), tmp, entries[name]["size"], progress)
                fd = open_member(os.path.dirname(tmp), os.path.basename(tmp), entries[name]["size"], where=where)
                with os.fdopen(fd, "rb", buffering=0) as f:
                    check_file(f, entries[name], where)

    if missing:
        with cf.ThreadPoolExecutor(min(8, len(missing))) as ex:
            list(ex.map(down, missing))
    return local
