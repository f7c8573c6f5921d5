"""Checkpoints on S3 (boto3): push a committed checkpoint folder, pull one back.

Settings come from the standard AWS environment and config files, the way boto3 reads them (``AWS_ENDPOINT_URL``,
``AWS_PROFILE``, ``AWS_ACCESS_KEY_ID``, ...); nothing about credentials is written to checkpoints or logs.

Order on upload (the same commit protocol as on disk): every data file first (multipart, parallel parts, S3-side
CRC32C checksums), ``manifest.json`` last, then ``<prefix>/latest.json``; a checkpoint whose manifest is not there
is not a checkpoint, so an interrupted upload is never seen as one. A pull downloads into a ``.partial-*`` folder,
verifies every byte against the manifest and renames it into place.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import CheckpointError, CheckpointNotFoundError
from ..format import manifest as mf
from .local import atomic_write_bytes, remove_tree, replacing

log = logging.getLogger("lightning_ckpt")
_CACHED = re.compile(r".+-[0-9a-f]{8}$")  # <name>-<crc32c of its manifest>: one cached checkpoint version

ProgressFn = Optional[Callable[[int], None]]


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix``) (no leading or trailing slash)."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an S3 URI; write it as s3://bucket/prefix")
    rest = uri[5:]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket; write it as s3://bucket/prefix")
    return bucket, prefix.strip("/")


def is_s3_uri(x: object) -> bool:
    return isinstance(x, str) and x.startswith("s3://")


def _client():
    try:
        import boto3
        from botocore.config import Config
    except ImportError:  # pragma: no cover
        raise CheckpointError("S3 support needs boto3: pip install 'lightning-ckpt[s3]'") from None
    return boto3.client("s3", config=Config(retries={"max_attempts": 8, "mode": "adaptive"}))


def _transfer_config():
    """Downloads: 64 MiB parts, 8 in flight."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=8)


