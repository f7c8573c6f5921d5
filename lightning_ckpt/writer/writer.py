"""The checkpoint writer: snapshot, persist (sync or in the background), commit. No Lightning imports.

One save is a transaction of the folder's ``LocalStore`` (see ``store/local.py`` for the commit protocol): every rank
writes its files into the same partial folder through DCP (``dcp.LCStorageWriter``), then the folder's leader commits
it (manifest last, rename) and publishes ``latest.json``. A crash at any point leaves the previous checkpoints and
either no new one or a complete one; leftover partial folders are never listed and are removed by the next run.
The module is one cohesive object (the writer's save, seal and commit states), a little over 400 lines.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import threading
import time
import uuid
from datetime import timedelta
from typing import Any, Iterable, Literal

import torch.distributed as dist

from ..dcp import is_model_or_optim
from ..errors import CheckpointError, CheckpointWriteError
from ..format.codec import encode, warn_unsupported
from ..format.gcpause import pausing
from ..store.base import owner_token
from ..store.local import LocalStore, check_writable_dir
from .folders import _packed, split_by_folder
from .job import PendingSave, SaveJob, SaveResult, _Abandoned
from .meta import StateDoc, background_priority, manifest_header, state_bytes_of
from .dedup import Deduper
from .elastic import warn_restart_store
from .options import check_bool, check_choice, check_seconds, format_name, validate_name_template
from .snapshot import HostBuffers, _as_dtensor, _is_sharded_tensor, dense_views

log = logging.getLogger("lightning_ckpt")

IfBusy = Literal["wait", "skip"]

# which content satisfies which request: a full checkpoint also serves as a weights one
_CONTENT_COVERS = {"full": {"full", "weights", "light"}, "weights": {"weights", "light"}, "light": {"light"}, "partial": set()}


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
        self.mode = check_choice("mode", mode, ("sharded", "rank0"), "every rank writes its share, or rank 0 all")
        self.timeout_s = check_seconds("timeout_s", timeout_s)
        self.rank, self.world_size, self.pg = 0, 1, None
        self._given_pg = process_group is not None
        self.writer_id = uuid.uuid4().hex[:8]
        self.owner = owner_token()  # rank 0's: every rank's files of one save go into one partial folder
        self._seq = 0
        if not alone and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            self.pg = process_group if process_group is not None else dist.new_group(
                backend="gloo", timeout=timedelta(seconds=self.timeout_s)
            )
            ids = [(self.writer_id, self.owner)]
            dist.broadcast_object_list(ids, src=dist.get_global_rank(self.pg, 0) if process_group is not None else 0, group=self.pg)
            self.writer_id, self.owner = ids[0]
            warn_restart_store(self.rank)  # torchrun --max-restarts with the agent's shared store (writer/elastic.py)
        # Which ranks see the same folder (see detect_folders): all of them unless the folder is node-local.
        self.folder_ranks: tuple[int, ...] = tuple(range(self.world_size))
        self.node_local = False
        self.folder_pg: Any = None  # the process group of this folder's ranks, when node-local
        self.every_folder = True  # node-local: every folder gets a whole copy; False: only rank 0's folder is written
        self.dirpath = os.path.abspath(os.fspath(dirpath))
        self.store = LocalStore(self.dirpath, fsync=fsync)
        self.async_save = check_bool("async_save", async_save)
        self.name_template = validate_name_template(name_template)
        self.if_busy = if_busy
        self.fsync = fsync
        self.auto_seal = auto_seal
        self._buffers = HostBuffers()
        self._executor = (
            cf.ThreadPoolExecutor(1, thread_name_prefix="lightning_ckpt-writer", initializer=background_priority)
            if self.async_save else None
        )
        self._crc_pool = cf.ThreadPoolExecutor(
            1, thread_name_prefix="lightning_ckpt-crc", initializer=background_priority if self.async_save else None
        )
        self._inflight: PendingSave | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self.last_result: SaveResult | None = None
        self.history: list[SaveResult] = []
        self.committed_names: set[str] = set()
        self.on_commit: list = []  # callables(SaveResult), run in the committing thread after latest.json
        self.dedup_enabled = check_bool("dedup", dedup)
        # record the XXH3-128 of each tensor written into the content store (its identity); benchmarks turn it off
        # to measure what it costs
        self.content_hash = True
        self.dedup: Deduper | None = (
            Deduper(self.dirpath, fsync=fsync, is_shared=is_model_or_optim) if self.dedup_enabled else None)

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
        self.every_folder = bool(every_folder)
        if self.world_size > 1:
            split_by_folder(self)

    def agree(self, error: str | None) -> str | None:
        """Collective over the writer's ranks: the first rank's error, if any rank had one (else None)."""
        if self.world_size == 1:
            return error
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, error, group=self.pg)
        return next((e for e in everyone if e is not None), None)

    @property
    def is_leader(self) -> bool:
        """This rank commits its folder (rank 0, or the lowest rank of a node-local folder)."""
        return self.rank == self.folder_ranks[0] if self.node_local else self.rank == 0

    @property
    def folder_written(self) -> bool:
        return not self.node_local or self.every_folder or 0 in self.folder_ranks

    @property
    def pending(self) -> PendingSave | None:
        """The save not yet committed, if any."""
        p = self._inflight
        return p if p is not None and not p.done() else None

    def merge(self, step: int, tags: Iterable[str] = (), metrics: dict | None = None, kind: str = "full") -> bool:
        """Add ``tags``/``metrics`` to the uncommitted save of ``step`` if it has content that covers ``kind``.
        Returns False (nothing merged) otherwise."""
        p = self.pending
        if p is None or p.step != int(step) or kind not in _CONTENT_COVERS.get(p.kind, set()):
            return False
        return p._job.add(tags, metrics)

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
        kind: str = "full",
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
        key_fn = None
        if self.world_size > 1:
            # model and optimizer tensors are the same on every rank (DDP) or sharded (FSDP); anything else (RNG
            # states, callback tensors) is this rank's own and must not be deduplicated against the other ranks'
            prefix = f"rank{self.rank:05d}/"
            key_fn = lambda k: k if is_model_or_optim(k) else prefix + k  # noqa: E731
        doc, tensors = encode(state, on_unsupported=warn_unsupported, key_fn=key_fn)
        tensors = dense_views(tensors)  # conjugate/negative views resolved, nested tensors refused: in every mode
        if self.node_local and any(_as_dtensor(v) is not None or _is_sharded_tensor(v) for v in tensors.values()):
            raise CheckpointWriteError(
                f"{self.dirpath} is local to each node, but this model's state is sharded across ranks (FSDP or "
                "tensor parallel): a node's folder cannot hold a whole checkpoint. Save to a folder every rank shares "
                "(a shared filesystem) or to an s3:// dirpath."
            )
        # rank0 mode: rank 0 (node-local: each folder's lowest rank) writes the model and optimizer; the other ranks'
        # own state (RNG, loader position) is kept only in sharded mode
        own_kept = self.mode == "sharded" or self.rank == 0
        writes_shared = self.folder_written and (self.mode == "sharded" or self.is_leader)
        writes_own = own_kept and self.folder_written
        if not (writes_shared and own_kept):  # (both: every tensor is kept, no per-tensor filter)
            tensors = {
                k: v for k, v in tensors.items()
                if (writes_shared if is_model_or_optim(k) else own_kept)
            }
        plan = None
        if self.dedup is not None and self.folder_written:
            if self.is_leader:
                plan = self.dedup.plan(tensors, stable)
                skip = set(plan.reuse)
            else:
                skip = self.dedup.follower_plan(tensors)
                plan = self.dedup.plan(tensors, (), leader=False)
            if skip:  # unchanged and already stored: not even snapshotted
                tensors = {k: v for k, v in tensors.items() if k not in skip}
        inline = self._executor is None or sync
        if not inline:
            tensors = self._buffers.snapshot(tensors)
        else:
            tensors = {k: v.detach() for k, v in tensors.items()}  # DCP copies device tensors to host as it writes
        # the document is the writer's own (new containers, immutable leaves): a background save encodes it (StateDoc)
        state_bytes = (StateDoc(doc) if not inline and not self.node_local else state_bytes_of(doc)) if own_kept else None
        handoff = None
        if self.node_local:  # this rank's own state, for the folders of the other nodes (see detect_folders)
            handoff = None if not own_kept else (
                {k: _packed(v) for k, v in tensors.items() if not is_model_or_optim(k)}, state_bytes)
        if not writes_own:
            tensors = {k: v for k, v in tensors.items() if is_model_or_optim(k)}
            state_bytes = None
        snapshot_s = time.perf_counter() - t0
        name = name if name is not None else format_name(self.name_template, step, epoch, metrics)
        self._seq += 1
        job = SaveJob(
            writer=self,
            name=name,
            tensors=tensors,
            state_bytes=state_bytes,
            header=manifest_header(step=step, epoch=epoch, tags=tags, metrics=metrics, hparams=hparams, meta=meta,
                                   kind=kind, save_id=f"{self.writer_id}-{self._seq}", world_size=self.world_size,
                                   mode=self.mode),
            snapshot_s=snapshot_s,
            sealed=self.auto_seal,
            seq=self._seq,
            handoff=handoff,
            plan=plan,
        )
        job.inline = inline
        if not inline:
            fut = self._executor.submit(job.run_logged)
        else:
            fut = cf.Future()
            try:
                job.write()
                if job.sealed.is_set():
                    fut.set_result(job.commit())
            except BaseException as e:  # noqa: BLE001 - re-raised right below for sync saves
                fut.set_exception(e)
        pending = PendingSave(job, fut, int(step))
        self._inflight = pending
        job.future = fut
        if inline and fut.done():
            self._collect(pending)
        return pending

    def seal(self) -> None:
        """Let the pending save commit (sync mode: commit it now)."""
        p = self._inflight
        if p is None or p._job.sealed.is_set():
            return
        p._job.sealed.set()
        if p._job.inline and not p._future.done():
            try:
                p._future.set_result(p._job.commit())
            except BaseException as e:  # noqa: BLE001
                p._future.set_exception(e)
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
            if self.dedup is not None:
                self.dedup.close()
            self._destroy_groups()

    def _destroy_groups(self) -> None:
        """Shut down the process groups this writer created, so that their threads are joined now rather than at
        interpreter exit (where a gloo group left alive can abort the process)."""
        groups = [g for g in (self.folder_pg, None if self._given_pg else self.pg) if g is not None]
        self.folder_pg = None
        if not self._given_pg:
            self.pg = None
        for g in groups:
            try:
                if dist.is_initialized():
                    dist.destroy_process_group(g)
            except Exception as e:  # noqa: BLE001 - best effort at shutdown
                log.debug("lightning_ckpt: could not destroy a process group: %r", e)

    def abandon(self) -> None:
        """Drop an uncommitted save (its partial folder is removed); used when training failed before its step ended."""
        p = self._inflight
        if p is None or p._job.sealed.is_set():
            return
        p._job.abandoned = True
        self.seal()
        self._wait_inflight()

    @property
    def busy(self) -> bool:
        return self._inflight is not None and not self._inflight.done()

    @property
    def writing_sealed(self) -> bool:
        """A sealed save is still being written: with ``if_busy="skip"`` the next save is skipped."""
        return self.busy and self._inflight._job.sealed.is_set()

    # ----------------------------------------------------------------- internals
    def _wait_inflight(self) -> None:
        p = self._inflight
        if p is None:
            return
        self.seal()
        cf.wait([p._future])
        self._collect(p)

    def _collect(self, p: PendingSave) -> None:
        if self._inflight is p:
            self._inflight = None
        exc = p._future.exception()
        if exc is not None:
            if isinstance(exc, _Abandoned):
                return
            with self._lock:
                if self._error is None:
                    self._error = exc
            if p._job.inline:
                self.raise_if_failed()
        else:
            res = p._future.result()
            if res is not None and (not self.history or self.history[-1] is not res):
                self.last_result = res
                self.history.append(res)


def cleanup_partials(dirpath: str) -> list[str]:
    """Remove what interrupted saves and deletions left in ``dirpath`` (partial folders, trash, temp files), for the
    process that alone writes there (it holds the folder's lock). Returns what was removed."""
    return LocalStore(dirpath).cleanup(everyone=True)
