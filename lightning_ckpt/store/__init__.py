"""Where bytes live: a :class:`Store` is a folder of committed entries with one commit protocol and one deletion path
(``base``, which states the contract and what differs between backends), on the local filesystem (``local``, its
kept listing ``listing``) or S3 (``s3``, its transaction ``s3tx``, its sweeps ``s3sweep``, its kept listing
``s3listing``, its read cache ``s3cache``).

:func:`open_store` is the one place that tells a local path from an ``s3://`` URI; everything above asks it.
"""
from __future__ import annotations

import os
from typing import Any

from .base import Store, Transaction
from .local import LocalStore, LocalTransaction

__all__ = ["LocalStore", "LocalTransaction", "Store", "Transaction", "is_remote", "locate", "open_store"]

_SCHEMES = {"s3://": "S3"}


def is_remote(location: Any) -> bool:
    """Is ``location`` a URI of a remote store (``s3://...``) rather than a local path?"""
    return isinstance(location, str) and location.startswith(tuple(_SCHEMES))


def open_store(location: Any, *, fsync: bool = True) -> Store:
    """The store of the folder at ``location``: a local path (``str`` or ``os.PathLike``) or an ``s3://bucket/prefix``
    URI. Raises ValueError for anything else (an empty path, a bare ``s3://``)."""
    if is_remote(location):
        from .s3 import S3Store

        return S3Store(location.rstrip("/"))
    try:
        path = os.fspath(location)
    except TypeError:
        raise ValueError(f"{location!r} is not a folder path or an s3:// URI") from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise ValueError("the folder path is empty; give a folder such as 'ckpts/' or a URI such as 's3://bucket/run'")
    return LocalStore(path, fsync=fsync)


def folder_key(location: Any) -> str:
    """How a folder is named internally: an absolute path, or the URI without a trailing slash."""
    return open_store(location).uri


def locate(path: Any) -> tuple[Store, str]:
    """The store holding the entry at ``path`` (``<folder>/<name>`` or ``s3://bucket/prefix/<name>``) and its name."""
    if is_remote(path):
        uri = path.rstrip("/")
        parent, _, name = uri.rpartition("/")
        if parent.endswith(":/"):  # s3://bucket: the bucket itself is no entry
            raise ValueError(f"{path!r} names a bucket, not a checkpoint; write s3://bucket/prefix/<name>")
        return open_store(parent), name
    p = os.path.abspath(os.fspath(path))
    return LocalStore(os.path.dirname(p)), os.path.basename(p)
