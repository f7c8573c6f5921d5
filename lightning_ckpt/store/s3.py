"""The S3 store (boto3): committed checkpoints under ``s3://bucket/prefix/<name>/``, the same commit protocol as on
disk.

Settings come from the standard AWS environment and config files, the way boto3 reads them (``AWS_ENDPOINT_URL``,
``AWS_PROFILE``, ``AWS_ACCESS_KEY_ID``, ...); nothing about credentials is written to checkpoints or logs.

Commit on S3: every data object first (multipart, parallel parts, S3-side CRC32C), ``manifest.json`` last, then
``<prefix>/latest.json``; a name without its manifest is not a checkpoint, so an interrupted upload is never listed.
Deletion: the manifest first (from then on it is not a checkpoint), then the objects. Objects left without a manifest
by an interrupted upload or deletion are removed by :meth:`S3Store.cleanup` once nothing touched them for an hour.
Every S3 request goes through a method of :class:`S3Store` (the fault-injection tests wrap them); an endpoint that
does not answer within the timeouts and attempts of ``store/s3client.py`` (``LIGHTNING_CKPT_S3_*``) is one
:class:`StorageUnavailableError`. Reads never take more bytes than the manifest (or the bound) allows.
Packs of the content store (``<prefix>/.blobs/``) a push found there carry reuse marks while it commits
(:meth:`S3Store.collect_packs`).

One cohesive object, kept whole past 400 lines: every S3 request of the package is a method of :class:`S3Store`, so
the kill -9 campaign can wrap each request and nothing else; the client settings and downloads are in ``s3client``.
"""
from __future__ import annotations

import contextlib
import json
import logging
from typing import Any, Callable, Iterable, Iterator, Optional

from ..errors import CheckpointCorruptError, CheckpointError, CheckpointNotFoundError, StorageUnavailableError
from ..format import manifest as mf
from . import s3client
from .base import NoLock, Store, check_folder_file, owner_token
from .s3client import client, error_code as _code, is_unavailable
from .s3listing import KEPT, MANIFESTS
from .s3sweep import REUSED  # <prefix>/.blobs/<pack>.reused~<host>.<pid>: a push of that process reused the pack

__all__ = ["S3Store", "S3Transaction", "client", "parse_s3_uri", "join_key"]

log = logging.getLogger("lightning_ckpt")

ProgressFn = Optional[Callable[[int], None]]
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
SCHEME = "s3://"


def parse_s3_uri(uri: Any) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix``) (no leading or trailing slash)."""
    if not isinstance(uri, str) or not uri.startswith(SCHEME):
        raise ValueError(f"{uri!r} is not an S3 URI; write it as s3://bucket/prefix")
    bucket, _, prefix = uri[len(SCHEME):].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket; write it as s3://bucket/prefix")
    if any(p in (".", "..") for p in prefix.split("/")):
        raise ValueError(f"{uri!r} has a '.' or '..' segment; write the prefix without them")
    return bucket, prefix.strip("/")


def join_key(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def upload_config() -> Any:
    """Uploads: 8 MiB parts, 8 in flight. Measured (benchmarks/bench_s3.py) against 64 MiB parts: botocore reads each
    part several times (checksum, signature, send), which stays in the CPU cache with small parts; the client's CPU
    time dropped by a quarter and the upload ran about 1.2x boto3's defaults instead of 0.8-0.96x."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20, max_concurrency=8)


