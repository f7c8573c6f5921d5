"""Driving DCP's planners for the lightning_ckpt adapter (``dcp/__init__.py``): ``save_planned`` and ``load_planned``
do what ``dcp.save`` and ``dcp.load`` do with a flat dict of tensors, the planner's decisions unchanged, less what
those charge per tensor for nothing here (issue 22), and with the same collectives or fewer, never more per tensor.
"""
from __future__ import annotations

import dataclasses
import threading
import traceback
import uuid
from collections import OrderedDict
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadPlanner, SavePlan, SavePlanner

from . import LCStorageReader, LCStorageWriter


def save_planned(state: dict, writer: LCStorageWriter, planner: SavePlanner, group: Any = None,
                 use_dist: bool = True, cache_key: Any = None) -> None:
    """``dcp.save(state, storage_writer=writer, planner=planner, process_group=group)`` of a flat dict of tensors, with
    DCP's planning (the planner's local plans, global plan, deduplication and validation, unchanged) but without what
    costs per tensor for nothing here (issue 22; measured with 2 ranks of 10,000 DTensor shards each):

    - ``dcp.save`` first calls ``_stateful_to_state_dict``, which wraps each top-level key in DCP's method logger (a
      uuid, the process group's name and two ``LogRecord`` per key, about 35 us each): ``state`` is tensors only;
    - the coordinator scatters each rank's global plan back whole (10,000 pickled ``WriteItem``); a rank whose
      global plan holds the same chunks as the local plan it sent (the usual case: DCP only rewrites index hints and
      drops replicated duplicates) gets only its ``storage_data`` and keeps its own plan;
    - the write results travel as plain tuples (``write_chunks``), not ``WriteResult`` dataclasses;
    - ``dcp.save`` ends by broadcasting the whole ``Metadata`` from the coordinator to every rank; here the
      coordinator broadcasts only whether ``finish`` succeeded.

    The collectives are ``dcp.save``'s four, none per tensor: gather the local plans, scatter the replies, gather the
    write results, broadcast the outcome (plus one gather and scatter when a cached plan must be sent again). As in DCP, an error on any rank raises a ``CheckpointException`` (its
    ``failures``: rank -> (exception, traceback)) on every rank, and a rank that failed planning does not write.

    ``cache_key`` (the same on every rank: the writer's id) caches the planning between saves, see :class:`_PlanCache`:
    a rank whose local plan equals the one it sent last time sends a token instead, and when every rank did, the
    coordinator reuses its global plan and metadata. (DCP's own ``enable_plan_caching`` is not used: its cache is
    per process and per planner class, shared by every writer and process group, and its plan comparison ignores
    the dtype, so a model cast between saves of the same shapes would be described by the old metadata.)"""
    from torch.distributed.checkpoint.api import CheckpointException

    if use_dist:
        import torch.distributed as dist

        rank, world = dist.get_rank(group), dist.get_world_size(group)
        coordinator = dist.get_global_rank(group, 0) if group is not None else 0
    else:
        rank, world, coordinator = 0, 1, 0
    is_coordinator = rank == 0

    def gather(obj: Any) -> list | None:
        if not use_dist:
            return [obj]
        out = [None] * world if is_coordinator else None
        dist.gather_object(obj, out, dst=coordinator, group=group)
        return out

    def failures_in(objs: list) -> dict:
        return {i: o for i, o in enumerate(objs) if _is_wrapped(o)}

    key = None
    if cache_key is not None:
        key = (cache_key, tuple(dist.get_process_group_ranks(group)) if use_dist and group is not None else world)
    cache = _PlanCache.get(key)
    # plan: DCP's local_step
    local: Any = None
    try:
        with torch.no_grad():  # DTensor.to_local() without an autograd call per tensor
            planner.set_up_planner(state_dict=state, storage_meta=writer.storage_meta(), is_coordinator=is_coordinator)
            writer.set_up_storage_writer(is_coordinator, rank=rank)
            local = writer.prepare_local_plan(planner.create_local_plan())
        mine: Any = local
    except BaseException as e:  # noqa: BLE001 - reported to the coordinator, raised on every rank
        mine = _wrap(e)
    token = cache.sent_token(local) if cache is not None and local is not None else None
    metadata: Metadata | None = None
    for attempt in (0, 1):  # a second round only when the coordinator lacks a plan a rank named by its token
        plans = gather(("cached", token) if attempt == 0 and token is not None else mine)
        replies: list | None = None
        if is_coordinator:
            assert plans is not None
            failed = failures_in(plans)
            if not failed:
                try:
                    replies, metadata = _global_step(planner, writer, plans, cache)
                except BaseException as e:  # noqa: BLE001
                    failed[rank] = _wrap(e)
            if failed:
                replies = [CheckpointException("plan", failed)] * world
        if use_dist:
            got = [None]
            dist.scatter_object_list(got, replies if is_coordinator else None, src=coordinator, group=group)
            reply = got[0]
        else:
            assert replies is not None
            reply = replies[0]
        if isinstance(reply, CheckpointException):
            raise reply
        if reply[0] != "resend":
            break
    if cache is not None:
        cache.sent(local, reply[2])
    central = dataclasses.replace(local, storage_data=reply[1]) if reply[0] == "same" else reply[1]
    # write: DCP's write_data, then finish on the coordinator
    try:
        final = planner.finish_plan(central)
        written: Any = writer.write_chunks(final, planner)
    except BaseException as e:  # noqa: BLE001
        written = _wrap(e)
    results = gather(written)
    outcome: Any = None
    if is_coordinator:
        assert results is not None
        failed = failures_in(results)
        if not failed:
            try:
                assert metadata is not None  # (set by the planning round that was not a "resend")
                writer.finish_chunks(metadata, results)
            except BaseException as e:  # noqa: BLE001
                failed[rank] = _wrap(e)
        if failed:
            outcome = CheckpointException("write", failed)
    if use_dist:
        box = [outcome]
        dist.broadcast_object_list(box, src=coordinator, group=group)
        outcome = box[0]
    if outcome is not None:
        raise outcome


