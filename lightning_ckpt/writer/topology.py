"""Where a writer's rank stands among the ranks that save together: a frozen value, built once when the writer joins
its group (:func:`join`) and replaced once by folder detection (``writer/folders.py``: :func:`~.folders.detect`).

The writer and its save jobs read who they are from it (rank, world size, the folder's ranks, who commits) and run
their few collectives through it (:meth:`Topology.agree`, :meth:`Topology.gather`, :meth:`Topology.broadcast`), so
none of them reaches into another object's process groups.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from .elastic import warn_restart_store


@dataclass(frozen=True)
class Topology:
    """The ranks of one writer (one process alone: the defaults).

    Attributes:
        rank: this process's rank (global).
        world_size: how many ranks save together (1: alone).
        group: the process group of the save's collectives (None alone): a dedicated gloo group, or the caller's.
        src: the global rank of ``group``'s first rank (the source of broadcasts).
        timeout_s: how long a collective waits for the other ranks before failing.
        folder_ranks: the ranks that see this rank's checkpoint folder, lowest first (all of them unless node-local).
        folder_group: the process group of ``folder_ranks`` when the folder is node-local (else None).
        node_local: the ranks see different folders (a disk per node): each folder is a whole checkpoint.
        every_folder: node-local: every folder gets a whole copy; False: only rank 0's folder is written (the local
            staging folders of an ``s3://`` dirpath).
    """

    rank: int = 0
    world_size: int = 1
    group: Any = None
    src: int = 0
    timeout_s: float = 600.0
    folder_ranks: tuple[int, ...] = (0,)
    folder_group: Any = None
    node_local: bool = False
    every_folder: bool = True

    @property
    def leader(self) -> int:
        """The rank that commits this rank's folder: rank 0, or the lowest rank of a node-local folder."""
        return self.folder_ranks[0] if self.node_local else 0

    @property
    def is_leader(self) -> bool:
        """This rank commits its folder."""
        return self.rank == self.leader

    @property
    def folder_written(self) -> bool:
        """This rank's folder receives the checkpoint (always, unless node-local with only rank 0's folder written)."""
        return not self.node_local or self.every_folder or 0 in self.folder_ranks

    @property
    def write_group(self) -> Any:
        """The group that writes one folder's files together."""
        return self.folder_group if self.node_local else self.group

    def with_folders(self, folder_ranks: tuple[int, ...], folder_group: Any) -> "Topology":
        """This topology with node-local folders: ``folder_ranks`` see this rank's folder."""
        return dataclasses.replace(self, folder_ranks=tuple(folder_ranks), folder_group=folder_group, node_local=True)

    def agree(self, error: str | None) -> str | None:
        """Collective: the first rank's error, if any rank had one (else None)."""
        if self.world_size == 1:
            return error
        return next((e for e in self.gather(error) if e is not None), None)

    def gather(self, obj: Any) -> list:
        """Collective over ``group``: every rank's ``obj``, by rank."""
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, obj, group=self.group)
        return everyone

    def broadcast(self, obj: Any) -> Any:
        """Collective over ``group``: the first rank's ``obj`` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=self.src, group=self.group)
        return box[0]


def join(process_group: Any, timeout_s: float, alone: bool) -> Topology:
    """The topology of a writer created now: alone (one process, or ``alone``), or every rank of the initialized
    process group, with ``process_group`` or a dedicated gloo group for the save's collectives (collective: every
    rank calls it)."""
    if alone or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return Topology(timeout_s=timeout_s)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if process_group is not None:
        group, src = process_group, dist.get_global_rank(process_group, 0)
    else:
        group, src = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)), 0
    warn_restart_store(rank)  # torchrun --max-restarts with the agent's shared store (writer/elastic.py)
    return Topology(rank=rank, world_size=world_size, group=group, src=src, timeout_s=timeout_s,
                    folder_ranks=tuple(range(world_size)))
