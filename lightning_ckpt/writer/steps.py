"""The training thread's part of a save, in three steps that :meth:`CheckpointWriter.save` runs in order:

1. :func:`select`: the state as a document and its tensors, the tensors this rank keeps (its :class:`Roles`);
2. :func:`plan`: which tensors the host buffers copy in bulk, and what deduplication can skip (not even snapshotted);
3. :func:`snapshot`: the tensors as the save writes them (host copies in the background, detached views inline),
   the document's bytes, and node-local folders' handoff of this rank's own state.

Each step is given what it uses (the topology, the buffers, the deduplicator); none of them sees the writer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ..dcp import is_model_or_optim
from ..errors import CheckpointWriteError
from ..format.codec import encode, warn_unsupported
from .dedup import Deduper
from .folders import packed
from .meta import StateDoc, state_bytes_of
from ..format.views import DenseMemo, as_dtensor, dense_views, is_sharded_tensor
from .snapshot import HostBuffers
from .topology import Topology


@dataclass(frozen=True)
class Roles:
    """What one rank keeps of a save.

    Attributes:
        shared: it writes (its share of) the model and optimizer state.
        own: it keeps its own state (RNG, loader position): always in sharded mode, only rank 0's in rank0 mode.
        own_written: its own state goes into its folder (else only handed to the other folders, node-local).
    """

    shared: bool
    own: bool
    own_written: bool

    @classmethod
    def of(cls, topology: Topology, mode: str) -> "Roles":
        # rank0 mode: rank 0 (node-local: each folder's lowest rank) writes the model and optimizer; the other ranks'
        # own state (RNG, loader position) is kept only in sharded mode
        own = mode == "sharded" or topology.rank == 0
        written = topology.folder_written
        return cls(shared=written and (mode == "sharded" or topology.is_leader), own=own, own_written=own and written)


def select(state: dict, topology: Topology, roles: Roles, *, key_fn: Callable[[str], str] | None, cache: dict,
           where: str, memo: DenseMemo | None = None) -> tuple[Any, dict]:
    """Step 1: ``state`` encoded (its document, and its tensors by flat key), and the tensors this rank keeps.
    Conjugate and negative views are resolved and nested tensors refused here, in every mode (``dense_views``;
    ``memo``: the writer's, for a state seen at the saves before)."""
    doc, tensors = encode(state, on_unsupported=warn_unsupported, key_fn=key_fn, cache=cache)
    tensors = dense_views(tensors, memo)
    if topology.node_local and any(as_dtensor(v) is not None or is_sharded_tensor(v) for v in tensors.values()):
        raise CheckpointWriteError(
            f"{where} is local to each node, but this model's state is sharded across ranks (FSDP or tensor "
            "parallel): a node's folder cannot hold a whole checkpoint. Save to a folder every rank shares (a shared "
            "filesystem) or to an s3:// dirpath."
        )
    if not (roles.shared and roles.own):  # (both: every tensor is kept, no per-tensor filter)
        tensors = {k: v for k, v in tensors.items() if (roles.shared if is_model_or_optim(k) else roles.own)}
    return doc, tensors


def plan(tensors: dict, topology: Topology, *, buffers: HostBuffers | None, dedup: Deduper | None,
         stable: Iterable[str]) -> tuple[Any, dict, Any]:
    """Step 2: ``(selection, rest, dedup plan)``. With ``buffers`` (a background save) the small CPU tensors are
    selected for the bulk copy (``HostBuffers.select``): their deduplication is planned later, in the background, from
    the snapshot (``Deduper.observe``/``finish``); the others' (``rest``, all of them inline) here. ``rest`` lacks the
    tensors deduplication found unchanged and already stored: they are not even snapshotted."""
    sel = None if buffers is None else buffers.select(tensors)
    rest = tensors if sel is None else sel.rest
    dedup_plan = None
    if dedup is not None and topology.folder_written:
        if topology.is_leader:
            dedup_plan = dedup.plan(rest, stable)
            skip = set(dedup_plan.reuse)
        else:
            skip = dedup.follower_plan(rest)
            dedup_plan = dedup.plan(rest, (), leader=False)
        if skip:
            rest = {k: v for k, v in rest.items() if k not in skip}
        if sel is not None and sel.keys:
            # read with the check of this save's state when it covered exactly these tensors (DenseMemo)
            signals = getattr(tensors, "signals", None) if sel.srcs is getattr(tensors, "vals", None) else None
            dedup.observe(dedup_plan, sel.keys, sel.srcs, stable, signals)
    return sel, rest, dedup_plan


def snapshot(doc: Any, tensors: dict, sel: Any, rest: dict, topology: Topology, roles: Roles, *,
             buffers: HostBuffers) -> tuple[dict, Any, tuple | None]:
    """Step 3: ``(tensors, state bytes, handoff)`` as the save writes them. With a selection (a background save) the
    tensors are copied into the host buffers; inline they are detached views (DCP copies device tensors to host as
    it writes). The document is the writer's own (its containers or its encode cache's, never changed; immutable
    leaves): a background save encodes it later (``StateDoc``). ``handoff``: node-local, this rank's own state for
    the other nodes' folders (see ``CheckpointWriter.detect_folders``)."""
    inline = sel is None
    if not inline:
        tensors = buffers.copy(sel, rest)
    else:
        tensors = {k: v.detach() for k, v in rest.items()}
    state_bytes = None
    if roles.own:
        state_bytes = StateDoc(doc) if not inline and not topology.node_local else state_bytes_of(doc)
    handoff = None
    if topology.node_local and roles.own:
        handoff = ({k: packed(v) for k, v in tensors.items() if not is_model_or_optim(k)}, state_bytes)
    if not roles.own_written:
        tensors = {k: v for k, v in tensors.items() if is_model_or_optim(k)}
        state_bytes = None
    return tensors, state_bytes, handoff
