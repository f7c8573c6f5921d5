"""Loading committed checkpoints: the Lightning checkpoint dictionary, tensors in place into (sharded) state of any
world size, model weights. Every byte read is verified; every allocation is bounded by bytes on disk; nothing is
unpickled. Reading goes through DCP with this package's ``StorageReader`` (``dcp/``), so resharding works."""
from __future__ import annotations

import os
import warnings
from operator import itemgetter
from typing import Any, Iterable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from .dcp import LCStorageReader, ChunkInfo, is_model_or_optim, unwrap_dcp_error
from .dcp.planned import load_planned
from .errors import CheckpointCorruptError, CheckpointError, CheckpointMismatchError
from .format.codec import decode, encode
from .format.gcpause import pausing
from .format.checksum import content_hash, crc32c
from .format.tensorfile import content_mismatch, dtype_from_name, readinto_exact
from .format.manifest import chunk_member
from .read import Opened, check_sizes, open_checkpoint, read_state_doc
from .store.chunkread import mismatch
from .store.fs import open_member
from .policy.enums import Kind


class _Whole:
    """A read of one stored chunk whole into ``target`` (no DCP plan item needed)."""

    __slots__ = ("target", "storage_offsets", "lengths")

    def __init__(self, target: torch.Tensor, sizes: tuple[int, ...]) -> None:
        self.target, self.storage_offsets, self.lengths = target, (0,) * len(sizes), sizes


class WholeChunks:
    """The planner of a load that reads every chunk of the wanted tensors whole into freshly allocated tensors: what
    ``load_checkpoint`` does, without DCP's per-tensor planning (on the 2-core machine about 5 s of a 50,000-tensor
    load)."""

    def __init__(self, ck: Any, targets: dict[str, torch.Tensor]) -> None:
        self.chunks: list[tuple[_Whole, ChunkInfo]] = []
        index = ck.m.get("tensors", {})
        for key, target in targets.items():
            for c in index[key]["chunks"]:
                offsets, sizes = tuple(c["offsets"]), tuple(c["sizes"])
                view = target
                if view.dim() and (any(offsets) or sizes != tuple(target.shape)):
                    for dim, (o, n) in enumerate(zip(offsets, sizes)):
                        view = view.narrow(dim, o, n)
                self.chunks.append((_Whole(view, sizes), ChunkInfo(chunk_member(c), c["name"], offsets, sizes)))

    @staticmethod
    def resolve_tensor(item: _Whole) -> torch.Tensor:
        return item.target

    @staticmethod
    def commit_tensor(item: _Whole, tensor: torch.Tensor) -> None:
        pass


def load_tensors(ck: Opened, keys: list[str] | None = None, *, verify: bool = True,
                 device: Any = "cpu") -> dict[str, torch.Tensor]:
    """Read tensors (all, or ``keys``) of an opened checkpoint through DCP into freshly allocated tensors on ``device``
    (on a GPU, through pinned staging pieces whose copies overlap the disk reads)."""
    m, path = ck.m, ck.folder
    index = m.get("tensors", {})
    wanted = list(index) if keys is None else keys
    for k in wanted:
        if k not in index:
            raise CheckpointCorruptError(f"{path}: the state refers to tensor {k!r}, which the manifest does not list")
    # every allocation below is bounded by bytes on disk: the chunks tile each tensor (checked with the manifest), and
    # the files they are in are checked here to be regular files of the size the manifest says
    needed = sorted({chunk_member(c) for k in wanted for c in index[k]["chunks"]})
    ck.fetch(needed)
    check_sizes(ck, needed)
    reader = LCStorageReader(ck, verify=verify)
    small: dict[str, torch.Tensor] = {}
    targets: dict[str, torch.Tensor] = {}
    try:
        if torch.device(device).type == "cpu":
            small = read_small(ck, reader, wanted, verify)
        for k in wanted:
            if k not in small:
                t = index[k]
                targets[k] = torch.empty([int(s) for s in t["shape"]], dtype=dtype_from_name(t["dtype"]),
                                         device=device)
        if targets:  # every chunk whole into its place: no DCP plan needed (WholeChunks)
            plan = WholeChunks(ck, targets)
            reader.read_chunks(plan.chunks, plan)
    except BaseException as e:
        err = unwrap_dcp_error(e)
        if isinstance(err, CheckpointError):
            raise err from None
        if isinstance(err, OSError):
            raise CheckpointCorruptError(f"reading {path} failed: {err}") from err
        raise
    if small:
        targets.update(small)
        return {k: targets[k] for k in wanted}
    return targets


