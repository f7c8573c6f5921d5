"""Finding, verifying and loading committed checkpoints. No Lightning imports; no pickle on this path."""
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

from .errors import CheckpointCorruptError, CheckpointError, CheckpointMismatchError, CheckpointNotFoundError
from .format import manifest as mf
from .format.checksum import crc32c
from .format.codec import decode
from .format.tensorfile import dtype_from_name, header_end_from_prefix, iter_regions
from .storage.s3 import is_s3_uri
from .writer.dcp_storage import LCStorageReader, unwrap_dcp_error

log = logging.getLogger("lightning_ckpt")

_VERIFY_BLOCK = 64 << 20


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


def _info(path: str, m: dict) -> CheckpointInfo:
    return CheckpointInfo(
        name=os.path.basename(path),
        path=path,
        step=int(m["step"]),
        epoch=m.get("epoch"),
        tags=list(m.get("tags") or []),
        metrics=dict(m.get("metrics") or {}),
        size_bytes=sum(int(f["size"]) for f in m["files"].values()),
        kind=str(m.get("kind", "full")),
        created_unix=m.get("created_unix"),
        manifest=m,
    )


def list_checkpoints(dirpath: str) -> list[CheckpointInfo]:
    """Committed checkpoints in ``dirpath``, oldest first (by step, then commit time).

    Partial folders of interrupted saves are never listed; a folder whose manifest cannot be read is skipped with a
    warning. Checksums are not verified here (see :func:`verify_checkpoint`).
    """
    if is_s3_uri(dirpath):
        from .storage.s3 import remote_manifests

        base = str(dirpath).rstrip("/")
        out = [_info(f"{base}/{name}", m) for name, m in remote_manifests(base)]
        out.sort(key=lambda c: (c.step, c.created_unix or 0.0, c.name))
        return out
    dirpath = os.fspath(dirpath)
    if not os.path.isdir(dirpath):
        if os.path.exists(dirpath):
            raise CheckpointNotFoundError(f"{dirpath} is a file; pass the folder that holds the checkpoints")
        return []
    out = []
    for e in os.listdir(dirpath):
        if e.startswith("."):
            continue
        p = os.path.join(dirpath, e)
        if not os.path.isfile(os.path.join(p, mf.MANIFEST)):
            continue
        try:
            out.append(_info(p, mf.read_manifest(p)))
        except CheckpointError as err:
            warnings.warn(f"lightning_ckpt: skipping {p}: {err}", stacklevel=2)
    out.sort(key=lambda c: (c.step, c.created_unix or 0.0, c.name))
    return out


def verify_checkpoint(path: str, *, progress: Any = None) -> None:
    """Check every byte of the checkpoint at ``path`` against its manifest.

    ``progress``, if given, is called with the number of bytes checked after each block.

    Raises:
        CheckpointNotFoundError: ``path`` is not a committed checkpoint.
        CheckpointCorruptError: a file is missing, has the wrong size, or fails its checksum.
    """
    if is_s3_uri(path):  # download into the local cache (reused by a later load), then check every byte
        from .storage.s3 import fetch_checkpoint

        path = fetch_checkpoint(str(path))
    path = os.fspath(path)
    m = mf.read_manifest(path)
    largest = max((e - b for entry in m["files"].values() for b, e, _ in iter_regions(entry)), default=0)
    buf = bytearray(max(1, min(largest, _VERIFY_BLOCK)))
    mv = memoryview(buf)
    block = len(buf)
    for fname, entry in m["files"].items():
        fpath = os.path.join(path, fname)
        try:
            f = open(fpath, "rb", buffering=0)
        except FileNotFoundError:
            raise CheckpointCorruptError(f"{fpath} is missing; the checkpoint is incomplete, use an earlier one") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size != entry["size"]:
                raise CheckpointCorruptError(
                    f"{fpath} has {size} bytes where the manifest says {entry['size']}: the file was truncated or "
                    "replaced. Use an earlier checkpoint."
                )
            if entry.get("tensors"):
                head = f.read(8)
                if header_end_from_prefix(head, size, fpath) != entry["header_end"]:
                    raise CheckpointCorruptError(f"{fpath} has a header that does not match the manifest; it is corrupt")
                f.seek(0)
            for begin, end, expected in sorted(iter_regions(entry)):
                f.seek(begin)
                crc = 0
                left = end - begin
                while left:
                    k = f.readinto(mv[: min(left, block)])
                    if not k:
                        raise CheckpointCorruptError(f"{fpath} ended early; it is truncated")
                    crc = crc32c(mv[:k], crc)
                    left -= k
                    if progress is not None:
                        progress(k)
                if crc != expected:
                    raise CheckpointCorruptError(
                        f"{fpath}: checksum mismatch in bytes [{begin}, {end}); the file is corrupt. "
                        "Use an earlier checkpoint (latest_checkpoint skips corrupt ones)."
                    )
    # the non-tensor state must also parse and refer only to tensors the manifest lists
    index = m.get("tensors", {})

    def check_key(key: str) -> torch.Tensor:
        if not isinstance(key, str) or key not in index:
            raise CheckpointCorruptError(f"{path}: the state refers to tensor {key!r}, which the manifest does not list")
        return torch.zeros(0)

    for rank in (m.get("state_files") or {}):
        decode(read_state_doc(path, m, int(rank)), check_key)


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


