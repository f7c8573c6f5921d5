"""What a store is: a folder of committed entries (checkpoints, stage results, exports), written through one commit
protocol and deleted through one deletion path. ``LocalStore`` and ``S3Store`` implement it; a caller that holds a
``Store`` never asks which one it has: what differs is a documented capability (an attribute of the store or the
transaction, listed below), never a branch on the backend outside ``store/``. One cohesive contract,
kept whole past 400 lines: the operations, the policy and the table that says what differs are stated once, here.

The commit protocol, the same on every backend::

    tx = store.begin(name)            # a partial location nobody lists: .partial-<name>~<owner>~<id> (local), or
                                      # objects under <prefix>/<name>/ without a manifest (S3; under
                                      # <prefix>/.partial-<name>~<owner>~<id>/ when <name> is committed already)
    tx.open()                         # tx.path: a local folder whose files become the entry's files
    tx.write_bytes(...) / write_tensors(...) / write_file(...) / put_file(...)   # the data
    tx.sync()                         # the data is durable in the store before the commit
    name = tx.commit(manifest_bytes, if_exists=...)  # manifest last; its presence under the final name is the commit
    store.publish_latest({...})       # the hint latest.json, replaced atomically, never the source of truth

Readers list only names whose manifest is there, so a crash at any point leaves either the earlier entries alone or
one more complete entry. Deletion is ``store.delete(name)``: the entry leaves the listing atomically first (a rename to
``.trash-*`` locally, the manifest first on S3), then its bytes go; ``delete(name, collect=True)`` (or
:meth:`Store.remove`) then collects the content store's packs no manifest references any more, under the rule of
:meth:`Store.may_collect`.

What a backend cannot do the same way, stated once (the capabilities callers read; docs/DESIGN.md has the table):

- commit: locally the rename of the partial folder (atomic; ``version`` tries the next ``-vN`` when the rename finds
  the name taken, ``replace`` swaps with ``renameat2`` or trashes the old entry first). On S3 the PUT of
  ``manifest.json``; ``version``/``discard`` check the name's manifest first (a HEAD), so two writers of one name at
  the same moment are not excluded (no conditional PUT: one run writes an S3 location); ``replace`` of a committed
  entry removes its manifest first (a reader sees the old entry, none, or the new one). ``commit(None)`` (an entry
  without manifest: exports) exists locally only; S3 refuses it (ValueError).
- ``tx.path``: locally the partial entry itself; on S3 a local staging folder that ``sync``/``commit`` upload.
  ``write_tensors`` lays files out for ``O_DIRECT`` only locally (``Transaction.direct_io``).
- cleanup: local partial names carry their writer (``owners_recorded``); objects under an S3 entry's name do not, so
  they go by age (``older_than_s``); ``everyone`` (the lock holder's view) applies only where there is a lock.
- lock: ``FolderLock`` locally (``locking`` True), ``NoLock`` on S3 (``locking`` False): one run writes an S3
  location; the commit order and the packs' grace period and reuse marks keep readers and tools safe beside it.
- ``may_collect``: locally only under the lock or with no live writer; on S3 always (grace period, reuse marks).
- ``kept``: locally complete while this process holds the lock (``listing_kept`` True); on S3 kept while an uploader
  holds it, possibly a subset (``listing_kept`` False). ``read_cache``: S3 reads go through the checked read cache.
"""
from __future__ import annotations

import os
import re
import socket
import uuid
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Optional

from ..format import manifest as mf
from ..format.tensorfile import EncodedFile, FileRecord, encode_bytes, encode_tensors

PARTIAL_PREFIX = ".partial-"
TRASH_PREFIX = ".trash-"
TMP_PREFIX = ".tmp-"
PROBE_PREFIX = ".probe-"
LOCK_FILE = ".lock"
SEP = "~"  # never in an entry name (see check_name), so it splits partial names unambiguously