SMALL = 1 << 20  # tensors below this many bytes are read in runs into a buffer they then share (read_small)


def read_small(ck: Opened, reader: LCStorageReader, wanted: list[str], verify: bool) -> dict[str, torch.Tensor]:
    """The wanted tensors stored whole in one chunk of fewer than :data:`SMALL` bytes, read without a per-tensor
    read: each run of them that is contiguous in its file is read at once into one buffer, each one's CRC32C is checked
    on its slice, and each model or optimizer tensor comes back as a view of that buffer (the others, and any whose
    offset does not suit its dtype, as a copy of their own). 50,000 tensors cost one read and 50,000 checksums and views instead of 50,000 seeks, reads and NumPy
    views; the buffer is freed with the last of its tensors. Every allocation is bounded by the file's size."""
    index = ck.m.get("tensors", {})  # a manifest may list no tensor (a light checkpoint, or a hostile one)
    per_member: dict[tuple, list] = {}
    entries: dict[tuple, dict] = {}
    for k in wanted:
        t = index[k]
        cs = t["chunks"]
        if len(cs) != 1:
            continue
        c = cs[0]
        if any(c["offsets"]) or c["sizes"] != t["shape"]:
            continue
        member = chunk_member(c)
        entry = entries.get(member)
        if entry is None:
            entry = entries[member] = ck.entry(member)
        rec = entry["tensors"][c["name"]]
        if rec["end"] - rec["begin"] < SMALL:
            per_member.setdefault(member, []).append((rec["begin"], rec["end"], rec["crc32c"], k, c["name"],
                                                      rec.get("xxh128"), t))
    out: dict[str, torch.Tensor] = {}
    for member, items in sorted(per_member.items()):
        items.sort(key=itemgetter(0))
        folder, fname, entry = ck.where(member)
        where = os.path.join(folder, fname)
        with os.fdopen(open_member(folder, fname, entry["size"]), "rb", buffering=0) as f:
            reader._check_header(f, member)
            start = 0
            for i in range(1, len(items) + 1):
                if i == len(items) or items[i][0] != items[i - 1][1]:
                    _read_run(f, where, items[start:i], verify, out)
                    start = i
    return out