def load_planned(state: dict, reader: LCStorageReader, planner: LoadPlanner, group: Any = None,
                 use_dist: bool = True) -> bool:
    """``dcp.load(state, storage_reader=reader, planner=planner, process_group=group)`` of a flat dict of tensors,
    without gathering every rank's local load plan to the coordinator and scattering it back: DCP's
    ``DefaultLoadPlanner`` plans no global step (``create_default_global_load_plan`` returns the plans unchanged), so
    each rank reads by its own plan (issue 22: 10,000 pickled ``ReadItem`` per rank, both ways, for nothing). The
    ranks still learn of each other's failures, as in DCP: one all-gather of each rank's planning outcome, one of
    its reading outcome; an error anywhere raises a ``CheckpointException`` on every rank. Returns False, having done
    nothing, for a planner with a global step of its own (the caller then uses ``dcp.load``)."""
    from torch.distributed.checkpoint import default_planner as dp
    from torch.distributed.checkpoint.api import CheckpointException

    probe: list = []
    if type(planner).create_global_plan is not dp.DefaultLoadPlanner.create_global_plan or \
            dp.create_default_global_load_plan(probe) is not probe:
        return False
    if use_dist:
        import torch.distributed as dist

        rank, world = dist.get_rank(group), dist.get_world_size(group)
    else:
        rank, world = 0, 1

    def everyone(step: str, outcome: Any) -> None:
        outcomes = [outcome]
        if use_dist:
            outcomes = [None] * world
            dist.all_gather_object(outcomes, outcome, group=group)
        failed = {r: o for r, o in enumerate(outcomes) if o is not None}
        if failed:
            raise CheckpointException(step, failed)

    plan: Any = None
    try:
        with torch.no_grad():
            metadata = reader.read_metadata()
            planner.set_up_planner(state, metadata, rank == 0)
            reader.set_up_storage_reader(metadata, rank == 0)
            plan = reader.prepare_local_plan(planner.create_local_plan())
            plan = planner.finish_plan(reader.prepare_global_plan(planner.create_global_plan([plan]))[0])
        outcome = None
    except BaseException as e:  # noqa: BLE001 - raised on every rank
        outcome = _wrap(e)
    everyone("plan", outcome)
    try:
        with torch.no_grad():  # (resolve_tensor: DTensor.to_local() per chunk; in the reader's threads it is not)
            reader.read_data(plan, planner).wait()
        outcome = None
    except BaseException as e:  # noqa: BLE001
        outcome = _wrap(e)
    everyone("read", outcome)
    return True


