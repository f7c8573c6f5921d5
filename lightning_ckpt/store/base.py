"""What a store is: a folder of committed entries (checkpoints, stage results, exports), written through one commit
protocol and deleted through one deletion path. ``LocalStore`` and ``S3Store`` implement it.

The commit protocol, the same on every backend::

    tx = store.begin(name)            # a partial location nobody lists: .partial-<name>~<owner>~<id> (local), or
                                      # objects under <prefix>/<name>/ without a manifest (S3)
    tx.write_bytes(...) / write_tensors(...) / put_file(...)   # the data, durable before the commit
    name = tx.commit(manifest_bytes)  # manifest last; its presence under the final name is the commit
    store.publish_latest({...})       # the hint latest.json, replaced atomically, never the source of truth

Readers list only names whose manifest is there, so a crash at any point leaves either the earlier entries alone or
one more complete entry. Deletion is ``store.delete(name)``: the entry leaves the listing atomically first (a rename to
``.trash-*`` locally, the manifest first on S3), then its bytes go.
"""
from __future__ import annotations

import os
import re
import socket
import uuid
import zlib
from abc import ABC, abstractmethod
from typing import Callable, Iterable, Literal

PARTIAL_PREFIX = ".partial-"
TRASH_PREFIX = ".trash-"
TMP_PREFIX = ".tmp-"
PROBE_PREFIX = ".probe-"
LOCK_FILE = ".lock"
SEP = "~"  # never in an entry name (see check_name), so it splits partial names unambiguously

_PID = re.compile(r"[1-9][0-9]{0,8}")  # ASCII digits (str.isdigit() takes "²"), small enough for os.kill

IfExists = Literal["version", "discard", "replace"]


def first_free(base: str, taken: Callable[[str], bool]) -> str:
    """``base``, else ``base-v2``, ``-v3``, ...: the first name for which ``taken(name)`` is false."""
    name, v = base, 1
    while taken(name):
        v += 1
        name = f"{base}-v{v}"
    return name


def check_entry_name(name: object) -> str:
    """An entry's name must be one path component that is not hidden and has no ``~`` (ValueError otherwise)."""
    if (not isinstance(name, str) or not name or name in (".", "..") or name.startswith(".") or "/" in name
            or os.sep in name or SEP in name or len(name) > 255 or any(ord(c) < 32 or ord(c) == 127 for c in name)):
        raise ValueError(f"{name!r} cannot name an entry of a folder: give one path component that does not start "
                         "with '.' and has no '/', '~' or control character")
    return name


def host_id() -> str:
    """A short stable id of this machine, part of every owner token."""
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def owner_token() -> str:
    """``<host id>.<pid>``: who wrote a partial entry, so a cleanup can tell a dead writer's debris from live work."""
    return f"{host_id()}.{os.getpid()}"


def new_id() -> str:
    return uuid.uuid4().hex[:8]


def partial_name(name: str, tx_id: str, owner: str | None = None) -> str:
    return f"{PARTIAL_PREFIX}{name}{SEP}{owner or owner_token()}{SEP}{tx_id}"


def owner_of(entry: str) -> str | None:
    """The owner token in a ``.partial-``/``.tmp-``/``.probe-`` name, or None (an older or foreign name)."""
    parts = entry.split(SEP)
    return parts[1] if len(parts) == 3 else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_gone(owner: str | None) -> bool:
    """True when ``owner`` is a process of this machine that no longer runs. Unknown owners and other machines'
    processes are never declared gone here (only the folder's lock holder may clear those, see LocalStore.cleanup)."""
    if not owner or "." not in owner:
        return False
    host, _, pid = owner.partition(".")
    return host == host_id() and _PID.fullmatch(pid) is not None and not pid_alive(int(pid))


def debris_in(root: str, everyone: bool = False) -> list[str]:
    """Paths of what interrupted writes and deletions left in the folder ``root``: trash always; partial, temp and
    probe entries whose writer is gone (``everyone``: all of them, for the holder of the folder's lock)."""
    try:
        entries = os.listdir(root)
    except OSError:
        return []
    mine = owner_token()
    out = []
    for e in entries:
        if e.startswith(TRASH_PREFIX):
            out.append(e)
        elif e.startswith((PARTIAL_PREFIX, TMP_PREFIX, PROBE_PREFIX)):
            owner = owner_of(e)
            if owner == mine and not everyone:
                continue
            if everyone or owner_gone(owner):
                out.append(e)
    return [os.path.join(root, e) for e in sorted(out)]