def _upload_config():
    """Uploads: 8 MiB parts, 8 in flight. Measured (benchmarks/bench_s3.py) against 64 MiB parts: botocore reads each
    part several times (checksum, signature, send), which stays in the CPU cache with small parts; the client's CPU
    time dropped by a quarter and the upload ran about 1.2x boto3's defaults instead of 0.8-0.96x."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20, max_concurrency=8)


@dataclass
class TransferResult:
    uri: str
    files: int
    bytes: int


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def push_checkpoint(path: str, dest: str, *, progress: ProgressFn = None, verify: bool = True) -> TransferResult:
    """Upload the committed checkpoint at ``path`` to ``dest`` (``s3://bucket/prefix``): it becomes
    ``s3://bucket/prefix/<name>/``, and ``s3://bucket/prefix/latest.json`` points at it. With ``verify`` (default) a
    local copy that fails verification is not committed on S3 (``CheckpointCorruptError``)."""
    from ..checkpoints import verify_checkpoint

    path = os.fspath(path)
    m = mf.read_manifest(path)
    bucket, prefix = parse_s3_uri(dest)
    name = os.path.basename(os.path.normpath(path))
    key_base = _join(prefix, name)
    s3 = _client()
    cfg = _upload_config()
    extra = {"ChecksumAlgorithm": "CRC32C"}
    files = sorted(m["files"])
    mpath = os.path.join(path, mf.MANIFEST)
    with open(mpath, "rb") as f:
        local_manifest = f.read()
    try:
        existing = _get_object(s3, bucket, _join(key_base, mf.MANIFEST), _MAX_MANIFEST)
    except CheckpointNotFoundError:
        existing = None
    if existing == local_manifest:  # already uploaded whole (the manifest goes up last): only point latest.json at it
        files = []
    elif existing is not None:
        # another checkpoint of the same name is there: un-commit it first, so that an interrupted overwrite is
        # never listed as a checkpoint whose files do not match its manifest
        s3.delete_object(Bucket=bucket, Key=_join(key_base, mf.MANIFEST))

    def up(fname: str) -> int:
        p = os.path.join(path, fname)
        s3.upload_file(p, bucket, _join(key_base, fname), ExtraArgs=extra, Config=cfg,
                       Callback=progress if progress is not None else None)
        return os.path.getsize(p)

    # the local copy is verified while its objects go up (it is read from the page cache, off the upload's critical
    # path); the manifest, which makes the checkpoint visible on S3, goes up only if every byte checked out
    with cf.ThreadPoolExecutor(1) as vex:
        checked = vex.submit(verify_checkpoint, path) if verify and files else None
        try:
            with cf.ThreadPoolExecutor(4) as ex:
                total = sum(ex.map(up, files))
        finally:
            bad = checked.exception() if checked is not None else None
        if bad is not None:
            for fname in files:  # never committed: remove what went up
                try:
                    s3.delete_object(Bucket=bucket, Key=_join(key_base, fname))
                except Exception:  # noqa: BLE001 - remove_orphans cleans up later
                    pass
            raise bad
    if files or existing is None:
        s3.upload_file(mpath, bucket, _join(key_base, mf.MANIFEST), ExtraArgs=extra)  # the commit point on S3
    if remote_latest_step(dest) <= m["step"]:  # latest.json never moves back to an older checkpoint (e.g. `lightning-ckpt push` of an old one)
        latest = json.dumps({"name": name, "step": m["step"], "epoch": m.get("epoch")}).encode()
        s3.put_object(Bucket=bucket, Key=_join(prefix, mf.LATEST), Body=latest, ChecksumAlgorithm="CRC32C")
    return TransferResult(f"s3://{bucket}/{key_base}", len(files) + 1, total + os.path.getsize(mpath))


def _objects_by_name(s3, dest: str) -> dict[str, dict[str, dict]]:
    """The objects directly inside each checkpoint-name folder under ``dest``: {name: {file name: object listing}}."""
    from botocore.exceptions import ClientError

    bucket, prefix = parse_s3_uri(dest)
    out: dict[str, dict[str, dict]] = {}
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=(prefix + "/") if prefix else ""):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) + 1 :] if prefix else obj["Key"]
                parts = rel.split("/")
                if len(parts) == 2 and not parts[0].startswith("."):
                    out.setdefault(parts[0], {})[parts[1]] = obj
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") == "NoSuchBucket":
            raise CheckpointNotFoundError(f"the bucket of {dest} does not exist; create it or fix the URI") from None
        raise
    return out


def list_remote(dest: str) -> list[str]:
    """Names of the committed checkpoints under ``dest`` (those whose manifest is there)."""
    return sorted(name for name, objs in _objects_by_name(_client(), dest).items() if mf.MANIFEST in objs)


def pull_checkpoint(src: str, dest_dir: str, *, progress: ProgressFn = None) -> str:
    """Download the checkpoint at ``src`` (``s3://bucket/prefix/<name>``, or ``s3://bucket/prefix`` for the one its
    ``latest.json`` names) into ``dest_dir/<name>``, verify every byte, and return the local path."""
    from ..checkpoints import verify_checkpoint

    bucket, key = parse_s3_uri(src)
    s3 = _client()
    try:
        raw_manifest = _get_object(s3, bucket, _join(key, mf.MANIFEST), _MAX_MANIFEST)
    except CheckpointNotFoundError:
        latest = json.loads(_get_object(s3, bucket, _join(key, mf.LATEST), 1 << 20))
        name = latest.get("name")
        mf.check_member_name(name, f"s3://{bucket}/{_join(key, mf.LATEST)}")
        key = _join(key, name)
        raw_manifest = _get_object(s3, bucket, _join(key, mf.MANIFEST), _MAX_MANIFEST)
    name = key.rsplit("/", 1)[-1]
    mf.check_member_name(name, src)
    m = _parse_manifest(raw_manifest, f"s3://{bucket}/{key}/{mf.MANIFEST}")
    os.makedirs(dest_dir, exist_ok=True)
    final = os.path.join(dest_dir, name)
    partial = os.path.join(dest_dir, f"{mf.PARTIAL_PREFIX}{name}-{uuid.uuid4().hex[:8]}")
    os.makedirs(partial)
    cfg = _transfer_config()
    try:
        def down(fname: str) -> None:
            s3.download_file(bucket, _join(key, fname), os.path.join(partial, fname), Config=cfg,
                             Callback=progress if progress is not None else None)

        with cf.ThreadPoolExecutor(4) as ex:
            list(ex.map(down, sorted(m["files"])))
        with open(os.path.join(partial, mf.MANIFEST), "wb") as f:
            f.write(raw_manifest)
        verify_checkpoint(partial)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final


def remote_steps(dest: str) -> list[tuple[int, str]]:
    """(step, name) of the committed checkpoints under ``dest``, newest first (read from their manifests)."""
    return sorted(((int(m["step"]), name) for name, m in remote_manifests(dest)), reverse=True)


def delete_remote(dest: str, name: str) -> None:
    """Delete the checkpoint ``name`` under ``dest``: its manifest first (from then on it is not a checkpoint)."""
    mf.check_member_name(name, "delete_remote")
    bucket, prefix = parse_s3_uri(dest)
    s3 = _client()
    base = _join(prefix, name)
    s3.delete_object(Bucket=bucket, Key=_join(base, mf.MANIFEST))
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base + "/"):
        keys += [{"Key": o["Key"]} for o in page.get("Contents", [])]
    for i in range(0, len(keys), 1000):
        s3.delete_objects(Bucket=bucket, Delete={"Objects": keys[i : i + 1000]})


# ---------------------------------------------------------------------------------------------------------------------
# Reading checkpoints in place on S3: listing (manifests only), and fetching into a local cache (only the files a
# caller needs; every byte is verified when it is read).

import threading as _threading  # noqa: E402

_MANIFESTS: dict = {}  # (bucket, key, etag) -> validated manifest: a committed manifest never changes under one ETag
_MANIFESTS_LOCK = _threading.Lock()
_MAX_MANIFEST = 64 * 1024 * 1024


def _get_object(s3, bucket: str, key: str, limit: int | None = None) -> bytes:
    from botocore.exceptions import ClientError

    try:
        resp = s3.get_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NoSuchBucket"):
            raise CheckpointNotFoundError(f"s3://{bucket}/{key} does not exist") from None
        raise
    body = resp["Body"]
    if limit is not None and int(resp.get("ContentLength") or 0) > limit:
        body.close()
        from ..errors import CheckpointCorruptError

        raise CheckpointCorruptError(f"s3://{bucket}/{key} is larger than {limit} bytes; refusing to read it")
    return body.read()


def _parse_manifest(raw: bytes, where: str) -> dict:
    from ..errors import CheckpointCorruptError

    try:
        m = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointCorruptError(f"{where} is not valid JSON ({e}); the checkpoint is corrupt, use an earlier one") from None
    return mf.validate_manifest(m, where)


def read_remote_manifest(uri: str) -> tuple[dict, bytes]:
    """The validated manifest of the checkpoint at ``uri`` (``s3://bucket/prefix/<name>``) and its raw bytes."""
    bucket, key = parse_s3_uri(uri)
    try:
        raw = _get_object(_client(), bucket, _join(key, mf.MANIFEST), _MAX_MANIFEST)
    except CheckpointNotFoundError:
        raise CheckpointNotFoundError(
            f"no committed checkpoint at {uri} (it has no manifest.json; an interrupted upload is not a checkpoint). "
            f"List the checkpoints with `lightning-ckpt ls s3://{bucket}/<prefix>` or use latest_checkpoint('s3://...')."
        ) from None
    return _parse_manifest(raw, f"s3://{bucket}/{_join(key, mf.MANIFEST)}"), raw


def remote_manifests(dest: str) -> list[tuple[str, dict]]:
    """(name, manifest) of every committed checkpoint under ``dest`` whose manifest reads and validates; the others
    are skipped with a warning. Manifests are cached by ETag, so listing again costs one LIST request."""
    import warnings

    bucket, prefix = parse_s3_uri(dest)
    s3 = _client()
    found = {name: str(objs[mf.MANIFEST].get("ETag", "")) for name, objs in _objects_by_name(s3, dest).items()
             if mf.MANIFEST in objs}
    out = []
    for name, etag in sorted(found.items()):
        key = _join(prefix, name, mf.MANIFEST)
        with _MANIFESTS_LOCK:
            m = _MANIFESTS.get((bucket, key, etag))
        if m is None:
            try:
                mf.check_member_name(name, dest)
                m = _parse_manifest(_get_object(s3, bucket, key, _MAX_MANIFEST), f"s3://{bucket}/{key}")
            except CheckpointError as e:
                warnings.warn(f"lightning_ckpt: skipping s3://{bucket}/{_join(prefix, name)}: {e}", stacklevel=2)
                continue
            with _MANIFESTS_LOCK:
                _MANIFESTS[(bucket, key, etag)] = m
        out.append((name, m))
    return out


def cache_root() -> str:
    """Where checkpoints read from S3 are cached: ``$LIGHTNING_CKPT_CACHE``, else ``~/.cache/lightning_ckpt``."""
    return os.environ.get("LIGHTNING_CKPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lightning_ckpt")


CACHE_IDLE_S = 3600.0  # a cached checkpoint is pruned only after this long without a read


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


def prune_cache(folder: str, keep: int, idle_s: float = CACHE_IDLE_S) -> list[str]:
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
    removed = []
    for e in sorted(used, key=used.get, reverse=True)[keep:]:
        if now - used[e] < idle_s:
            continue
        trash = os.path.join(folder, f"{mf.TRASH_PREFIX}{e}-{uuid.uuid4().hex[:6]}")
        try:
            os.rename(os.path.join(folder, e), trash)  # atomic: a fetch from now on downloads it again
        except OSError:
            continue
        remove_tree(trash)
        removed.append(e)
    if removed:
        log.info("lightning_ckpt: pruned %d cached checkpoint(s) in %s (LIGHTNING_CKPT_CACHE_KEEP=%d)",
                 len(removed), folder, keep)
    return removed


def fetch_checkpoint(uri: str, files=None, *, manifest: tuple[dict, bytes] | None = None, progress: ProgressFn = None) -> str:
    """Make the checkpoint at ``uri`` (``s3://bucket/prefix/<name>``) readable locally and return the local folder.

    Only ``files`` (names from its manifest; all when ``None``) are downloaded, in parallel, into a cache folder keyed
    by the manifest's checksum, so a checkpoint replaced under the same name never mixes with an old copy. Files
    already there are reused; several processes may fetch the same checkpoint at once (per-file locks). Nothing is
    verified here: every reader verifies each byte it reads against the manifest.
    """
    import fcntl

    from ..format.checksum import crc32c

    bucket, key = parse_s3_uri(uri)
    name = key.rsplit("/", 1)[-1]
    mf.check_member_name(name, uri)
    m, raw = manifest if manifest is not None else read_remote_manifest(uri)
    local = os.path.join(cache_root(), "s3", bucket, *[p for p in key.split("/")[:-1] if p not in ("", ".", "..")],
                         f"{name}-{crc32c(raw):08x}")
    keep = cache_keep()
    os.makedirs(local, exist_ok=True)
    os.utime(local)  # read now: the cache prunes the versions read longest ago
    mpath = os.path.join(local, mf.MANIFEST)
    if not os.path.isfile(mpath):
        atomic_write_bytes(mpath, raw, fsync=False)  # a cache: a lost copy is fetched again
    wanted = sorted(m["files"]) if files is None else sorted(set(files))
    for fname in wanted:
        if fname not in m["files"]:
            raise CheckpointNotFoundError(f"{uri} has no file {fname!r}")
    missing = [f for f in wanted if not os.path.isfile(os.path.join(local, f))]
    if not missing:
        return local
    s3 = _client()
    cfg = _transfer_config()

    def down(fname: str) -> None:
        dst = os.path.join(local, fname)
        with open(os.path.join(local, f".{fname}.lock"), "w") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)  # another rank on this node may be fetching the same file
            if os.path.isfile(dst):
                return
            with replacing(dst) as tmp:
                s3.download_file(bucket, _join(key, fname), tmp, Config=cfg, Callback=progress)

    from botocore.exceptions import ClientError

    try:
        with cf.ThreadPoolExecutor(min(8, len(missing))) as ex:
            list(ex.map(down, missing))
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            from ..errors import CheckpointCorruptError

            raise CheckpointCorruptError(f"{uri} lacks a file its manifest lists ({e}); the upload is incomplete or "
                                         "was damaged. Use an earlier checkpoint.") from None
        raise
    prune_cache(os.path.dirname(local), keep)  # this one was just read: it is among the kept
    return local


def remove_orphans(dest: str, older_than_s: float = 3600.0) -> list[str]:
    """Delete what interrupted uploads and deletions left under ``dest``: objects of a name that has no
    ``manifest.json`` (so it was never, or is no longer, a checkpoint) and that nothing touched for ``older_than_s``
    seconds (an upload in progress elsewhere is left alone). Returns the names cleaned up."""
    import datetime as _dt

    bucket, _ = parse_s3_uri(dest)
    s3 = _client()
    now = _dt.datetime.now(_dt.timezone.utc)
    cleaned = []
    for name, objs in sorted(_objects_by_name(s3, dest).items()):
        if mf.MANIFEST in objs:
            continue
        newest = max(o["LastModified"] for o in objs.values())
        if (now - newest).total_seconds() < older_than_s:
            continue
        keys = [{"Key": o["Key"]} for o in objs.values()]
        for i in range(0, len(keys), 1000):
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys[i : i + 1000]})
        cleaned.append(name)
    return cleaned


def remote_latest_step(dest: str) -> int:
    """The step ``dest``'s ``latest.json`` names (-1 when there is none or it is unreadable; it is only a hint)."""
    bucket, prefix = parse_s3_uri(dest)
    try:
        d = json.loads(_get_object(_client(), bucket, _join(prefix, mf.LATEST), 1 << 20))
    except (CheckpointNotFoundError, ValueError, UnicodeDecodeError):
        return -1
    step = d.get("step") if isinstance(d, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else -1
