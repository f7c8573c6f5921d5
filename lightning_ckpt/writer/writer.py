"""The checkpoint writer: snapshot, persist (sync or in the background), commit. No Lightning imports.

One save is a transaction of the folder's ``LocalStore`` (see ``store/local.py`` for the commit protocol): every rank
writes its files into the same partial folder through DCP (``dcp.LCStorageWriter``), then the folder's leader commits
it (manifest last, rename) and publishes ``latest.json``. A crash at any point leaves the previous checkpoints and
either no new one or a complete one; leftover partial folders are never listed and are removed by the next run.

The writer holds the settings, the save in flight and what finished saves left; the parts it puts together each own
one responsibility: ``topology.py`` (which ranks save together, and their collectives; ``folders.py`` finds node-local
folders), ``steps.py`` (the training thread's select, plan and snapshot), ``job.py`` (one save's write and commit, given
its dependencies), ``pending.py`` (the handle: seal, abandon, merge, wait).
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Literal

import torch.distributed as dist

from ..dcp import is_model_or_optim
from ..dcp.planned import forget_plans
from ..errors import CheckpointError, CheckpointWriteError
from ..format.gcpause import pausing
from ..format.views import DenseMemo
from ..policy.enums import COVERS, Kind
from ..store.base import owner_token
from ..store.local import LocalStore, check_writable_dir
from . import steps
from .dedup import Deduper
from .folders import detect
from .job import JobDeps, SaveJob
from .meta import background_priority, manifest_header
from .options import check_bool, check_choice, check_seconds, format_name, validate_name_template
from .pending import Abandoned, PendingSave, SaveResult
from .snapshot import HostBuffers
from .steps import Roles
from .topology import Topology, join

log = logging.getLogger("lightning_ckpt")

IfBusy = Literal["wait", "skip"]

# which content satisfies which request: a full checkpoint also serves as a weights one


@dataclass(frozen=True)
class BufferStats:
    """The host buffers of a writer's background snapshots (:meth:`CheckpointWriter.buffer_stats`)."""

    allocations: int  # buffers allocated so far, in total
    tensors: int  # tensors that hold a buffer now