class Transaction(ABC):
    """One entry being written: the data first, the manifest last (``commit``), or nothing (``abort``)."""

    name: str

    @abstractmethod
    def commit(self, manifest: bytes | None, *, name: str | None = None, if_exists: IfExists = "version") -> str | None:
        """Make the entry visible under ``name`` (default: the name it was begun with). ``if_exists``: ``"version"``
        takes the first free of ``name``, ``name-v2``, ...; ``"discard"`` drops this entry when the name is taken
        (returns None); ``"replace"`` swaps it for the existing one. Returns the committed name."""

    @abstractmethod
    def abort(self) -> None:
        """Remove what was written; nothing becomes visible."""


class Store(ABC):
    """A folder of committed entries. ``uri`` is an absolute local path or an ``s3://bucket/prefix`` URI."""

    uri: str
    remote: bool = False

    def path(self, name: str) -> str:
        """The location of entry ``name`` as users write it (a path, or a URI)."""
        return f"{self.uri.rstrip('/')}/{name}"

    # -- reading
    @abstractmethod
    def names(self) -> list[str]:
        """Names of the committed entries (their manifest is there), in no particular order."""

    @abstractmethod
    def read_manifest(self, name: str) -> tuple[dict, bytes]:
        """The validated manifest of entry ``name`` and its raw bytes. Raises CheckpointNotFoundError or
        CheckpointCorruptError."""

    @abstractmethod
    def local_folder(self, name: str, files: Iterable[str] | None = None, manifest: tuple[dict, bytes] | None = None) -> str:
        """A local folder from which the ``files`` of entry ``name`` (all when None) can be read: the entry itself, or
        a read cache the files were downloaded into. Nothing is verified here; readers verify what they read."""

    @abstractmethod
    def packs_folder(self, entries: dict[str, dict] | None, *, refresh: bool = False) -> str:
        """The local folder holding the packs of this folder's content store (``.blobs``); with ``entries`` (pack
        name -> manifest entry) those packs are made present there first (downloaded and checked, on S3)."""

    @abstractmethod
    def read_latest(self) -> dict | None:
        """The ``latest.json`` hint, or None when there is none or it is unreadable."""

    # -- writing
    @abstractmethod
    def begin(self, name: str, tx_id: str | None = None) -> Transaction:
        """Start writing entry ``name``. Several processes that pass the same ``tx_id`` write into one entry."""

    @abstractmethod
    def publish_latest(self, doc: dict, manifest: tuple[dict, bytes] | None = None) -> None:
        """Replace ``latest.json`` atomically with ``doc`` (``name``, ``step``, ``epoch``) and the folder's index
        (``store/hint.py``); ``manifest``: the (manifest, bytes) of the entry just committed, if the caller has it."""

    # -- deleting
    @abstractmethod
    def delete(self, name: str) -> bool:
        """Delete entry ``name``: it leaves the listing atomically first, then its bytes go. False when it was gone."""

    @abstractmethod
    def cleanup(self, everyone: bool = False, older_than_s: float = 3600.0) -> list[str]:
        """Remove what interrupted writes and deletions left (a dead writer's partial entry; with ``everyone``, the
        lock holder's view: every partial entry; on a backend without owners, what nothing touched for
        ``older_than_s``). Returns what was removed."""

    @abstractmethod
    def debris(self, everyone: bool = False) -> list[str]:
        """What :meth:`cleanup` would remove now (paths or names), without removing it."""

    # -- the content store (.blobs)
    @abstractmethod
    def pack_names(self) -> list[str]:
        """The packs of the folder's content store."""

    @abstractmethod
    def collect_packs(self, *, mine: "set[str] | frozenset" = frozenset(), grace_s: float = 3600.0,
                      dry_run: bool = False) -> tuple[list[str], int]:
        """Delete the packs no committed manifest references (``dry_run``: only say which). Returns (pack names,
        bytes freed)."""

    # -- the folder lock (a capability: ``locking`` says whether the backend has one)
    locking: bool = True

    @abstractmethod
    def lock(self, info: dict | None = None) -> "FolderLockLike":
        """Take the folder's lock or raise ``FolderBusyError``. A backend without a lock returns :class:`NoLock`."""

    @abstractmethod
    def lock_unless_mine(self, info: dict | None = None) -> "FolderLockLike | None":
        """Take the lock, or None when this process already holds it (or the backend has no lock)."""

    @abstractmethod
    def lock_holder(self) -> dict | None:
        """Who holds the folder's lock, or None (always None without a lock)."""

    def exists(self) -> bool:
        """Whether the folder is there (a remote location always is: its prefix needs no creating)."""
        return True


class NoLock:
    """The lock of a backend that has none (S3): holding it excludes nobody. ``held`` is False: its holder may not
    treat other writers' partial entries as debris."""

    held = False

    def mine(self) -> bool:
        return False

    def release(self) -> None:
        pass


FolderLockLike = object  # FolderLock (store/lock.py) or NoLock
