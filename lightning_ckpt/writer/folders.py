"""Which ranks share a checkpoint folder (a shared filesystem, or a node-local disk per node), found with probe files:
:func:`detect` returns the writer's :class:`~.topology.Topology` with the folders it found."""
from __future__ import annotations

import dataclasses
import logging
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import CheckpointWriteError
from ..store.base import PROBE_PREFIX, SEP
from ..store.fs import OPS
from ..store.local import LocalStore
from ..format.tensorfile import byte_view, dtype_from_name, dtype_name
from .topology import Topology

log = logging.getLogger("lightning_ckpt")


def folder_groups(store: LocalStore, rank: int, world_size: int, pg: Any, writer_id: str) -> list[tuple[int, ...]]:
    """Collective: the groups of ranks that see the same folder, lowest rank first in each, sorted.

    In rounds: the lowest rank not yet placed leaves a probe file; the ranks that see it share its folder. One round on
    a shared filesystem, one per node for node-local disks. Each rank looks up one name per round (by name rather than
    listing: a shared filesystem such as NFS may serve a cached listing of the folder)."""
    store.makedirs()
    leader_of: dict[int, int] = {}
    while len(leader_of) < world_size:
        leader = min(r for r in range(world_size) if r not in leader_of)
        probe = store.path(f"{PROBE_PREFIX}node{SEP}{writer_id}{SEP}{leader}")
        if rank == leader:
            OPS.write_file(probe, b"", fsync=False)
        dist.barrier(group=pg)
        sees = rank not in leader_of and os.path.exists(probe)
        flags: list = [None] * world_size
        dist.all_gather_object(flags, sees, group=pg)
        if rank == leader:
            OPS.unlink(probe)  # every rank has looked by now
        if not flags[leader]:
            raise CheckpointWriteError(
                f"rank {leader} cannot see the file it just created in the checkpoint folder {store.root}; use a "
                "folder on a filesystem that shows a file to the process that created it")
        for r, seen in enumerate(flags):
            if seen:
                leader_of[r] = leader
    dist.barrier(group=pg)  # no probe is left for the leftover cleanup that follows to report
    return sorted({tuple(r for r in range(world_size) if leader_of[r] == ld) for ld in leader_of.values()})


def detect(store: LocalStore, topology: Topology, writer_id: str, every_folder: bool = True) -> Topology:
    """Collective (every rank of ``topology``): which ranks see the same folder (see
    ``CheckpointWriter.detect_folders``). The topology returned is node-local when its ranks see different folders:
    then each folder is a whole checkpoint of its own, written through one gloo group per folder."""
    topology = dataclasses.replace(topology, every_folder=bool(every_folder))
    if topology.world_size == 1:
        return topology
    groups = folder_groups(store, topology.rank, topology.world_size, topology.group, writer_id)
    if len(groups) == 1:
        return topology
    mine: tuple[tuple[int, ...], Any] = ((), None)
    for g in groups:  # every rank creates every group, in the same order
        pg = dist.new_group(ranks=list(g), backend="gloo", timeout=timedelta(seconds=topology.timeout_s))
        if topology.rank in g:
            mine = (g, pg)
    log.info("lightning_ckpt: %s is local to ranks %s (%d folders); each folder is committed as a whole checkpoint",
             store.root, list(mine[0]), len(groups))
    return topology.with_folders(*mine)


def packed(t: torch.Tensor) -> tuple[str, list[int], bytes]:
    """A CPU tensor as plain values, to hand to another rank (no tensor pickling: the snapshot buffers are views)."""
    t = t.detach().cpu().contiguous()
    return dtype_name(t.dtype), list(t.shape), bytes(byte_view(t))


def unpacked(p: tuple[str, list[int], bytes]) -> torch.Tensor:
    dtype, shape, data = p
    if not data:
        return torch.empty(shape, dtype=dtype_from_name(dtype))
    return torch.frombuffer(bytearray(data), dtype=dtype_from_name(dtype)).reshape(shape)