class CheckpointWriter:
    """Writes checkpoints of a state dictionary into ``dirpath``.

    Args:
        dirpath: folder that holds the checkpoints of a run (created if missing).
        async_save: persist in a background thread after a snapshot into reused host buffers.
        name_template: folder name of each checkpoint; fields ``{step}`` and ``{epoch}``.
        if_busy: when a save is requested while the previous one is still being written: ``"wait"`` for it, or
            ``"skip"`` the new one.
        fsync: make files durable before the commit (turn off only for throwaway runs).
        auto_seal: commit each save as soon as its files are written. With ``False`` the commit waits for
            :meth:`seal` (the callbacks seal at the next step boundary, so that every callback that wants the
            same step adds its tags to one checkpoint); files are still written right away.
        mode: with several ranks, ``"sharded"`` (every rank writes its share: replicated tensors are split across
            ranks so each writes about 1/N, sharded ones are written by their owners) or ``"rank0"`` (rank 0 writes
            everything, the others only take part in the commit).
        timeout_s: with several ranks, how long a save may wait for the others before every rank fails with a
            clear error (a dead or stuck rank never hangs the run).
        process_group: group for the save's collectives; by default a dedicated gloo group is created (so saves
            can run in background threads next to training's NCCL collectives). All ranks must create the writer.
        dedup: share unchanged tensor bytes between checkpoints of the folder through its content store
            (``.blobs/``, see ``writer/dedup.py``): tensors named ``stable`` in :meth:`save` and tensors unchanged
            since the previous save are written once and referenced afterwards. ``False`` keeps every checkpoint
            folder self-contained. (Not with node-local folders, where every folder is a whole copy anyway.)
        alone: write and commit every save in this process alone, nothing collective, even under a process group
            (Fabric saves on rank 0 only); the state must be whole here.
    """

    def __init__(
        self,
        dirpath: str,
        *,
        async_save: bool = True,
        name_template: str = "step={step:06d}",
        if_busy: IfBusy = "wait",
        fsync: bool = True,
        auto_seal: bool = True,
        mode: Literal["sharded", "rank0"] = "sharded",
        timeout_s: float = 600.0,
        process_group: Any = None,
        dedup: bool = True,
        alone: bool = False,
    ) -> None:
        check_choice("if_busy", if_busy, ("wait", "skip"))
        # settings
        self.mode = check_choice("mode", mode, ("sharded", "rank0"), "every rank writes its share, or rank 0 all")
        self.timeout_s = check_seconds("timeout_s", timeout_s)
        self.async_save = check_bool("async_save", async_save)
        self.name_template = validate_name_template(name_template)
        self.if_busy = if_busy
        self.fsync = fsync
        self.auto_seal = auto_seal
        self.dedup_enabled = check_bool("dedup", dedup)
        # record each content-store tensor's XXH3-128 (its identity); benchmarks turn it off to measure its cost
        self.content_hash = True
        # where this rank stands (writer/topology.py), and the save's identity, the same on every rank (rank 0's)
        self.topology: Topology = join(process_group, self.timeout_s, alone)
        self._given_pg = process_group is not None
        self.writer_id, self.owner = uuid.uuid4().hex[:8], owner_token()
        if self.topology.world_size > 1:
            self.writer_id, self.owner = self.topology.broadcast((self.writer_id, self.owner))
        self._seq = 0
        # the folder and what saves into it
        self.dirpath = os.path.abspath(os.fspath(dirpath))
        self.store = LocalStore(self.dirpath, fsync=fsync)
        self.dedup: Deduper | None = (
            Deduper(self.dirpath, fsync=fsync, is_shared=is_model_or_optim) if self.dedup_enabled else None)
        # the training thread's snapshot: host buffers reused across saves, codec.encode's memory of the state's
        # structure (same key_fn at every save), dense_views' memory of the state's tensors (format/views.DenseMemo)
        self._buffers = HostBuffers()
        self._encoded: dict = {}
        self._dense = DenseMemo()
        self._key_fn = None
        if self.topology.world_size > 1:
            # model and optimizer tensors are the same on every rank (DDP) or sharded (FSDP); anything else (RNG
            # states, callback tensors) is this rank's own and must not be deduplicated against the other ranks'
            prefix = f"rank{self.topology.rank:05d}/"
            self._key_fn = lambda k: k if is_model_or_optim(k) else prefix + k  # noqa: E731
        # the background threads: the save's write and commit, and the checksums
        self._executor = (
            cf.ThreadPoolExecutor(1, thread_name_prefix="lightning_ckpt-writer", initializer=background_priority)
            if self.async_save else None
        )
        self._crc_pool = cf.ThreadPoolExecutor(
            1, thread_name_prefix="lightning_ckpt-crc", initializer=background_priority if self.async_save else None
        )
        # the save in flight, and what the finished ones left
        self._inflight: PendingSave | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self.last_result: SaveResult | None = None
        self.history: list[SaveResult] = []
        self.committed_names: set[str] = set()
        self.on_commit: list = []  # callables(SaveResult), run in the committing thread after latest.json

    # ----------------------------------------------------------------- topology (read-only views of self.topology)
    @property
    def rank(self) -> int:
        return self.topology.rank

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    @property
    def pg(self) -> Any:
        """The process group of the save's collectives (None alone)."""
        return self.topology.group

    @property
    def folder_ranks(self) -> tuple[int, ...]:
        return self.topology.folder_ranks

    @property
    def folder_pg(self) -> Any:
        return self.topology.folder_group

    @property
    def node_local(self) -> bool:
        return self.topology.node_local

    @property
    def every_folder(self) -> bool:
        return self.topology.every_folder

    @property
    def is_leader(self) -> bool:
        """This rank commits its folder (rank 0, or the lowest rank of a node-local folder)."""
        return self.topology.is_leader

    @property
    def folder_written(self) -> bool:
        return self.topology.folder_written

    # ----------------------------------------------------------------- public
    def prepare_dir(self) -> None:
        """Create ``dirpath`` and check it is a writable folder; raise a clear error otherwise."""
        check_writable_dir(self.dirpath)

    def detect_folders(self, every_folder: bool = True) -> None:
        """Collective (every rank calls it once, before the first save): find out which ranks see the same
        ``dirpath``, through probe files (see below).

        When every rank sees one folder (a single node, or a shared filesystem), nothing changes: each rank writes
        its share and rank 0 commits. When the ranks see different folders (a node-local disk on each node, say
        ``--nnodes 2`` with a local ``dirpath``), each folder becomes a whole checkpoint of its own: the replicated
        (DDP) state is split across that folder's ranks, every rank's own state (RNG, loader position) is copied into
        every folder, and the lowest rank of each folder commits it once every rank of every folder has written its
        part. A lost node then loses no checkpoint, and any folder resumes the run at any world size.
        With ``every_folder=False`` (the local staging folders of an ``s3://`` dirpath) only rank 0's folder is
        written; the other ranks hand it their own state."""
        self.topology = detect(self.store, self.topology, self.writer_id, every_folder)
        if self.topology.node_local and self.dedup is not None:  # every folder holds a whole copy anyway
            self.dedup.close()
            self.dedup = None

    def agree(self, error: str | None) -> str | None:
        """Collective over the writer's ranks: the first rank's error, if any rank had one (else None)."""
        return self.topology.agree(error)

    @property
    def pending(self) -> PendingSave | None:
        """The save not yet committed, if any."""
        p = self._inflight
        return p if p is not None and not p.done() else None

    def buffer_stats(self) -> BufferStats:
        """How many host buffers the background snapshots allocated so far, and for how many tensors they hold one
        now (equal when every save reused them)."""
        return BufferStats(allocations=self._buffers.allocations, tensors=len(self._buffers._buffers))

    def merge(self, step: int, tags: Iterable[str] = (), metrics: dict | None = None, kind: str = Kind.FULL.value) -> bool:
        """Add ``tags``/``metrics`` to the uncommitted save of ``step`` if it has content that covers ``kind``.
        Returns False (nothing merged) otherwise."""
        p = self.pending
        if p is None or p.step != int(step) or kind not in COVERS.get(p.kind, ()):
            return False
        return p.add(tags, metrics)

    @pausing
    def save(
        self,
        state: dict,
        *,
        step: int,
        epoch: int | None = None,
        tags: Iterable[str] = (),
        metrics: dict | None = None,
        hparams: Any = None,
        meta: dict | None = None,
        kind: str = Kind.FULL.value,
        if_busy: IfBusy | None = None,
        sync: bool = False,
        stable: Iterable[str] = (),
        name: str | None = None,
    ) -> PendingSave | None:
        """Save ``state``. Returns a handle, or ``None`` if skipped because the previous save is still writing.
        ``if_busy`` overrides the writer's setting for this save (say ``"wait"`` for the last save of a run).
        ``sync``: write this save's files before returning, even when the writer saves in the background (its commit
        then happens when it is sealed, in the caller's thread).
        ``stable``: flat keys of tensors expected to stay unchanged (frozen parameters, buffers: ``state_dict/<name>``);
        with ``dedup`` they are written once into the folder's content store and referenced by later checkpoints.
        ``name``: the folder name instead of ``name_template``'s (plain; if taken, committed as ``name-v2``).

        Raises the error of an earlier background save, if there was one, before starting.
        """
        self.raise_if_failed()
        if (if_busy or self.if_busy) == "skip" and self.writing_sealed:
            log.warning("lightning_ckpt: save at step %s skipped: the previous save is still being written", step)
            return None
        self._wait_inflight()
        self.raise_if_failed()
        t0 = time.perf_counter()
        # the training thread's part, in three steps (writer/steps.py): select, plan, snapshot
        topo, inline = self.topology, self._executor is None or sync
        roles = Roles.of(topo, self.mode)
        self._dense.signatures = self.dedup is not None and not inline  # (read for Deduper.observe, see steps.plan)
        doc, tensors = steps.select(state, topo, roles, key_fn=self._key_fn, cache=self._encoded, memo=self._dense,
                                    where=self.dirpath)
        sel, rest, plan = steps.plan(tensors, topo, buffers=None if inline else self._buffers, dedup=self.dedup,
                                     stable=stable)
        tensors, state_bytes, handoff = steps.snapshot(doc, tensors, sel, rest, topo, roles, buffers=self._buffers)
        snapshot_s = time.perf_counter() - t0
        # then the job: written and committed in the background (or here, inline), driven by its PendingSave
        name = name if name is not None else format_name(self.name_template, step, epoch, metrics)
        self._seq += 1
        header = manifest_header(step=step, epoch=epoch, tags=tags, metrics=metrics, hparams=hparams, meta=meta,
                                 kind=kind, save_id=f"{self.writer_id}-{self._seq}", world_size=topo.world_size,
                                 mode=self.mode)
        job = SaveJob(self._deps(), name=name, tensors=tensors, state_bytes=state_bytes, header=header,
                      snapshot_s=snapshot_s, sealed=self.auto_seal, seq=self._seq, handoff=handoff, plan=plan)
        pending = PendingSave.start(job, int(step), None if inline else self._executor)
        self._inflight = pending
        if pending.inline and pending.done():
            self._collect(pending)
        return pending

    def _deps(self) -> JobDeps:
        """What a save job is given of this writer (its settings as they are now: benchmarks turn content_hash
        off, folder detection turns deduplication off)."""
        return JobDeps(topology=self.topology, store=self.store, writer_id=self.writer_id, owner=self.owner,
                       crc_pool=self._crc_pool, dedup=self.dedup, content_hash=self.content_hash,
                       on_commit=self.on_commit, committed_names=self.committed_names)

    def seal(self) -> None:
        """Let the pending save commit (sync mode: commit it now)."""
        p = self._inflight
        if p is not None and p.seal():  # committed here, inline
            self._collect(p)

    def wait(self) -> SaveResult | None:
        """Seal and wait until the in-flight save (if any) is committed; raise its error if it failed."""
        self._wait_inflight()
        self.raise_if_failed()
        return self.last_result

    def raise_if_failed(self) -> None:
        with self._lock:
            err, self._error = self._error, None
        if err is not None:
            if isinstance(err, CheckpointError):
                raise err
            raise CheckpointWriteError(f"an earlier checkpoint save failed: {err!r}; earlier checkpoints are intact") from err

    def close(self) -> None:
        try:
            self._wait_inflight()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            self._crc_pool.shutdown(wait=True)
            self._buffers.clear(background=True)
            forget_plans(self.writer_id)  # (the sharded saves' planning kept between saves, dcp/planned.py)
            if self.dedup is not None:
                self.dedup.close()
            self._destroy_groups()

    def _destroy_groups(self) -> None:
        """Shut down the process groups this writer created, so that their threads are joined now rather than at
        interpreter exit (where a gloo group left alive can abort the process)."""
        topo = self.topology
        groups = [g for g in (topo.folder_group, None if self._given_pg else topo.group) if g is not None]
        self.topology = dataclasses.replace(topo, folder_group=None, group=topo.group if self._given_pg else None)
        for g in groups:
            try:
                if dist.is_initialized():
                    dist.destroy_process_group(g)
            except Exception as e:  # noqa: BLE001 - best effort at shutdown
                log.debug("lightning_ckpt: could not destroy a process group: %r", e)

    def abandon(self) -> None:
        """Drop an uncommitted save (its partial folder is removed); used when training failed before its step ended."""
        p = self._inflight
        if p is None or p.sealed:
            return
        if p.abandon():  # dropped here, inline
            self._collect(p)
        self._wait_inflight()

    @property
    def busy(self) -> bool:
        return self._inflight is not None and not self._inflight.done()

    @property
    def writing_sealed(self) -> bool:
        """A sealed save is still being written: with ``if_busy="skip"`` the next save is skipped."""
        return self.busy and self._inflight.sealed

    # ----------------------------------------------------------------- internals
    def _wait_inflight(self) -> None:
        p = self._inflight
        if p is None:
            return
        self.seal()
        p.wait()
        self._collect(p)

    def _collect(self, p: PendingSave) -> None:
        if self._inflight is p:
            self._inflight = None
        exc = p.error()
        if exc is not None:
            if isinstance(exc, Abandoned):
                return
            with self._lock:
                if self._error is None:
                    self._error = exc
            if p.inline:
                self.raise_if_failed()
        else:
            res = p.result()
            if res is not None and (not self.history or self.history[-1] is not res):
                self.last_result = res
                self.history.append(res)


def cleanup_partials(dirpath: str) -> list[str]:
    """Remove what interrupted saves and deletions left in ``dirpath`` (partial folders, trash, temp files), for the
    process that alone writes there (it holds the folder's lock). Returns what was removed."""
    return LocalStore(dirpath).cleanup(everyone=True)