_PID = re.compile(r"[1-9][0-9]{0,8}")  # ASCII digits (str.isdigit() takes "²"), small enough for os.kill

IfExists = Literal["version", "discard", "replace"]


def check_if_exists(value: object) -> IfExists:
    """``value`` if it is one of ``"version"``, ``"discard"``, ``"replace"``; ValueError otherwise."""
    if value not in ("version", "discard", "replace"):
        raise ValueError(f"if_exists={value!r}: give 'version', 'discard' or 'replace'")
    return value  # type: ignore[return-value]


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


def check_folder_file(fname: object) -> str:
    """A file of a folder itself (beside its entries) is one path component: ValueError otherwise."""
    if (not isinstance(fname, str) or fname in ("", ".", "..") or "/" in fname or os.sep in fname or "\0" in fname
            or len(fname) > 255):
        raise ValueError(f"{fname!r} cannot name a file of a folder: give one path component such as 'metrics.jsonl'")
    return fname  # type: ignore[return-value]


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
    """One entry being written: the data first, the manifest last (``commit``), or nothing (``abort``). Every operation
    here exists on every backend (see the module's table for what each backend does):

    - ``open()``: make ``path`` ready; returns the transaction.
    - ``path`` / ``file(fname)``: a local folder (and a path in it) whose files become the entry's files: a caller may
      write there directly (an export, ``save_pretrained``); ``sync``/``commit`` make them part of the entry.
    - ``write_file(encoded)`` / ``write_bytes`` / ``write_tensors``: write one file, return its record (checksums).
    - ``put_file(fname, src)``: copy the local file ``src`` in as the entry's file ``fname``.
    - ``sync()``: everything written so far is durable in the store (local: the folder fsynced; S3: uploaded).
    - ``commit(manifest, name=, if_exists=)`` / ``abort()``.
    """

    name: str
    path: str
    committed: Optional[str] = None  # the name it was committed under, once it was
    direct_io: bool = False  # whether write_tensors lays files out for O_DIRECT (store/direct.py)

    @abstractmethod
    def open(self) -> "Transaction":
        """Make ``path`` ready for files; returns the transaction."""

    def file(self, fname: str) -> str:
        """The local path of the entry's file ``fname`` inside ``path`` (a member name, checked)."""
        return os.path.join(self.path, mf.check_member_name(fname, "a file of the entry"))

    @abstractmethod
    def write_file(self, encoded: EncodedFile) -> FileRecord:
        """Write an encoded file (see ``format.tensorfile``) into the entry; returns its record (checksums)."""

    def write_bytes(self, fname: str, data: bytes) -> FileRecord:
        """A small file whose whole content is one checksummed region."""
        return self.write_file(encode_bytes(fname, data))

    def write_tensors(self, fname: str, tensors: Iterable, metadata: dict | None = None, crc_executor: Any = None,
                      content_hash: bool = True) -> FileRecord:
        """A safetensors file of CPU tensors (each tensor's XXH3-128 recorded unless ``content_hash`` is off); laid
        out for direct I/O where this transaction writes that way (``direct_io``, ``store/direct.py``)."""
        tensors = list(tensors)
        nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
        return self.write_file(encode_tensors(fname, tensors, metadata, crc_executor, content_hash,
                                              align=self.tensor_align(nbytes)))

    def tensor_align(self, nbytes: int) -> int | None:
        """The alignment a tensor file of ``nbytes`` is laid out with (None: packed, the default)."""
        return None

    @abstractmethod
    def put_file(self, fname: str, src: str, progress: Callable[[int], None] | None = None,
                 metadata: dict | None = None) -> None:
        """Copy the local file ``src`` in as the entry's file ``fname`` (``progress`` is called with byte counts;
        ``metadata``: object metadata where the backend keeps any (S3), ignored locally: the manifest holds the
        checksums)."""

    @abstractmethod
    def sync(self) -> None:
        """Make everything written so far durable in the store (before the commit)."""

    @abstractmethod
    def commit(self, manifest: bytes | None, *, name: str | None = None, if_exists: IfExists = "version") -> str | None:
        """Make the entry visible under ``name`` (default: the name it was begun with), ``manifest`` (its bytes)
        written last. ``if_exists``: ``"version"`` takes the first free of ``name``, ``name-v2``, ...; ``"discard"``
        drops this entry when the name is taken (returns None); ``"replace"`` swaps it for the existing one. Returns
        the committed name. What each backend makes atomic: the module's table (S3 checks the name's manifest first
        and cannot exclude a second writer of the same name at the same moment)."""

    @abstractmethod
    def abort(self) -> None:
        """Remove what was written; nothing becomes visible."""


