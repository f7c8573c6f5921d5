"""The boto3 client of the S3 store, its timeouts and retry budget, what counts as "the endpoint is unavailable", and
the bounded download (a hostile bucket never makes a reader fetch more than the manifest allows).

Timeouts and retries (docs/backups.md): every S3 request waits at most ``LIGHTNING_CKPT_S3_CONNECT_TIMEOUT`` seconds
(default 5) for a connection and ``LIGHTNING_CKPT_S3_READ_TIMEOUT`` seconds (default 20) for each read from the
socket, and is tried at most ``LIGHTNING_CKPT_S3_MAX_ATTEMPTS`` times in all (default 4; botocore's adaptive retry
mode backs off between tries, at most 1, 2, 4, ... seconds). An endpoint that is down or never answers therefore
gives :class:`StorageUnavailableError` after at most about ``attempts x (connect + read) + backoff`` seconds (about
107 s with the defaults), instead of botocore's 60 s read timeout times 9 attempts.
"""
from __future__ import annotations

import concurrent.futures as cf
import http.client
import os
import re
import socket
import threading
import time
from typing import Any, Callable, Optional

from ..errors import CheckpointCorruptError, CheckpointError, StorageUnavailableError

ProgressFn = Optional[Callable[[int], None]]

SETTINGS = {  # env var -> (default, type, what it is)
    "LIGHTNING_CKPT_S3_CONNECT_TIMEOUT": (5.0, float, "seconds to wait for a connection to the S3 endpoint"),
    "LIGHTNING_CKPT_S3_READ_TIMEOUT": (20.0, float, "seconds to wait for each read from an S3 connection"),
    "LIGHTNING_CKPT_S3_MAX_ATTEMPTS": (4, int, "tries of each S3 request, the first included"),
}
_AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE",
             "AWS_DEFAULT_REGION", "AWS_REGION")


def settings() -> tuple[float, float, int]:
    """(connect timeout s, read timeout s, attempts) from the environment; a bad value is a ``ValueError`` naming
    the variable."""
    out = []
    for var, (default, kind, what) in SETTINGS.items():
        raw = os.environ.get(var)
        if raw is None or raw.strip() == "":
            out.append(default)
            continue
        try:
            value = kind(raw)
            if not value > 0 or value != value or value == float("inf"):
                raise ValueError
        except ValueError:
            raise ValueError(f"{var}={raw!r} is invalid; give a positive {'whole ' if kind is int else ''}number "
                             f"({what}; default {default})") from None
        out.append(value)
    return float(out[0]), float(out[1]), int(out[2])


_CLIENTS: dict = {}
_CLIENTS_LOCK = threading.Lock()


def client() -> Any:
    """A boto3 S3 client for the current AWS settings and timeouts (one per process and setting; boto3 clients are
    thread-safe)."""
    connect, read, attempts = settings()
    key = (os.getpid(), connect, read, attempts) + tuple(os.environ.get(v) for v in _AWS_VARS)
    with _CLIENTS_LOCK:
        c = _CLIENTS.get(key)
        if c is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:  # pragma: no cover
                raise CheckpointError("S3 support needs boto3: pip install 'lightning-ckpt[s3]'") from None
            c = _CLIENTS[key] = boto3.client("s3", config=Config(
                connect_timeout=connect, read_timeout=read, max_pool_connections=64,
                retries={"total_max_attempts": attempts, "mode": "adaptive"}))
    return c


def error_code(e: BaseException) -> str:
    resp = getattr(e, "response", None)
    return str(((resp if isinstance(resp, dict) else {}).get("Error") or {}).get("Code", ""))


def is_unavailable(e: BaseException) -> bool:
    """The endpoint did not answer, or answered only with server errors (after botocore's retries): not a fact about
    the checkpoint."""
    try:
        import botocore.exceptions as bx
        import urllib3.exceptions as ux
    except ImportError:  # pragma: no cover
        return False
    if isinstance(e, (bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError, ux.HTTPError,
                      http.client.HTTPException, socket.timeout, ConnectionError)):
        return True
    resp = getattr(e, "response", None)
    status = ((resp if isinstance(resp, dict) else {}).get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return isinstance(status, int) and status >= 500


def unavailable(e: BaseException, what: str) -> StorageUnavailableError:
    connect, read, attempts = settings()
    try:
        endpoint = client().meta.endpoint_url
    except Exception:  # noqa: BLE001 - only for the message
        endpoint = "the S3 endpoint"
    detail = " ".join(f"{type(e).__name__}: {e}".split())
    return StorageUnavailableError(
        f"the S3 endpoint {endpoint} did not answer ({what}) within {attempts} attempt(s) of at most {connect:g} s to "
        f"connect and {read:g} s per read ({detail}). Check that the server is up and reachable (AWS_ENDPOINT_URL); "
        "LIGHTNING_CKPT_S3_CONNECT_TIMEOUT, LIGHTNING_CKPT_S3_READ_TIMEOUT and LIGHTNING_CKPT_S3_MAX_ATTEMPTS set how "
        "long to wait.")


# ------------------------------------------------------------------------------------------ bounded download
DOWNLOAD_PART = 64 << 20  # ranged GETs of 64 MiB, up to 8 in flight (boto3's managed download did the same)
DOWNLOAD_THREADS = 8
_READ = 1 << 20
_RANGE = re.compile(r"bytes ([0-9]+)-([0-9]+)/([0-9]+|\*)\Z")


def _too_big_or_small(where: str, total: Any, size: int) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"{where} is {total} bytes, but its checkpoint's manifest says {size}: the object was replaced or truncated "
        "after the upload. Nothing more was downloaded. Use an earlier checkpoint, or push the checkpoint again.")