class S3Store(Store):
    """Checkpoints under ``s3://bucket/prefix``."""

    remote = True
    read_cache = True  # reads go through the local read cache (store/s3cache.py)
    owners_recorded = False  # objects under an entry's name carry no owner: cleanup goes by age there
    last_commit: tuple[str, bytes] | None = None  # (name, manifest bytes) this object pushed last (store/hint.py)

    def __init__(self, uri: str) -> None:
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r})"

    def key(self, *parts: str) -> str:
        return join_key(self.prefix, *parts)

    # ---------------------------------------------------------------- requests (one method each)
    @contextlib.contextmanager
    def _request(self, what: str) -> Iterator[None]:
        """An endpoint that is down or never answers (after the timeouts and retries, ``store/s3client.py``) is one
        :class:`StorageUnavailableError`, whatever botocore, urllib3 or the socket raised."""
        try:
            yield
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - botocore's errors, without importing botocore here
            if is_unavailable(e):
                raise s3client.unavailable(e, what) from e
            raise

    def get_bytes(self, key: str, limit: int, *, tail: bool = False) -> bytes:
        """The object's bytes, at most ``limit`` (a larger object is ``CheckpointCorruptError``; with ``tail``, its
        last ``limit`` bytes, one suffix-ranged GET)."""
        with self._request(f"reading s3://{self.bucket}/{key}"):
            try:
                resp = client().get_object(Bucket=self.bucket, Key=key,
                                           Range=f"bytes=-{limit}" if tail else f"bytes=0-{limit}")
            except Exception as e:  # noqa: BLE001 - botocore's ClientError, without importing botocore here
                if _code(e) in ("NoSuchKey", "404", "NoSuchBucket"):
                    raise CheckpointNotFoundError(f"s3://{self.bucket}/{key} does not exist") from None
                if _code(e) in ("InvalidRange", "416"):
                    return b""  # an empty object
                raise
            body = resp["Body"]
            try:
                total = str(resp.get("ContentRange") or "").rpartition("/")[2]
                if not tail and ((total.isdigit() and int(total) > limit) or int(resp.get("ContentLength") or 0) > limit):
                    raise CheckpointCorruptError(
                        f"s3://{self.bucket}/{key} is larger than {limit} bytes; refusing to read it")
                data = body.read(limit + 1)  # never more than the bound, whatever the server sends
            finally:
                body.close()
        if len(data) > limit:
            raise CheckpointCorruptError(f"s3://{self.bucket}/{key} is larger than {limit} bytes; refusing to read it")
        return data

    def head(self, key: str) -> dict:
        """The object's headers (size, metadata), or {} when it is missing."""
        with self._request(f"asking for s3://{self.bucket}/{key}"):
            try:
                return client().head_object(Bucket=self.bucket, Key=key)
            except Exception as e:  # noqa: BLE001
                if _code(e) in ("NoSuchKey", "404", "NotFound"):
                    return {}
                raise

    def put_file(self, key: str, path: str, progress: ProgressFn = None, metadata: dict | None = None) -> None:
        extra = {"ChecksumAlgorithm": "CRC32C"}
        if metadata:
            extra["Metadata"] = {str(k): str(v) for k, v in metadata.items()}
        with self._request(f"uploading s3://{self.bucket}/{key}"):
            client().upload_file(path, self.bucket, key, ExtraArgs=extra, Config=upload_config(), Callback=progress)

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._request(f"writing s3://{self.bucket}/{key}"):
            client().put_object(Bucket=self.bucket, Key=key, Body=data, ChecksumAlgorithm="CRC32C")

    def download(self, key: str, dest: str, size: int, progress: ProgressFn = None) -> None:
        """Download ``key`` into ``dest``: exactly ``size`` bytes, the size the verified manifest gives; an object of
        another size is refused before more than that is read (``s3client.download``)."""
        with self._request(f"downloading s3://{self.bucket}/{key}"):
            s3client.download(self.bucket, key, dest, size, progress)

    def copy_key(self, src: str, dst: str) -> None:
        """Copy an object of the bucket on the server (a managed, multipart copy for large objects)."""
        with self._request(f"copying s3://{self.bucket}/{src}"):
            client().copy({"Bucket": self.bucket, "Key": src}, self.bucket, dst, Config=upload_config())

    def delete_keys(self, keys: list[str]) -> None:
        with self._request(f"deleting objects under {self.uri}"):
            for i in range(0, len(keys), 1000):
                client().delete_objects(Bucket=self.bucket,
                                        Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]})

    def list_objects(self, sub: str = "") -> list[dict]:
        """Every object under the prefix (or ``prefix/sub``): dicts with Key, Size, ETag, LastModified."""
        base = self.key(sub)
        base = base + "/" if base else ""
        out: list[dict] = []
        with self._request(f"listing s3://{self.bucket}/{base}"):
            try:
                for page in client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                    out += page.get("Contents", [])
            except Exception as e:  # noqa: BLE001
                if _code(e) == "NoSuchBucket":
                    raise CheckpointNotFoundError(
                        f"the bucket of {self.uri} does not exist; create it or fix the URI") from None
                raise
        return out

    # ---------------------------------------------------------------- listing
    def objects_by_name(self) -> dict[str, dict[str, dict]]:
        """The objects directly inside each entry folder: {name: {file name: listing}}."""
        out: dict[str, dict[str, dict]] = {}
        skip = len(self.prefix) + 1 if self.prefix else 0
        for obj in self.list_objects():
            parts = obj["Key"][skip:].split("/")
            if len(parts) == 2 and mf.is_plain_name(parts[0]):
                out.setdefault(parts[0], {})[parts[1]] = obj
        return out

    def objects(self, name: str) -> dict[str, dict]:
        """The objects of entry ``name``: {file name: listing}."""
        skip = len(self.key(name)) + 1
        return {o["Key"][skip:]: o for o in self.list_objects(name) if "/" not in o["Key"][skip:]}

    def names(self) -> list[str]:
        return [n for n, _ in self._listed()]

    def _listed(self) -> list[tuple[str, str]]:
        """(name, manifest ETag) of every committed entry, sorted; from memory while an uploader of this process
        holds the location (``store/s3listing.py``)."""
        def list_now() -> dict[str, str]:
            return {n: str(o[mf.MANIFEST].get("ETag", "")) for n, o in self.objects_by_name().items() if mf.MANIFEST in o}

        kept = KEPT.listed(self, list_now)
        return kept if kept is not None else sorted(list_now().items())

    def manifests(self) -> list[tuple[str, dict | CheckpointError]]:
        """(name, manifest, or the error reading it) of every committed entry. Manifests are cached by ETag, so
        listing again costs one LIST request (none while the listing is kept: ``store/s3listing.py``)."""
        return self.fetch_manifests(self._listed())

    def fetch_manifests(self, items: list[tuple[str, str]]) -> list[tuple[str, dict | CheckpointError]]:
        """(name, manifest, or the error reading it) of ``items`` [(name, manifest ETag)]: from the cache by ETag,
        the others fetched 16 at a time. Raises ``StorageUnavailableError`` (the endpoint, never a reason to skip a
        checkpoint)."""
        import concurrent.futures as cf

        def one(item: tuple[str, str]) -> tuple[str, dict | CheckpointError]:
            try:
                return item[0], self._manifest(*item)[0]
            except StorageUnavailableError:
                raise  # the endpoint, not this checkpoint: never a reason to skip it
            except CheckpointError as e:
                return item[0], e

        fresh = [it for it in items if (self.bucket, self.key(it[0], mf.MANIFEST), it[1]) not in self._cache]
        got = {}
        if len(fresh) > 1:
            with cf.ThreadPoolExecutor(min(16, len(fresh))) as ex:  # the GETs overlap (a folder of 1,000s)
                got = dict(ex.map(one, fresh))
        return [(item[0], got[item[0]]) if item[0] in got else one(item) for item in items]

    _cache = MANIFESTS  # parsed manifests by (bucket, key, ETag), bounded (store/s3listing.py)

    def _manifest(self, name: str, etag: str | None) -> tuple[dict, bytes]:
        mf.check_member_name(name, self.uri)
        key = self.key(name, mf.MANIFEST)
        if etag:
            hit = self._cache.get((self.bucket, key, etag))
            if hit is not None:
                return hit
        raw = self.get_bytes(key, MAX_MANIFEST_BYTES)
        got = (mf.parse_manifest(raw, f"s3://{self.bucket}/{key}"), raw)
        if etag:  # a committed manifest never changes under one ETag
            self._cache.put((self.bucket, key, etag), got)
        return got

    def read_manifest(self, name: str) -> tuple[dict, bytes]:
        try:
            return self._manifest(name, None)
        except CheckpointNotFoundError:
            raise CheckpointNotFoundError(
                f"no committed checkpoint at {self.path(name)} (it has no manifest.json; an interrupted upload is not "
                f"a checkpoint). List the checkpoints with `lightning-ckpt ls {self.uri}` or use "
                f"latest_checkpoint({self.uri!r}).") from None

    def read_file(self, fname: str, limit: int, *, tail: bool = False) -> bytes | None:
        try:
            return self.get_bytes(self.key(check_folder_file(fname)), limit, tail=tail)
        except CheckpointNotFoundError:
            return None

    def write_atomic(self, fname: str, data: bytes) -> None:
        self.put_bytes(self.key(check_folder_file(fname)), data)

    def read_latest(self) -> dict | None:
        try:
            d = json.loads(self.get_bytes(self.key(mf.LATEST), 16 << 20))  # with the index (store/hint.py)
        except (CheckpointError, ValueError, UnicodeDecodeError):
            return None
        return d if isinstance(d, dict) else None

    def latest_step(self) -> int:
        """The step ``latest.json`` names (-1 when there is none or it is unreadable; it is only a hint)."""
        d = self.read_latest() or {}
        step = d.get("step")
        return step if isinstance(step, int) and not isinstance(step, bool) else -1

    def local_folder(self, name: str, files: Iterable[str] | None = None, manifest: tuple[dict, bytes] | None = None,
                     *, progress: ProgressFn = None, refresh: bool = False) -> str:
        from .s3cache import fetch

        return fetch(self, name, files, manifest=manifest, progress=progress, refresh=refresh)

    def packs_folder(self, entries: dict[str, dict] | None = None, *, refresh: bool = False,
                     progress: ProgressFn = None) -> str:
        from .s3cache import fetch_packs

        return fetch_packs(self, entries or {}, progress=progress, refresh=refresh)

    # ---------------------------------------------------------------- writing
    def begin(self, name: str, tx_id: str | None = None, owner: str | None = None) -> "S3Transaction":
        """``owner``: the owner token a staging prefix is named with (default: this process's)."""
        mf.check_member_name(name, "the entry name")
        return S3Transaction(self, name, tx_id, owner)

    def publish_latest(self, doc: dict, manifest: tuple[dict, bytes] | None = None) -> None:
        """``latest.json`` never moves back to an older step (say, a ``push`` of an old checkpoint); its index
        (``store/hint.py``) takes in every pushed checkpoint."""
        from .hint import hint_json, publish_s3

        old = self.read_latest()
        step = old.get("step") if isinstance(old, dict) else None
        step = step if isinstance(step, int) and not isinstance(step, bool) else -1
        new = publish_s3(self, doc, manifest, old)
        if step > int(doc.get("step", -1)):  # keep the newest checkpoint's fields, take the index
            new = {**old, "index": new["index"]} if "index" in new else None
        if new is not None:
            self.put_bytes(self.key(mf.LATEST), hint_json(new))

    def newest_hinted(self, run_name: Any, any_run: bool) -> list[tuple[str, dict]] | None:
        """The newest checkpoint of a run through ``latest.json`` (``store/hint.py``), or None: list the location."""
        from .hint import newest

        return newest(self, run_name, any_run)

    def delete(self, name: str, *, collect: bool = False, lock: Any = None) -> bool:
        mf.check_member_name(name, "delete")
        self.uncommit(name)
        keys = [o["Key"] for o in self.list_objects(name)]
        self.delete_keys(keys)
        if collect:
            self.collect_orphans(lock=lock)
        return bool(keys)

    def may_collect(self, lock: Any = None) -> bool:
        return True  # the grace period and reuse marks of collect_packs protect the uploads in progress

    # ---------------------------------------------------------------- the kept listing (store/s3listing.py)
    def kept(self, info: Any, order: Any) -> tuple[list, list] | None:
        """Kept while an uploader of this process holds the location: possibly a subset (others write S3), hence
        ``listing_kept`` stays False."""
        return KEPT.scan(self, info, order)

    def hold_listing(self) -> None:
        KEPT.hold(self)

    def release_listing(self) -> None:
        KEPT.release(self)

    def listing_held(self) -> bool:
        return KEPT.held(self)

    def listing_stale(self) -> None:
        KEPT.invalidate(self)

    def blob_listing(self) -> tuple[dict[str, dict], dict[str, list[dict]]]:
        """The content store's packs and their reuse marks: ({pack: listing}, {pack: [listing of each
        ``<pack>.reused~<owner>``]})."""
        packs: dict[str, dict] = {}
        marks: dict[str, list[dict]] = {}
        for o in self.list_objects(mf.BLOBS):
            n = o["Key"].rsplit("/", 1)[-1]
            if mf.PACK_RE.match(n):
                packs[n] = o
            elif REUSED in n and mf.PACK_RE.match(n.partition(REUSED)[0]):
                marks.setdefault(n.partition(REUSED)[0], []).append(o)
        return packs, marks

    def mark_reused(self, packs: Iterable[str]) -> None:
        """Say that a push is about to commit a manifest referencing ``packs``, found already there (it did not upload
        them): each gets a fresh ``<pack>.reused~<host>.<pid>`` object, which keeps a collection elsewhere from
        deleting the pack for ``grace_s`` (see :meth:`collect_packs`)."""
        for n in packs:
            self.put_bytes(self.key(mf.BLOBS, mf.check_member_name(n, "a pack") + REUSED + owner_token()), b"")

    def collect_packs(self, *, grace_s: float = 3600.0, mine: set[str] | frozenset = frozenset(),
                      dry_run: bool = False) -> tuple[list[str], int]:
        """Delete the packs of the content store (``<prefix>/.blobs/``) that no committed manifest references, under
        the grace period and reuse marks of ``store/s3sweep.py`` (:func:`~.s3sweep.collect_packs`)."""
        from .s3sweep import collect_packs

        return collect_packs(self, grace_s=grace_s, mine=mine, dry_run=dry_run)

    def committed(self, name: str, manifest: bytes) -> None:
        """This process just committed ``name`` with these manifest bytes: a kept listing (``store/s3listing.py``)
        takes it in, and the manifest is cached under its ETag (no GET of what was just pushed)."""
        etag = KEPT.committed(self, name, manifest)
        if etag is not None:
            self._cache.put((self.bucket, self.key(name, mf.MANIFEST), etag),
                            (mf.parse_manifest(manifest, self.path(name)), manifest))

    def uncommit(self, name: str) -> None:
        """Delete the manifest of ``name``: from then on it is not a checkpoint (its objects are removed after)."""
        self.delete_keys([self.key(name, mf.MANIFEST)])
        KEPT.deleted(self, name)
        self._cache.drop(self.bucket, self.key(name, mf.MANIFEST))

    # S3 has no lock (stated in docs/DESIGN.md): one training run writes an S3 location; readers and tools are safe
    # beside it through the commit order and the packs' grace period and reuse marks.
    locking = False

    def lock(self, info: dict | None = None) -> NoLock:
        return NoLock()

    def lock_unless_mine(self, info: dict | None = None) -> None:
        return None

    def lock_holder(self) -> None:
        return None

    def pack_names(self) -> list[str]:
        return sorted(self.blob_listing()[0])

    def pack_sizes(self) -> dict[str, int]:
        return {n: int(o["Size"]) for n, o in sorted(self.blob_listing()[0].items())}

    def _debris(self, older_than_s: float) -> dict[str, list[str]]:
        from .s3sweep import debris

        return debris(self, older_than_s)

    def debris(self, everyone: bool = False, older_than_s: float = 3600.0) -> list[str]:
        return list(self._debris(older_than_s))

    def cleanup(self, everyone: bool = False, older_than_s: float = 3600.0) -> list[str]:
        """Delete :meth:`debris` (an upload in progress elsewhere is left alone). Returns the names cleaned up."""
        cleaned = []
        for name, keys in self._debris(older_than_s).items():
            self.delete_keys(keys)
            cleaned.append(name)
        return cleaned


from .s3tx import S3Transaction  # noqa: E402 - the transaction sits in its own module, re-exported here