def _global_step(planner: SavePlanner, writer: LCStorageWriter, plans: list, cache: _PlanCache | None
                 ) -> tuple[list, Metadata | None]:
    """The coordinator's part of the planning: the replies to every rank (``("same", storage_data, token)``,
    ``("plan", plan, token)``, or ``("resend",)`` to all when a rank named by its token a plan this process does not
    hold) and the global metadata."""
    by_token = [p for p in plans if isinstance(p, tuple) and p and p[0] == "cached"]
    if by_token and (cache is None or cache.plans is None or any(p[1] != cache.token for p in by_token)):
        return [("resend",)] * len(plans), None
    full = [cache.plans[r] if isinstance(p, tuple) else p for r, p in enumerate(plans)]  # type: ignore[union-attr]
    if len(by_token) == len(plans):  # every local plan is the one planned last time: so are the global plans
        global_plans, metadata, token = cache.global_plans, cache.metadata, cache.token  # type: ignore[union-attr]
    else:
        global_plans, metadata = planner.create_global_plan(full)
        token = None
        if cache is not None:  # kept between saves only up to CACHE_MAX_ITEMS write items of all ranks together
            token = uuid.uuid4().hex if sum(len(p.items) for p in full) <= CACHE_MAX_ITEMS else None
            cache.planned(full, global_plans, metadata, token)
    prepared = writer.prepare_global_plan(global_plans)
    return [_plan_reply(g, p) + (token,) for g, p in zip(prepared, full)], metadata


CACHE_MAX_ITEMS = 1 << 17  # write items of all ranks together whose planning a writer keeps between saves


class _PlanCache:
    """The planning of the last save of one writer on one process group (``save_planned``'s ``cache_key``), in this
    process: as a rank, the local plan it sent and the token the coordinator answered; as the coordinator, every
    rank's local plan, the global plans and metadata, and the token naming them. A rank sends the token only when
    its new local plan equals (``WriteItem`` equality: chunks, sizes, dtype and the other tensor properties) the one
    it sent and its flattening map is the same; the coordinator takes it only when the token is its own, else every
    rank sends its plan again (one more gather and scatter, whatever the number of tensors). Only the last few
    writers' plans are kept, and only plans of at most ``CACHE_MAX_ITEMS`` write items over all ranks (about 1.5 KB
    each on the coordinator, which holds every rank's plan and the global plans between saves; beyond that every
    save plans afresh, as ``dcp.save`` does)."""

    KEEP = 4
    _all: OrderedDict = OrderedDict()
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.local: SavePlan | None = None  # (as a rank)
        self.local_token: str | None = None
        self.plans: list[SavePlan] | None = None  # (as the coordinator)
        self.global_plans: list[SavePlan] | None = None
        self.metadata: Metadata | None = None
        self.token: str | None = None

    @classmethod
    def get(cls, key: Any) -> _PlanCache | None:
        if key is None:
            return None
        with cls._lock:
            c = cls._all.pop(key, None) or cls()
            cls._all[key] = c
            while len(cls._all) > cls.KEEP:
                cls._all.popitem(last=False)
            return c

    def sent_token(self, local: SavePlan) -> str | None:
        old = self.local
        if (old is None or self.local_token is None or len(old.items) != len(local.items)
                or old.planner_data != local.planner_data or old.items != local.items):
            return None
        return self.local_token

    def sent(self, local: SavePlan, token: str | None) -> None:
        self.local, self.local_token = (local, token) if token is not None else (None, None)

    def planned(self, plans: list, global_plans: list, metadata: Metadata, token: str | None) -> None:
        if token is None:  # too large to keep: planned afresh at every save, as without the cache
            plans, global_plans, metadata = None, None, None  # type: ignore[assignment]
        self.plans, self.global_plans, self.metadata, self.token = plans, global_plans, metadata, token


def forget_plans(cache_key: Any) -> None:
    """Drop the planning kept for ``cache_key`` (a writer's id) on any process group: the writer closed."""
    with _PlanCache._lock:
        for key in [k for k in _PlanCache._all if k[0] == cache_key]:
            del _PlanCache._all[key]


def _plan_reply(global_plan: SavePlan, local_plan: SavePlan) -> tuple:
    """What the coordinator sends a rank back: ``("same", storage_data)`` when its global plan writes exactly the chunks
    of the local plan it sent, in the same order and alike (DCP only rewrote index hints), else ``("plan", plan)``."""
    g, loc = global_plan.items, local_plan.items
    same = (len(g) == len(loc) and global_plan.planner_data is local_plan.planner_data
            and all(a.type == b.type and a.index.fqn == b.index.fqn and a.index.offset == b.index.offset
                    and (a.tensor_data is b.tensor_data or a.tensor_data == b.tensor_data) for a, b in zip(g, loc)))
    return ("same", global_plan.storage_data) if same else ("plan", global_plan)


def _wrap(e: BaseException) -> tuple:
    """An exception as DCP carries it between ranks (``CheckpointException.failures``): (exception, traceback
    summary), the summary rebuilt from plain tuples so that it pickles whatever the Python version."""
    return (e, traceback.StackSummary.from_list(
        [(f.filename, f.lineno, f.name, f.line) for f in traceback.extract_tb(e.__traceback__)]))


def _is_wrapped(obj: Any) -> bool:
    return isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], BaseException) and isinstance(
        obj[1], traceback.StackSummary)