@dataclass
class Removed:
    """What :meth:`Store.remove` did: the entries deleted, the packs collected after, and the bytes those freed."""

    deleted: list = field(default_factory=list)
    packs: list = field(default_factory=list)
    freed: int = 0


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

    @abstractmethod
    def read_file(self, fname: str, limit: int, *, tail: bool = False) -> bytes | None:
        """A file of the folder itself, beside its entries (``metrics.jsonl``, a note), at most ``limit`` bytes (a
        larger one is ``CheckpointCorruptError``; with ``tail``, its last ``limit`` bytes); None when there is
        none."""

    # -- writing
    @abstractmethod
    def write_atomic(self, fname: str, data: bytes) -> None:
        """Replace the folder's own file ``fname`` atomically: readers see the old or the new content, never a part
        (locally a temp file and a rename, fsynced as the store is; on S3 one PUT)."""

    @abstractmethod
    def begin(self, name: str, tx_id: str | None = None) -> Transaction:
        """Start writing entry ``name``. Several processes that pass the same ``tx_id`` write into one entry."""

    @abstractmethod
    def publish_latest(self, doc: dict, manifest: tuple[dict, bytes] | None = None) -> None:
        """Replace ``latest.json`` atomically with ``doc`` (``name``, ``step``, ``epoch``) and the folder's index
        (``store/hint.py``); ``manifest``: the (manifest, bytes) of the entry just committed, if the caller has it."""

    @abstractmethod
    def manifests(self) -> list[tuple[str, "dict | Exception"]]:
        """(name, manifest, or the ``CheckpointError`` reading it raised) of every committed entry, sorted by name;
        an entry deleted between the listing and the read is left out."""

    def looks_committed(self, name: str) -> bool:
        """A cheap answer to "may ``name`` be a committed entry?": locally, its manifest is there; on a backend where
        asking costs a request, True (the load that follows says what is wrong)."""
        return True

    # -- the kept listing (a capability: read.scan_checkpoints asks the store, never the backend)
    read_cache: bool = False  # reads go through a local cache of checked downloads (refresh=True fetches again)

    @abstractmethod
    def kept(self, info: Callable[[str, dict], Any], order: Callable[[Any], Any]) -> "tuple[list, list] | None":
        """From the listing this process keeps in memory for this folder: ``info(name, manifest)`` of the committed
        entries sorted by ``order``, and (path, error) of those whose manifest cannot be read; each made once per
        manifest. None when no listing is kept (the caller lists the folder)."""

    def listing_kept(self) -> bool:
        """Whether this process keeps the complete listing of the folder in memory now (then it, not ``latest.json``,
        answers which entry is newest)."""
        return False

    def hold_listing(self) -> None:
        """Keep this folder's listing in memory until :meth:`release_listing` (where the backend keeps it by holding:
        S3; a local folder's listing is kept while its lock is held)."""

    def release_listing(self) -> None:
        """Stop keeping the listing :meth:`hold_listing` asked for."""

    def listing_held(self) -> bool:
        """Whether :meth:`hold_listing` holds this folder's listing now."""
        return False

    def listing_stale(self) -> None:
        """The kept listing was found wrong (a deletion found nothing): list the folder again at the next read."""

    # -- deleting
    @abstractmethod
    def delete(self, name: str, *, collect: bool = False, lock: Any = None) -> bool:
        """Delete entry ``name``: it leaves the listing atomically first, then its bytes go. False when it was gone.
        ``collect``: then collect the packs no manifest references any more (:meth:`collect_orphans`, with ``lock``
        the lock this process took for the deletion, if any)."""

    def remove(self, names: Iterable[str], *, collect: bool = True, lock: Any = None,
               mine: "set[str] | frozenset" = frozenset()) -> Removed:
        """Delete the entries ``names`` (those already gone are skipped), then, with ``collect``, the packs they
        orphaned (:meth:`collect_orphans`). The Folder layer does not use it: it deletes an entry at a time
        (``trash`` and a background ``purge`` for a session) and collects through ``collect_packs``, after
        ``prune`` and ``remove_checkpoint`` asked :meth:`may_collect`."""
        out = Removed()
        for name in names:
            if self.delete(name):
                out.deleted.append(name)
        if collect:
            out.packs, out.freed = self.collect_orphans(lock=lock, mine=mine)
        return out

    def collect_orphans(self, *, lock: Any = None, mine: "set[str] | frozenset" = frozenset(),
                        dry_run: bool = False) -> tuple[list[str], int]:
        """:meth:`collect_packs` when :meth:`may_collect` allows it now, else nothing ([], 0)."""
        if not self.may_collect(lock):
            return [], 0
        return self.collect_packs(mine=mine, dry_run=dry_run)

    @abstractmethod
    def may_collect(self, lock: Any = None) -> bool:
        """Whether this process may collect unreferenced packs now (``lock``: the lock it took for the work at hand,
        None when it took none). Locally: it holds the folder's lock (``lock.held``, or this process held it
        already), or could take it (nobody holds it, locks enabled), or no live writer has a save or temp file in the
        folder (:meth:`live_writer`): a save in progress writes packs before the manifest that references them. On
        S3: always, since the grace period and reuse marks of ``collect_packs`` protect uploads in progress."""

    def owns(self, lock: Any = None) -> bool:
        """Whether this process may treat every leftover of the folder as debris (``cleanup(everyone=True)``): it
        holds the folder's lock for real (``lock``: the one it took; None: it took none, and nobody holds it). Never
        on a backend without a lock."""
        return False

    def live_writer(self) -> bool:
        """Whether a writer that may still run (this machine's live processes, other machines' of unknown state) has
        a partial entry in progress here. False on a backend whose partial entries carry no owner."""
        return False

    # -- the cleanup policy, one for every backend:
    #   an interrupted write or deletion is debris when its writer is known to be gone (an owner token of this machine
    #   whose process no longer runs), or, for the holder of the folder's lock, always (``everyone``), or, where the
    #   backend records no owner (``owners_recorded`` False: objects under an S3 entry's name), when nothing touched
    #   it for ``older_than_s``. Trash (a deletion's leftover) is always debris. A partial entry of a live writer is
    #   never removed but by the lock holder; this process's own partial entries are left alone but with everyone.
    owners_recorded: bool = True

    @abstractmethod
    def cleanup(self, everyone: bool = False, older_than_s: float = 3600.0) -> list[str]:
        """Remove :meth:`debris` (the policy above). Returns what was removed: paths locally, entry names on S3
        (as :meth:`debris` names them)."""

    @abstractmethod
    def debris(self, everyone: bool = False, older_than_s: float = 3600.0) -> list[str]:
        """What :meth:`cleanup` would remove now, without removing it."""

    # -- the content store (.blobs)
    @abstractmethod
    def pack_names(self) -> list[str]:
        """The packs of the folder's content store."""

    @abstractmethod
    def pack_sizes(self) -> dict[str, int]:
        """{pack name: bytes} of the packs of the folder's content store (what a collection of each would free)."""

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