def download(bucket: str, key: str, dest: str, size: int, progress: ProgressFn = None) -> None:
    """Write the object ``key`` into ``dest`` (created or truncated): exactly ``size`` bytes, the size its (verified)
    manifest gives. Every GET asks for a byte range inside ``[0, size)`` and no more than the range is ever read from
    a response, so an object replaced by a larger one costs at most ``size`` bytes of traffic and disk; the first
    response's ``Content-Range`` gives the object's real size, and an object of another size is refused there
    (:class:`CheckpointCorruptError`, before its body is read). The parts after the first are asked ``If-Match`` the
    first one's ETag: an object replaced during the download is refused, never mixed. A part whose body is cut off
    is asked again (up to the attempts setting). Missing object: :class:`CheckpointCorruptError` too (a manifest
    lists it)."""
    where = f"s3://{bucket}/{key}"
    size = int(size)
    attempts = settings()[2]
    spans = [(o, min(o + DOWNLOAD_PART, size)) for o in range(0, size, DOWNLOAD_PART)]
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        if not spans:  # an empty file: the object must be empty too
            resp = _get(bucket, key, where, None, None)
            try:
                if int(resp.get("ContentLength") or 0) != 0 or resp["Body"].read(1):
                    raise _too_big_or_small(where, resp.get("ContentLength"), 0)
            finally:
                resp["Body"].close()
            return
        etag = _part(bucket, key, where, fd, spans[0], size, None, progress, attempts)
        if len(spans) > 1:
            with cf.ThreadPoolExecutor(min(DOWNLOAD_THREADS, len(spans) - 1)) as ex:
                list(ex.map(lambda s: _part(bucket, key, where, fd, s, size, etag, progress, attempts), spans[1:]))
    finally:
        os.close(fd)


def _get(bucket: str, key: str, where: str, rng: str | None, etag: str | None) -> dict:
    args = {"Bucket": bucket, "Key": key}
    if rng:
        args["Range"] = rng
    if etag:
        args["IfMatch"] = etag
    try:
        return client().get_object(**args)
    except Exception as e:  # noqa: BLE001 - botocore's ClientError, without importing botocore here
        code = error_code(e)
        if code in ("NoSuchKey", "404", "NotFound"):
            raise CheckpointCorruptError(
                f"{where} is missing although its checkpoint's manifest lists it; the upload is incomplete or was "
                "damaged. Use an earlier checkpoint, or push the checkpoint again.") from None
        if code in ("InvalidRange", "416"):  # asked for bytes the object does not have: it is shorter (empty)
            raise CheckpointCorruptError(
                f"{where} is shorter than its checkpoint's manifest says: the object was replaced or truncated after "
                "the upload. Use an earlier checkpoint, or push the checkpoint again.") from None
        if code in ("PreconditionFailed", "412"):
            raise CheckpointCorruptError(f"{where} was replaced while it was downloaded; nothing of it is used. Read "
                                         "it again.") from None
        raise


def _part(bucket: str, key: str, where: str, fd: int, span: tuple[int, int], size: int, etag: str | None,
          progress: ProgressFn, attempts: int) -> str:
    """Fetch bytes ``[start, end)`` into ``fd`` at their offset; returns the object's ETag."""
    start, end = span
    for attempt in range(1, attempts + 1):
        resp = _get(bucket, key, where, f"bytes={start}-{end - 1}", etag)
        body, got = resp["Body"], start
        try:
            m = _RANGE.match(str(resp.get("ContentRange") or ""))
            if m is not None:
                total = int(m.group(3)) if m.group(3) != "*" else -1
                if total != size:
                    raise _too_big_or_small(where, total, size)
                if int(m.group(1)) != start:
                    raise CheckpointCorruptError(f"{where}: the server sent another byte range than asked for")
            elif start != 0 or int(resp.get("ContentLength") or -1) != size:  # the server ignored the range
                raise _too_big_or_small(where, resp.get("ContentLength"), size)
            while got < end:
                chunk = body.read(min(_READ, end - got))  # never more than the range asked for
                if not chunk:
                    raise http.client.IncompleteRead(b"", end - got)
                os.pwrite(fd, chunk, got)
                got += len(chunk)
                if progress is not None:
                    progress(len(chunk))
            return str(resp.get("ETag") or "") or (etag or "")
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - the connection died mid-body: ask for the part again
            if not is_unavailable(e) or attempt == attempts:
                raise
            time.sleep(min(2.0, 0.2 * 2 ** (attempt - 1)))
        finally:
            body.close()
    raise AssertionError("unreachable")  # pragma: no cover
