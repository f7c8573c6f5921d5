"""Finding and verifying committed checkpoints, in any store (loading them is ``load.py``). No Lightning; no pickle.

Every reader goes through the store of the folder (``store.open_store`` / ``store.locate``): the manifest is read and
validated first, then each file is opened as a regular file of the size the manifest says (never through a link) and
every byte read is checked against its CRC32C. A checkpoint on S3 is read through the local read cache; each rank
downloads only the files its reads need.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from .errors import CheckpointCorruptError, CheckpointError, CheckpointNotFoundError
from .format.codec import decode, parse_state
from .format.tensorfile import VERIFY_BLOCK, check_file, iter_regions
from .store import Store, locate, open_store
from .format.checksum import crc32c
from .format.manifest import DIGEST, MANIFEST, summary_of
from .store.fs import open_member, read_member
from .policy.enums import Kind

log = logging.getLogger("lightning_ckpt")

MAX_STATE_BYTES = 1 << 30  # a rank's non-tensor state (JSON); anything larger is refused before it is read
REFERENCE = "lightning_ckpt_ref.json"  # a folder naming a committed checkpoint (Ray's checkpoints: callbacks/ray.py)
ANY_RUN: Any = object()  # run_name filter: every run of the folder


def run_name_of(m: dict) -> str | None:
    """The ``run_name`` a checkpoint was saved under (None: the folder's main line, and every older checkpoint)."""
    lin = m.get("lineage")
    name = lin.get("run_name") if isinstance(lin, dict) else None
    return name if isinstance(name, str) else None


def of_run(ckpts: list, run_name: Any = ANY_RUN) -> list:
    """The checkpoints (``CheckpointInfo``) of one run of a folder several runs share; all with ``ANY_RUN``."""
    if run_name is ANY_RUN:
        return list(ckpts)
    return [c for c in ckpts if c.run_name == run_name]


@dataclass
class CheckpointInfo:
    """A committed checkpoint as listed by :func:`list_checkpoints` (read from its manifest, not verified).

    ``summary`` is its manifest without the per-tensor parts (``format.manifest.summary_of``): what listings keep in
    memory, for every checkpoint of a folder a run holds (a manifest of 50,000 tensors is 58 MB parsed). ``manifest``
    is the whole manifest, read again from the checkpoint when first asked for (then kept by this object)."""

    name: str
    path: str
    step: int
    epoch: int | None
    tags: list[str]
    metrics: dict[str, Any]
    size_bytes: int
    kind: str
    created_unix: float | None
    summary: dict = field(repr=False, default_factory=dict)

    @functools.cached_property
    def run_name(self) -> str | None:
        """The run it was saved under (``run_name_of`` its manifest; kept: a run's folder is listed from memory)."""
        return run_name_of(self.summary)

    @functools.cached_property
    def manifest(self) -> dict:
        """The whole manifest (its tensor index and records included), read from the checkpoint: the one listed (its
        digest is the summary's). Raises ``CheckpointNotFoundError`` when it was deleted or replaced since."""
        store, name = locate(self.path)
        m = store.read_manifest(name)[0]
        if m.get(DIGEST) != self.summary.get(DIGEST):
            raise CheckpointNotFoundError(f"{self.path} was replaced by another checkpoint since it was listed (its "
                                          "manifest digest differs): list the folder again")
        return m


def _info(store: Store, name: str, m: dict) -> CheckpointInfo:
    return CheckpointInfo(
        name=name,
        path=store.path(name),
        step=int(m["step"]),
        epoch=m.get("epoch"),
        tags=list(m.get("tags") or []),
        metrics=dict(m.get("metrics") or {}),
        size_bytes=sum(int(f["size"]) for f in m["files"].values()),
        kind=str(m.get("kind", Kind.FULL.value)),
        created_unix=m.get("created_unix"),
        summary=summary_of(m),
    )


def list_checkpoints(dirpath: Any) -> list[CheckpointInfo]:
    """Committed checkpoints in ``dirpath`` (a folder or ``s3://bucket/prefix``), oldest first (by step, then commit
    time).

    Partial folders of interrupted saves are never listed; a checkpoint whose manifest cannot be read is skipped with a
    warning, and one deleted while the folder is listed is skipped silently. Checksums are not verified here (see
    :func:`verify_checkpoint`).
    """
    infos, skipped = scan_checkpoints(dirpath)
    for path, err in skipped:
        warnings.warn(f"lightning_ckpt: skipping {path}: {err}", stacklevel=2)
    return infos


def scan_checkpoints(dirpath: Any) -> tuple[list[CheckpointInfo], list[tuple[str, CheckpointError]]]:
    """The readable checkpoints of a folder (sorted as :func:`list_checkpoints` sorts them) and (path, error) of those
    whose manifest could not be read, without warning about them (the caller decides). From the listing the store
    keeps in memory where it keeps one (``Store.kept``: a run's own folder, an S3 location an uploader holds)."""
    store = open_store(dirpath)
    cached = store.kept(lambda name, m: _info(store, name, m), _order)
    if cached is not None:
        return cached
    out: list[CheckpointInfo] = []
    skipped: list[tuple[str, CheckpointError]] = []
    for name, m in store.manifests():
        if isinstance(m, CheckpointError):
            skipped.append((store.path(name), m))
        else:
            out.append(_info(store, name, m))
    out.sort(key=_order)
    return out, skipped


def _order(c: CheckpointInfo) -> tuple:
    return (c.step, c.created_unix or 0.0, c.name)




def verify_checkpoint(path: Any, *, progress: Any = None) -> None:
    """Check every byte of the checkpoint at ``path`` against its manifest, and everything a load checks: the
    manifest's structure, each file's type and size, and that the non-tensor state parses and refers only to tensors
    the manifest lists. A checkpoint on S3 is downloaded into the local cache first (reused by a later load).

    ``progress``, if given, is called with the number of bytes checked after each block.

    Raises:
        CheckpointNotFoundError: ``path`` is not a committed checkpoint.
        CheckpointCorruptError: a file is missing, has the wrong size or type, or fails its checksum.
    """
    ck = open_checkpoint(path, everything=True)
    try:
        verify_files(ck, progress)
    except CheckpointCorruptError:
        if not ck.store.read_cache:
            raise
        # a cached copy went bad after it was downloaded (every download is checked): fetch it again, once
        verify_files(open_checkpoint(path, everything=True, refresh=True), progress)


def verify_files(ck: "Opened", progress: Any = None) -> None:
    """Check every member of an opened checkpoint (its files and the packs it references) against the manifest, byte
    by byte, and that the non-tensor state parses and refers only to tensors the manifest lists."""
    members = ck.members()
    largest = max((e - b for key in members for b, e, _ in iter_regions(ck.entry(key))), default=0)
    buf = memoryview(bytearray(max(1, min(largest, VERIFY_BLOCK))))
    for key in members:
        folder, fname, entry = ck.where(key)
        where = os.path.join(folder, fname)
        with os.fdopen(open_member(folder, fname, entry["size"], where=where), "rb", buffering=0) as f:
            check_file(f, entry, where, progress, buf)
    # the non-tensor state must also parse and refer only to tensors the manifest lists
    index = ck.m.get("tensors", {})

    def check_key(key: str) -> torch.Tensor:
        if not isinstance(key, str) or key not in index:
            raise CheckpointCorruptError(f"{ck.folder}: the state refers to tensor {key!r}, which the manifest does "
                                         "not list")
        return torch.zeros(0)

    for rank in (ck.m.get("state_files") or {}):
        decode(read_state_doc(ck.folder, ck.m, int(rank)), check_key)


def check_sizes(ck: "Opened", keys: Iterable[tuple[str, str]]) -> None:
    """Each member (file or pack) is a regular file of the size the manifest says (before anything is allocated
    from it)."""
    for key in keys:
        folder, fname, entry = ck.where(key)
        os.close(open_member(folder, fname, entry["size"]))


def latest_checkpoint(dirpath: Any, *, verify: bool = True, run_name: Any = ANY_RUN) -> str | None:
    """Path of the newest committed checkpoint in ``dirpath`` that passes verification, or ``None``.

    Corrupt or unreadable checkpoints are skipped with a warning; interrupted saves are never considered. When no
    checkpoint can be used but some were written by a newer release, :class:`CheckpointFormatError` is raised
    (upgrade): starting fresh next to them would silently lose that run. A folder that does not exist gives ``None``
    with a warning (a mistyped path must not look like a fresh start). ``run_name``: only that run's checkpoints
    (None: the folder's main line) in a folder several runs share.
    """
    store = open_store(dirpath)
    if not store.exists():
        warnings.warn(f"lightning_ckpt: {store.uri} does not exist: no checkpoint to resume from (is the path "
                      "right?)", stacklevel=2)
        return None
    fast = _latest_hinted(store, verify, run_name)
    if fast is not False:
        return fast
    ckpts, skipped = scan_checkpoints(dirpath)
    for path, err in skipped:
        warnings.warn(f"lightning_ckpt: skipping {path}: {err}", stacklevel=2)
    for c in reversed(of_run(ckpts, run_name)):
        if not verify:
            return c.path
        try:
            verify_checkpoint(c.path)
            return c.path
        except CheckpointError as e:
            if getattr(e, "unavailable", False):  # StorageUnavailableError: the endpoint, not the checkpoint
                raise  # never a reason to take an older one
            warnings.warn(f"lightning_ckpt: skipping corrupt checkpoint {c.path}: {e}", stacklevel=2)
            log.warning("skipping corrupt checkpoint %s: %s", c.path, e)
    newer = [err for _, err in skipped if getattr(err, "newer", False)]
    if newer:  # nothing this release can read, but a newer one wrote here: never a silent fresh start
        raise newer[0]
    return None


def _latest_hinted(store: Store, verify: bool, run_name: Any) -> Any:
    """``latest_checkpoint`` through the ``latest.json`` hint and its index (``store/hint.py``): the path, None (the
    run has no checkpoint), or False when the hint cannot answer or what it finds does not verify (then the folder
    is listed and every manifest read, as before). A folder whose listing this process keeps in memory (a run's
    folder: ``store/listing.py``) is answered from that listing."""
    if store.listing_kept():
        return False
    try:
        got = store.newest_hinted(None if run_name is ANY_RUN else run_name, run_name is ANY_RUN)
    except CheckpointError:
        return False
    if got is None:
        return False
    if not got:
        return None
    path = store.path(got[0][0])
    if verify:
        try:
            verify_checkpoint(path)
        except CheckpointError:
            return False  # the full listing skips it with a warning and tries the older ones
    return path


def state_file_of(m: dict, rank: int = 0) -> str | None:
    """The state file of ``rank`` in a checkpoint's manifest (rank 0's when that rank has none: resharding)."""
    files = m.get("state_files") or {}
    return files.get(str(rank)) or files.get("0")


def read_state_doc(folder: str, m: dict, rank: int = 0) -> Any:
    """The non-tensor state (JSON) of one rank from the local ``folder`` of a checkpoint, checksum-verified."""
    fname = state_file_of(m, rank)
    if fname is None:
        raise CheckpointCorruptError(f"{folder}: the manifest lists no state file; the checkpoint is corrupt")
    entry = m["files"][fname]
    where = os.path.join(folder, fname)
    raw = read_member(folder, fname, MAX_STATE_BYTES, size=entry["size"], where=where)
    if crc32c(raw) != entry["header_crc32c"]:
        raise CheckpointCorruptError(f"{where}: checksum mismatch; the state file is corrupt. Use an earlier checkpoint.")
    return parse_state(raw, where)


def read_reference(folder: str) -> dict | None:
    """The record of a reference folder (``REFERENCE`` beside no manifest: what Ray keeps of a checkpoint this package
    reported), or None when ``folder`` is no reference. Raises CheckpointCorruptError for a malformed one."""
    if not isinstance(folder, (str, os.PathLike)):
        return None
    try:
        if open_store(folder).read_cache:  # a location read through a cache (S3) holds no reference folder: Ray's
            return None  # references are local folders
    except ValueError:
        return None
    folder = os.fspath(folder)
    if not os.path.isfile(os.path.join(folder, REFERENCE)) or os.path.lexists(os.path.join(folder, MANIFEST)):
        return None
    where = os.path.join(folder, REFERENCE)
    try:
        ref = json.loads(read_member(folder, REFERENCE, 1 << 16))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointCorruptError(f"{where} is not valid JSON ({e})") from None
    fields = {"path": str, "name": str, "step": int, DIGEST: str}
    if not isinstance(ref, dict) or any(not isinstance(ref.get(k), t) for k, t in fields.items()) or \
            not isinstance(ref.get("uri"), (str, type(None))):
        raise CheckpointCorruptError(f"{where} is not a checkpoint reference of this package (path, name, step, "
                                     f"{DIGEST}); it is corrupt or was written by something else")
    return ref


def resolve_reference(path: Any) -> Any:
    """``path`` itself, or, for a reference folder, the checkpoint it names (see :func:`reference_target`)."""
    ref = read_reference(path) if isinstance(path, (str, os.PathLike)) else None
    return path if ref is None else reference_target(ref, str(path))


def reference_target(ref: dict, where: str) -> str:
    """The checkpoint a reference record names: where it was committed (``path``), else its ``uri`` (an ``s3://``
    dirpath), checked to be the very checkpoint reported (its manifest digest). Raises CheckpointNotFoundError when
    it is gone (deleted by this package's retention or by hand), with what to do, and CheckpointCorruptError when
    another checkpoint now has its name."""
    tried = []
    for target in [ref["path"]] + ([ref["uri"]] if ref.get("uri") else []):
        try:
            store, name = locate(target)
            m = store.read_manifest(name)[0]
        except (CheckpointNotFoundError, FileNotFoundError):
            tried.append(target)
            continue
        if m.get(DIGEST) != ref[DIGEST]:
            raise CheckpointCorruptError(
                f"{where} is a reference to {target} (step {ref['step']}), but the checkpoint there now is another one "
                f"(its manifest digest differs): the one reported was deleted and the name reused. Load another "
                "reported checkpoint, or the folder's newest with lightning_ckpt.latest_checkpoint(...)")
        return target
    raise CheckpointNotFoundError(
        f"{where} is a reference to the checkpoint {ref['name']} (step {ref['step']}), which is no longer at "
        f"{' nor '.join(tried)}: this package's retention (keep_last, keep_every, ...) or a prune deleted it; Ray "
        "keeps references only. Load a newer reported checkpoint (result.checkpoint), or keep more checkpoints")


def read_checkpoint_manifest(path: Any) -> dict:
    """The validated manifest of the checkpoint at ``path`` (a folder, or ``s3://bucket/prefix/<name>``)."""
    store, name = locate(resolve_reference(path))
    return store.read_manifest(name)[0]


class Opened:
    """A checkpoint opened for reading: its manifest, the local folder of its own files, and where each member (a file
    of its own, or a pack of the folder's content store) can be read locally. On S3 members are downloaded (checked)
    into the read cache when :meth:`fetch` asks for them, so each rank downloads only what its reads need."""

    def __init__(self, store: Store, name: str, m: dict, raw: bytes, folder: str, refresh: bool = False) -> None:
        self.store, self.name, self.m, self.raw, self.folder = store, name, m, raw, folder
        self.refresh = refresh
        self.packs_folder = store.packs_folder(None)

    def members(self) -> list[tuple[str, str]]:
        """Every member the checkpoint consists of: its own files, then the packs it references."""
        return [("file", f) for f in sorted(self.m["files"])] + [("pack", p) for p in sorted(self.m.get("packs") or {})]

    def entry(self, key: tuple[str, str]) -> dict:
        kind, name = key
        return (self.m["files"] if kind == "file" else self.m["packs"])[name]

    def where(self, key: tuple[str, str]) -> tuple[str, str, dict]:
        """(local folder, file name, manifest entry) of a member."""
        return (self.folder if key[0] == "file" else self.packs_folder), key[1], self.entry(key)

    def fetch(self, keys: Iterable[tuple[str, str]]) -> None:
        """Make these members readable locally (downloaded into the read cache where the store has one; a local
        checkpoint's members already are)."""
        keys = list(keys)
        files = [n for k, n in keys if k == "file"]
        if files:
            self.store.local_folder(self.name, files, (self.m, self.raw), refresh=self.refresh)
        packs = {n: self.m["packs"][n] for k, n in keys if k == "pack"}
        if packs:
            self.packs_folder = self.store.packs_folder(packs, refresh=self.refresh)


def open_checkpoint(path: Any, rank: int | None = None, *, everything: bool = False, refresh: bool = False) -> Opened:
    """Open the checkpoint at ``path`` for reading. Local: nothing is read but the manifest. On S3 the manifest and
    this rank's state file are downloaded now (``everything``: every member); :meth:`Opened.fetch` downloads what a
    reader's plan needs later. A reference folder (``REFERENCE``) opens the checkpoint it names."""
    store, name = locate(resolve_reference(path))
    m, raw = store.read_manifest(name)
    state_file = state_file_of(m, rank or 0)
    ck = Opened(store, name, m, raw, store.local_folder(name, [state_file] if state_file else [], (m, raw),
                                                        refresh=refresh), refresh)
    if everything:
        ck.fetch(ck.members())
    return ck


def is_checkpoint_dir(path: Any) -> bool:
    """Does ``path`` name a checkpoint of this package (a folder with a manifest, or any ``s3://`` URI: it is read on
    load, with a clear error when nothing is committed there)?"""
    try:
        if read_reference(path) is not None:
            return True  # a reference: loading it resolves it (or says why it cannot)
    except CheckpointError:
        return True  # a malformed reference: loading it says what is wrong
    try:
        store, name = locate(path)
    except (TypeError, ValueError):
        return False
    return store.looks_committed(name)