def _read_run(f: Any, where: str, run: list, verify: bool, out: dict) -> None:
    """One run of tensors back to back in a file: one read into one buffer, each tensor's checksums on its slice,
    then the tensors as views of the buffer (one ``split`` when they share a dtype and are model or optimizer
    tensors, the common case), or as copies of their own."""
    b0, e0 = run[0][0], run[-1][1]
    pad = b0 % 64  # each tensor's offset in the buffer is its offset in the file modulo 64: dtype-aligned if that is
    slab = torch.empty(pad + e0 - b0, dtype=torch.uint8)
    mv = memoryview(slab.numpy()).cast("B")
    f.seek(b0)
    readinto_exact(f, mv[pad:], where)
    if verify:
        for b, e, crc, _key, name, xxh, _t in run:
            piece = mv[pad + b - b0:pad + e - b0]
            if crc32c(piece) != crc:
                raise mismatch(where, name)
            if xxh is not None and content_hash(piece) != xxh:  # a packed tensor: its content hash too
                raise content_mismatch(where, name)
    names = {it[6]["dtype"] for it in run}
    keys = [it[3] for it in run]
    if len(names) == 1 and all(map(is_model_or_optim, keys)):
        dt, size, flat = _typed(slab, names.pop())
        if pad % size == 0:  # then every tensor's offset is aligned too (each one's length is a multiple of size)
            numels = [(e - b) // size for b, e, *_ in run]
            lo = pad // size
            pieces = flat[lo:lo + sum(numels)].split(numels)
            out.update(zip(keys, map(torch.Tensor.view, pieces, [it[6]["shape"] for it in run])))
            return
    typed: dict[str, tuple[torch.dtype, int, torch.Tensor]] = {}  # dtype name -> (dtype, itemsize, the slab as it)
    for b, e, _crc, key, _name, _xxh, t in run:
        a = pad + b - b0
        dt, size, flat = typed.get(t["dtype"]) or typed.setdefault(t["dtype"], _typed(slab, t["dtype"]))
        if a % size or not is_model_or_optim(key):
            # a misaligned offset, or not a model or optimizer tensor: a tensor of its own (some consumers, such as
            # torch.set_rng_state, read a tensor's storage from its start)
            out[key] = slab[a:a + e - b].clone().view(dt).view(t["shape"])
        else:  # a view of the slab seen as this dtype
            out[key] = flat[a // size:(e - b0 + pad) // size].view(t["shape"])


def _typed(slab: torch.Tensor, name: str) -> tuple[torch.dtype, int, torch.Tensor]:
    dt = dtype_from_name(name)
    size = dt.itemsize
    return dt, size, slab[:slab.numel() - slab.numel() % size].view(dt)


@pausing
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
    ck = open_checkpoint(path, rank)
    path = ck.folder
    doc = read_state_doc(path, ck.m, rank)
    wanted: list[str] = []
    skipped = tuple(f"{k}/" for k in without_tensors_of)

    placeholder = torch.zeros(0)

    def collect(key: str) -> torch.Tensor:
        if not isinstance(key, str):
            raise CheckpointCorruptError(f"{path}: the state refers to a tensor by an invalid key {key!r}")
        if not (skipped and key.startswith(skipped)):
            wanted.append(key)
        return placeholder

    decode(doc, collect)  # the tensors this rank's state refers to (in a multi-rank checkpoint: not the others')
    device = "cpu"
    if isinstance(map_location, (str, torch.device)) and torch.device(map_location).type == "cuda":
        device = torch.device(map_location)  # read straight onto the GPU, overlapping disk and copies
        map_location = None
    tensors = load_tensors(ck, list(dict.fromkeys(wanted)), verify=verify, device=device)

    def get(key: str) -> torch.Tensor | None:
        if skipped and key.startswith(skipped):
            return None
        try:
            t = tensors[key]
        except KeyError:
            raise CheckpointCorruptError(f"{path}: the state refers to tensor {key!r}, which the manifest does not list") from None
        return _map(t, map_location)

    return decode(doc, get)


@pausing
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

    ck = open_checkpoint(path, None)
    path, m = ck.folder, ck.m
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
    reader = LCStorageReader(ck, verify=verify)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            # each rank reads by its own plan (dcp.planned.load_planned: DCP's default load plans no global step);
            # a torch whose default load plan has a global step goes through DCP's own driver
            if not load_planned(targets, reader, DefaultLoadPlanner(), group=process_group, use_dist=distributed):
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


@pausing
def load_weights(path: str, model: torch.nn.Module, *, strict: bool = True, map_location: Any = "cpu"):
    """Load the model weights of any checkpoint that has them (full, weights, partial) into ``model``.

    Only the model's tensors are read (and verified). A partial checkpoint needs ``strict=False``.
    Returns what ``model.load_state_dict`` returns (missing and unexpected keys).
    """
    ck = open_checkpoint(path, 0)
    path, m = ck.folder, ck.m
    kind = m.get("kind", Kind.FULL.value)
    doc = read_state_doc(path, m)
    sd_doc = doc.get("state_dict") if isinstance(doc, dict) else None
    if sd_doc is None:
        raise CheckpointMismatchError(
            f"{path} is a {kind!r} checkpoint without model weights; use one saved with content='full' or 'weights'"
        )
    if kind == Kind.PARTIAL and strict:
        raise CheckpointMismatchError(
            f"{path} is a partial checkpoint (include={m.get('include')}, exclude={m.get('exclude')}); it holds only "
            "some of the model's tensors. Load it with strict=False."
        )
    keys = [k for k in m.get("tensors", {}) if k.startswith("state_dict/")]
    tensors = load_tensors(ck, keys)
    sd = decode(sd_doc, lambda k: _map(tensors[k], map_location) if k in tensors else _missing(path, k))
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointCorruptError(f"{path}: its state_dict is not a mapping of names to tensors; the checkpoint is "
                                     "corrupt or was not written from a model")
    try:
        return model.load_state_dict(sd, strict=strict)
    except RuntimeError as e:  # missing/unexpected keys, shape mismatches
        raise CheckpointMismatchError(f"{path} does not fit this model: {e}") from None


def _missing(path: str, key: str):
    raise CheckpointCorruptError(f"{path}: the state refers to tensor {key!r}, which the manifest does not list")


def _map(t: torch.Tensor, map_location: Any) -> torch.Tensor:
    if map_location is None or map_location == "cpu" or map_location == torch.device("cpu"):
        return t
    if callable(map_location):  # torch.load's convention: (storage, location) -> moved, or None to keep it
        moved = map_location(t, "cpu")
        return t if moved is None else moved
    if isinstance(map_location, dict):
        dev = map_location.get("cpu", "cpu")
        return t.to(dev)
    return t.to(map_location)
