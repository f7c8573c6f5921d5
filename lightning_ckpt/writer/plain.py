"""The plain save path: a state without sharded tensors is written without DCP's planning.

DCP earns its cost where tensors are sharded (DTensor, ShardedTensor: chunks, offsets, which rank writes which
replica) and when loading into another layout. A single process, or DDP's replicated state, needs none of it, and DCP
charges for it per tensor: on the 2-core machine ``dcp.save`` of 50,000 small tensors took 21.8 s in one process
(planning, ``_stateful_to_state_dict``, a logged wrapper call per tensor), against 4.5 s for ``safetensors.save_file``
of the same state. Here every tensor is one whole chunk, and which rank writes which replicated tensor is computed
identically on every rank from the state itself:

* one process: nothing to agree on; every tensor is written by this rank;
* several ranks: one ``all_gather_object`` of a digest of each rank's model and optimizer keys (with their dtypes and
  shapes) and whether any tensor is sharded. If a rank holds a sharded tensor, or the ranks holding model state do
  not hold the same, every rank takes the DCP path instead (the same decision everywhere: it is made from the same
  gathered values). Else the replicated tensors are cut, in state order, into contiguous runs of about equal bytes,
  one per rank holding them (each writes about 1/N, as DCP's de-duplication does); every rank's own tensors (RNG,
  loader state) are its own. Then one ``gather_object`` of the written files' records to the leader and one
  ``broadcast_object_list`` of the outcome, so every rank fails if one did. Three collectives per save whatever the
  number of tensors (DCP's save also runs a fixed number, each carrying per-tensor plans).

The files are the same as DCP's path writes (``dcp.write_rank_files``), so readers cannot tell the paths apart.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import Executor
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..dcp import is_model_or_optim, write_rank_files
from ..errors import CheckpointWriteError
from ..format.tensorfile import dtype_name
from ..format.views import as_dtensor, is_sharded_tensor
from .topology import Topology


def _is_sharded(t: Any) -> bool:
    return as_dtensor(t) is not None or is_sharded_tensor(t)


def _digest(shared: list[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    h.update("\n".join(f"{k}\t{t.dtype}\t{tuple(t.shape)}" for k, t in shared).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def split_runs(sizes: list[int], parts: int) -> list[int]:
    """For each item (bytes ``sizes``, in order) the index of the part that writes it: contiguous runs of about
    ``sum / parts`` bytes each (an item goes to the part its middle byte falls in)."""
    total = sum(sizes)
    if parts <= 1 or total == 0:
        return [0] * len(sizes)
    out, pos = [], 0
    for n in sizes:
        out.append(min(parts - 1, (2 * pos + n) * parts // (2 * total)))
        pos += n
    return out


def write_plain(topology: Topology, crc_pool: Executor | None, tx: Any, tensors: dict[str, torch.Tensor], *,
                state_bytes: bytes | None, pack_keys: set[str], pack_name: Callable[[int], str],
                content_hash: bool) -> tuple[list[Any], dict[str, dict]] | None:
    """Write this rank's part of ``tensors`` (a collective over ``topology.group`` with several ranks; the checksums
    computed in ``crc_pool``). Returns the files and the tensor index (on the leader: every rank's; elsewhere: empty),
    or None when the state needs DCP (every rank then gets None)."""
    sharded = any(_is_sharded(t) for t in tensors.values())
    shared = [(k, t) for k, t in tensors.items() if is_model_or_optim(k)]
    grank, parts, holders = 0, 1, [0]
    pg = topology.group
    multi = topology.world_size > 1 and pg is not None
    if multi:
        grank = dist.get_rank(pg)
        mine = (sharded, None if sharded else _digest(shared), len(shared))
        everyone: list = [None] * dist.get_world_size(pg)
        dist.all_gather_object(everyone, mine, group=pg)
        if any(x[0] for x in everyone):
            return None
        holders = [r for r, x in enumerate(everyone) if x[2]]
        if len({everyone[r][1] for r in holders}) > 1:
            return None  # the ranks hold different model state: DCP's planner sorts out who writes what
        parts = len(holders)
    elif sharded:
        return None
    items = []
    if shared:
        me = holders.index(grank)
        owner = split_runs([t.numel() * t.element_size() for _, t in shared], parts)
        items = [(k, t, (0,) * t.dim(), tuple(t.shape), False, k) for (k, t), o in zip(shared, owner) if o == me]
    items += [(k, t, (0,) * t.dim(), tuple(t.shape), False, k) for k, t in tensors.items() if not is_model_or_optim(k)]
    error: BaseException | None = None
    files: list[Any] = []
    index: dict[str, dict] = {}
    try:
        files, written = write_rank_files(tx, grank, items, pack_keys=pack_keys, pack_name=pack_name,
                                          state_bytes=state_bytes, crc_executor=crc_pool,
                                          content_hash=content_hash)
        for key, info, _ in written:
            t = tensors[key]
            kind, fname = info.file
            index[key] = {"dtype": dtype_name(t.dtype), "shape": list(info.sizes), "chunks": [
                {kind: fname, "name": info.name, "offsets": list(info.offsets), "sizes": list(info.sizes)}]}
    except BaseException as e:  # noqa: BLE001 - with several ranks, the others must learn it (below)
        if not multi:
            raise
        error = e
    if not multi:
        return files, index
    report = None if error is None else f"{type(error).__name__}: {error}"[:500]
    leader = grank == 0
    got: list | None = [None] * dist.get_world_size(pg) if leader else None
    dist.gather_object((report, files, index), got, dst=dist.get_global_rank(pg, 0), group=pg)
    outcome = [None]
    if leader:
        bad = [(r, x[0]) for r, x in enumerate(got) if x[0] is not None]
        outcome = [bad[0] if bad else None]
    dist.broadcast_object_list(outcome, src=dist.get_global_rank(pg, 0), group=pg)
    if error is not None:
        raise error
    if outcome[0] is not None:
        r, msg = outcome[0]
        raise CheckpointWriteError(f"rank {r} failed to write its part of the checkpoint ({msg}); nothing was "
                                   "committed and earlier checkpoints are intact. See that rank's log.")
    if not leader:
        return files, {}
    all_files = [f for _, fs, _ in got for f in fs]
    all_index: dict[str, dict] = {}
    for _, _, part in got:
        all_index.update(part)
    return all_files, all_index
