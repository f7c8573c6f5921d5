"""Finding, verifying and loading committed checkpoints, in any store. No Lightning imports; no pickle on this path.

Every reader goes through the store of the folder (``store.open_store`` / ``store.locate``): the manifest is read and
validated first, then each file is opened as a regular file of the size the manifest says (never through a link) and
every byte read is checked against its CRC32C. A checkpoint on S3 is read through the local read cache; each rank
downloads only the files its reads need.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from .dcp import LCStorageReader, is_model_or_optim, unwrap_dcp_error
from .errors import CheckpointCorruptError, CheckpointError, CheckpointMismatchError, CheckpointNotFoundError
from .format.codec import decode, encode
from .format.tensorfile import VERIFY_BLOCK, check_file, dtype_from_name, iter_regions
from .store import Store, locate, open_store
from .format.checksum import crc32c
from .format.manifest import MANIFEST
from .store.fs import open_member, read_member

log = logging.getLogger("lightning_ckpt")

MAX_STATE_BYTES = 1 << 30  # a rank's non-tensor state (JSON); anything larger is refused before it is read


@dataclass
class CheckpointInfo:
    """A committed checkpoint as listed by :func:`list_checkpoints` (read from its manifest, not verified)."""

    name: str
    path: str
    step: int
    epoch: int | None
    tags: list[str]
    metrics: dict[str, Any]
    size_bytes: int
    kind: str
    created_unix: float | None
    manifest: dict = field(repr=False, default_factory=dict)


def _info(store: Store, name: str, m: dict) -> CheckpointInfo:
    return CheckpointInfo(
        name=name,
        path=store.path(name),
        step=int(m["step"]),
        epoch=m.get("epoch"),
        tags=list(m.get("tags") or []),
        metrics=dict(m.get("metrics") or {}),
        size_bytes=sum(int(f["size"]) for f in m["files"].values()),
        kind=str(m.get("kind", "full")),
        created_unix=m.get("created_unix"),
        manifest=m,
    )


def list_checkpoints(dirpath: Any) -> list[CheckpointInfo]:
    """Committed checkpoints in ``dirpath`` (a folder or ``s3://bucket/prefix``), oldest first (by step, then commit
    time).

    Partial folders of interrupted saves are never listed; a checkpoint whose manifest cannot be read is skipped with a
    warning, and one deleted while the folder is listed is skipped silently. Checksums are not verified here (see
    :func:`verify_checkpoint`).
    """
    store = open_store(dirpath)
    out = []
    if store.remote:
        out = [_info(store, name, m) for name, m in store.manifests()]
    else:
        for name in store.names():
            try:
                out.append(_info(store, name, store.read_manifest(name)[0]))
            except CheckpointNotFoundError:
                continue  # deleted (retention) since the folder was listed
            except CheckpointError as err:
                warnings.warn(f"lightning_ckpt: skipping {store.path(name)}: {err}", stacklevel=2)
    out.sort(key=lambda c: (c.step, c.created_unix or 0.0, c.name))
    return out


def verify_checkpoint(path: Any, *, progress: Any = None) -> None:
    """Check every byte of the checkpoint at ``path`` against its manifest, and everything a load checks: the
    manifest's structure, each file's type and size, and that the non-tensor state parses and refers only to tensors
    the manifest lists. A checkpoint on S3 is downloaded into the local cache first (reused by a later load).

    ``progress``, if given, is called with the number of bytes checked after each block.

    Raises:
        CheckpointNotFoundError: ``path`` is not a committed checkpoint.
        CheckpointCorruptError: a file is missing, has the wrong size or type, or fails its checksum.
    """
    store, name = locate(path)
    m, raw = store.read_manifest(name)
    try:
        _verify_files(store.local_folder(name, None, (m, raw)), m, progress)
    except CheckpointCorruptError:
        if not store.remote:
            raise
        # a cached copy went bad after it was downloaded (every download is checked): fetch it again, once
        _verify_files(store.local_folder(name, None, (m, raw), refresh=True), m, progress)


def _verify_files(folder: str, m: dict, progress: Any) -> None:
    largest = max((e - b for entry in m["files"].values() for b, e, _ in iter_regions(entry)), default=0)
    buf = memoryview(bytearray(max(1, min(largest, VERIFY_BLOCK))))
    for fname, entry in m["files"].items():
        where = os.path.join(folder, fname)
        with os.fdopen(open_member(folder, fname, entry["size"], where=where), "rb", buffering=0) as f:
            check_file(f, entry, where, progress, buf)
    # the non-tensor state must also parse and refer only to tensors the manifest lists
    index = m.get("tensors", {})

    def check_key(key: str) -> torch.Tensor:
        if not isinstance(key, str) or key not in index:
            raise CheckpointCorruptError(f"{folder}: the state refers to tensor {key!r}, which the manifest does not list")
        return torch.zeros(0)

    for rank in (m.get("state_files") or {}):
        decode(read_state_doc(folder, m, int(rank)), check_key)


def latest_checkpoint(dirpath: str, *, verify: bool = True) -> str | None:
    """Path of the newest committed checkpoint in ``dirpath`` that passes verification, or ``None``.

    Corrupt or unreadable checkpoints are skipped with a warning; interrupted saves are never considered.
    """
    ckpts = list_checkpoints(dirpath)
    for c in reversed(ckpts):
        if not verify:
            return c.path
        try:
            verify_checkpoint(c.path)
            return c.path
        except CheckpointError as e:
            warnings.warn(f"lightning_ckpt: skipping corrupt checkpoint {c.path}: {e}", stacklevel=2)
            log.warning("skipping corrupt checkpoint %s: %s", c.path, e)
    return None


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
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointCorruptError(f"{where} is not valid JSON ({e}); the state file is corrupt or hostile") from None


def load_tensors(path: str, m: dict, keys: list[str] | None = None, *, verify: bool = True, device: Any = "cpu",
                 fetch: Any = None) -> dict[str, torch.Tensor]:
    """Read tensors (all, or ``keys``) of a checkpoint through DCP into freshly allocated tensors on ``device``
    (on a GPU, through pinned staging pieces whose copies overlap the disk reads)."""
    index = m.get("tensors", {})
    wanted = list(index) if keys is None else keys
    targets: dict[str, torch.Tensor] = {}
    for k in wanted:
        if k not in index:
            raise CheckpointCorruptError(f"{path}: the state refers to tensor {k!r}, which the manifest does not list")
        t = index[k]
        targets[k] = torch.empty([int(s) for s in t["shape"]], dtype=dtype_from_name(t["dtype"]), device=device)
    if not targets:
        return targets
    reader = LCStorageReader(path, m, verify=verify, fetch=fetch)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(targets, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=False), no_dist=True)
    except BaseException as e:
        err = unwrap_dcp_error(e)
        if isinstance(err, CheckpointError):
            raise err from None
        if isinstance(err, OSError):
            raise CheckpointCorruptError(f"reading {path} failed: {err}") from err
        raise
    return targets


def load_checkpoint(path: str, map_location: Any = "cpu", *, verify: bool = True, rank: int = 0,
                    without_tensors_of: Iterable[str] = ()) -> dict:
    """Load a checkpoint written by this package as the Lightning checkpoint dictionary.

    Every byte read is checked against its CRC32C (``verify=False`` skips the checks). Nothing is unpickled.

    Args:
        path: a checkpoint folder (one that holds ``manifest.json``).
        map_location: device (or ``torch.load``-style mapping) the tensors are moved to; ``"cpu"`` by default.
        rank: whose non-tensor state to read in a checkpoint saved by several ranks.
        without_tensors_of: top-level keys (say ``"state_dict"``, ``"optimizer_states"``) whose tensors are not
            read: they come back as ``None``, the rest of those entries (optimizer ``param_groups``) as saved. For
            sharded models, whose tensors are loaded in place with :func:`load_into`.
    """
    path, m, fetch = open_checkpoint(path, rank)
    doc = read_state_doc(path, m, rank)
    wanted: list[str] = []
    skipped = tuple(f"{k}/" for k in without_tensors_of)

    def collect(key: str) -> torch.Tensor:
        if not isinstance(key, str):
            raise CheckpointCorruptError(f"{path}: the state refers to a tensor by an invalid key {key!r}")
        if not (skipped and key.startswith(skipped)):
            wanted.append(key)
        return torch.zeros(0)

    decode(doc, collect)  # the tensors this rank's state refers to (in a multi-rank checkpoint: not the others')
    device = "cpu"
    if isinstance(map_location, (str, torch.device)) and torch.device(map_location).type == "cuda":
        device = torch.device(map_location)  # read straight onto the GPU, overlapping disk and copies
        map_location = None
    tensors = load_tensors(path, m, list(dict.fromkeys(wanted)), verify=verify, device=device, fetch=fetch)

    def get(key: str) -> torch.Tensor | None:
        if skipped and key.startswith(skipped):
            return None
        try:
            t = tensors[key]
        except KeyError:
            raise CheckpointCorruptError(f"{path}: the state refers to tensor {key!r}, which the manifest does not list") from None
        return _map(t, map_location)

    return decode(doc, get)


def load_into(path: str, state: dict, *, process_group: Any = None, verify: bool = True, rank: int | None = None) -> None:
    """Load a checkpoint's tensors in place into ``state``, a (nested) dict shaped like the saved one, whose tensors
    may be plain, ``DTensor`` (FSDP2) or ``ShardedTensor``, laid out for any world size: DCP plans which bytes each
    rank reads (resharding N ranks -> M). Nothing is gathered. Every byte read is verified.

    Example (FSDP2, any number of ranks)::

        state = {"state_dict": get_model_state_dict(model), "optimizer_states": [get_optimizer_state_dict(model, opt)]}
        load_into(path, state)
        set_model_state_dict(model, state["state_dict"]); set_optimizer_state_dict(model, opt, state["optimizer_states"][0])
    """
    import torch.distributed as dist

    path, m, fetch = open_checkpoint(path, None)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1
    my_rank = (dist.get_rank() if distributed else 0) if rank is None else rank
    prefix = f"rank{my_rank:05d}/"
    _, tensors = encode(state)
    targets: dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        if is_model_or_optim(k) or k in m.get("tensors", {}):
            targets[k] = t
        elif prefix + k in m.get("tensors", {}):
            targets[prefix + k] = t
        else:
            raise CheckpointMismatchError(f"{path} has no tensor {k!r}; the state does not match the checkpoint")
    reader = LCStorageReader(path, m, verify=verify, fetch=fetch)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            if distributed:
                dcp.load(targets, storage_reader=reader, planner=DefaultLoadPlanner(), process_group=process_group)
            else:
                dcp.load(targets, storage_reader=reader, planner=DefaultLoadPlanner(), no_dist=True)
    except BaseException as e:
        err = unwrap_dcp_error(e)
        if isinstance(err, CheckpointError):
            raise err from None
        if isinstance(err, (RuntimeError, ValueError)) and "Missing key" in str(err):
            raise CheckpointMismatchError(f"{path} does not hold every tensor of the given state: {err}") from None
        raise


def load_weights(path: str, model: torch.nn.Module, *, strict: bool = True, map_location: Any = "cpu"):
    """Load the model weights of any checkpoint that has them (full, weights, partial) into ``model``.

    Only the model's tensors are read (and verified). A partial checkpoint needs ``strict=False``.
    Returns what ``model.load_state_dict`` returns (missing and unexpected keys).
    """
    path, m, fetch = open_checkpoint(path, 0)
    kind = m.get("kind", "full")
    doc = read_state_doc(path, m)
    sd_doc = doc.get("state_dict") if isinstance(doc, dict) else None
    if sd_doc is None:
        raise CheckpointMismatchError(
            f"{path} is a {kind!r} checkpoint without model weights; use one saved with content='full' or 'weights'"
        )
    if kind == "partial" and strict:
        raise CheckpointMismatchError(
            f"{path} is a partial checkpoint (include={m.get('include')}, exclude={m.get('exclude')}); it holds only "
            "some of the model's tensors. Load it with strict=False."
        )
    keys = [k for k in m.get("tensors", {}) if k.startswith("state_dict/")]
    tensors = load_tensors(path, m, keys, fetch=fetch)
    sd = decode(sd_doc, lambda k: _map(tensors[k], map_location) if k in tensors else _missing(path, k))
    return model.load_state_dict(sd, strict=strict)


def _missing(path: str, key: str):
    raise CheckpointCorruptError(f"{path}: the state refers to tensor {key!r}, which the manifest does not list")


def _map(t: torch.Tensor, map_location: Any) -> torch.Tensor:
    if map_location is None or map_location == "cpu" or map_location == torch.device("cpu"):
        return t
    if callable(map_location):
        return map_location(t, "cpu")
    if isinstance(map_location, dict):
        dev = map_location.get("cpu", "cpu")
        return t.to(dev)
    return t.to(map_location)


def read_checkpoint_manifest(path: Any) -> dict:
    """The validated manifest of the checkpoint at ``path`` (a folder, or ``s3://bucket/prefix/<name>``)."""
    store, name = locate(path)
    return store.read_manifest(name)[0]


def open_checkpoint(path: Any, rank: int | None = None) -> tuple[str, dict, Any]:
    """(local folder, manifest, fetch) of a checkpoint. On S3 only the manifest and this rank's state file are
    downloaded now; ``fetch`` downloads the tensor files a reader's plan needs (each rank fetches only its own)."""
    store, name = locate(path)
    got = store.read_manifest(name)
    m = got[0]
    if not store.remote:
        return store.local_folder(name), m, None
    state_file = state_file_of(m, rank or 0)
    local = store.local_folder(name, [state_file] if state_file else [], got)
    return local, m, lambda names: store.local_folder(name, names, got)


def is_checkpoint_dir(path: Any) -> bool:
    """Does ``path`` name a checkpoint of this package (a folder with a manifest, or any ``s3://`` URI: it is read on
    load, with a clear error when nothing is committed there)?"""
    try:
        store, name = locate(path)
    except (TypeError, ValueError):
        return False
    return store.remote or os.path.isfile(os.path.join(store.local_folder(name), MANIFEST))