def read_state_doc(path: str, m: dict, rank: int = 0) -> Any:
    """The non-tensor state (JSON) of one rank, checksum-verified."""
    fname = state_file_of(m, rank)
    if fname is None:
        raise CheckpointCorruptError(f"{path}: the manifest lists no state file; the checkpoint is corrupt")
    entry = m["files"][fname]
    fpath = os.path.join(path, fname)
    try:
        with open(fpath, "rb") as f:
            raw = f.read(entry["size"] + 1)
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{fpath} is missing; the checkpoint is incomplete, use an earlier one") from None
    if len(raw) != entry["size"]:
        raise CheckpointCorruptError(f"{fpath} has {len(raw)} bytes where the manifest says {entry['size']}; it is truncated or replaced")
    if crc32c(raw) != entry["header_crc32c"]:
        raise CheckpointCorruptError(f"{fpath}: checksum mismatch; the state file is corrupt. Use an earlier checkpoint.")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointCorruptError(f"{fpath} is not valid JSON ({e}); the state file is corrupt or hostile") from None


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
    path, m, fetch = _open(path, rank)
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

    from .format.codec import encode
    from .writer.dcp_storage import is_model_or_optim

    path, m, fetch = _open(path, None)
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
    path, m, fetch = _open(path, 0)
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


def read_checkpoint_manifest(path: str) -> dict:
    """The validated manifest of the checkpoint at ``path`` (a folder, or ``s3://bucket/prefix/<name>``)."""
    if is_s3_uri(path):
        from .storage.s3 import read_remote_manifest

        return read_remote_manifest(str(path))[0]
    return mf.read_manifest(os.fspath(path))


def _open(path: Any, rank: int | None) -> tuple[str, dict, Any]:
    """(local folder, manifest, fetch) of a checkpoint. For ``s3://`` only the manifest and this rank's state file are
    downloaded now; ``fetch`` downloads the tensor files a reader's plan needs (each rank fetches only its own)."""
    if not is_s3_uri(path):
        p = os.fspath(path)
        return p, mf.read_manifest(p), None
    from .storage.s3 import fetch_checkpoint, read_remote_manifest

    uri = str(path).rstrip("/")
    got = read_remote_manifest(uri)
    m = got[0]
    state_file = state_file_of(m, rank or 0)
    local = fetch_checkpoint(uri, [state_file] if state_file else [], manifest=got)
    return local, m, lambda names: fetch_checkpoint(uri, names, manifest=got)


def is_checkpoint_dir(path: Any) -> bool:
    if is_s3_uri(path):
        return True  # read on load, with a clear error when nothing is committed there
    try:
        p = os.fspath(path)
    except TypeError:
        return False
    return os.path.isdir(p) and os.path.isfile(os.path.join(p, mf.MANIFEST))


def resume_path(dirpath: str, backup_uri: Any = None) -> str | None:
    """Where to resume from: the newest valid checkpoint among ``dirpath`` and the backups (``"s3://bucket/prefix"``,
    a list of them, or of ``{"uri": ...}`` location dicts); a backup is pulled into ``dirpath`` and verified only when
    it is newer than every valid local one (local wins a tie: nothing to download); ``None`` when there is none (start
    fresh). A corrupt checkpoint is skipped with a warning, and so is an unreachable backup location when a local
    checkpoint exists (with none, the error is raised: starting fresh could silently drop the run).

    ``dirpath`` may itself be an ``s3://`` URI: then the newest valid checkpoint there is returned (verified through
    the local cache). Use it as ``trainer.fit(model, data, ckpt_path=resume_path("ckpts/", "s3://b/run"))``, so
    relaunching the same command, on the same machine or a fresh one, continues the run (or set ``resume="auto"`` on a
    saving callback).
    """
    if is_s3_uri(dirpath):
        return latest_checkpoint(str(dirpath).rstrip("/"))
    local = latest_checkpoint(dirpath) if os.path.isdir(os.fspath(dirpath)) else None
    local_step = int(mf.read_manifest(local)["step"]) if local is not None else -1
    from .storage.s3 import pull_checkpoint, remote_steps

    specs = backup_uri if isinstance(backup_uri, (list, tuple)) else ([] if backup_uri is None else [backup_uri])
    candidates: list[tuple[int, int, str, str]] = []
    for order, spec in enumerate(specs):
        uri = str(spec["uri"] if isinstance(spec, dict) else spec).rstrip("/")
        try:
            steps = remote_steps(uri)
        except Exception as e:  # noqa: BLE001 - S3 down, bucket missing, credentials
            if local is None:
                raise
            warnings.warn(f"lightning_ckpt: cannot read backup location {uri} ({e!r}); resuming from the local {local}",
                          stacklevel=2)
            continue
        candidates += [(step, -order, uri, name) for step, name in steps if step > local_step]
    for step, _, uri, name in sorted(candidates, reverse=True):  # newest first; the first location on a tie
        try:
            return pull_checkpoint(f"{uri}/{name}", os.fspath(dirpath))
        except CheckpointError as e:
            warnings.warn(f"lightning_ckpt: skipping backup {uri}/{name}: {e}", stacklevel=2)
    return local
