"""The checkpoint writer: snapshot, persist (sync or in the background), commit. No Lightning imports.

Commit protocol (see ``../shared/DESIGN.md``): shards and state are written and fsynced into
``<dirpath>/.partial-<name>-<id>/``; the coordinator writes ``manifest.json`` last and fsyncs it, renames the folder
to ``<dirpath>/<name>``, fsyncs ``<dirpath>``, then replaces ``latest.json`` atomically. A crash at any point leaves
the previous checkpoints and either no new one or a complete one; leftover partial folders are never listed and are
removed by ``cleanup_partials``.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
import platform
import socket
import string
import subprocess
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from datetime import timedelta
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from ..errors import CheckpointError, CheckpointWriteError
from ..format import manifest as mf
from ..format.codec import encode, warn_unsupported
from ..format.tensorfile import byte_view, dtype_from_name, dtype_name
from ..storage.local import atomic_write_bytes, fsync_dir, remove_tree
from .dcp_storage import LCStorageWriter, _FileResult, is_model_or_optim, unwrap_dcp_error
from .snapshot import HostBuffers, _as_dtensor, _is_sharded_tensor

log = logging.getLogger("lightning_ckpt")

IfBusy = Literal["wait", "skip"]


def validate_name_template(template: str) -> str:
    """A template must produce a plain folder name from ``step`` and ``epoch``."""
    if not isinstance(template, str) or not template:
        raise ValueError(f"name_template={template!r} is invalid: give a format string such as 'step={{step:06d}}'")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}
        sample = template.format(step=123, epoch=4)
    except (ValueError, KeyError, IndexError) as e:
        raise ValueError(
            f"name_template={template!r} is invalid ({e}); it may use only the fields {{step}} and {{epoch}}, "
            "for example 'step={step:06d}' or 'epoch={epoch}-step={step}'"
        ) from None
    if "step" not in fields and "epoch" not in fields or not fields <= {"step", "epoch"}:
        raise ValueError(
            f"name_template={template!r} is invalid: it must contain {{step}} (or {{epoch}}) and no other fields"
        )
    try:
        mf.check_member_name(sample, "name_template")
    except CheckpointError:
        raise ValueError(
            f"name_template={template!r} gives the folder name {sample!r}; names must be plain (letters, digits, "
            "'_.=+@,-'), must not start with '.', and must not contain '/'"
        ) from None
    return template


def _git_commit(cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
        if out.returncode == 0:
            commit = out.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=cwd, capture_output=True, text=True, timeout=5)
            return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


_RUN_INFO: dict | None = None


def run_info() -> dict:
    """Metadata about the process that writes checkpoints; computed once."""
    global _RUN_INFO
    if _RUN_INFO is None:
        versions = {"python": platform.python_version(), "torch": torch.__version__}
        for mod in ("lightning", "numpy", "safetensors"):
            m = sys.modules.get(mod)
            if m is not None and hasattr(m, "__version__"):
                versions[mod] = m.__version__
        from .. import __version__

        versions["lightning_ckpt"] = __version__
        _RUN_INFO = {
            "versions": versions,
            "git_commit": _git_commit(),
            "host": socket.gethostname(),
            "platform": platform.platform(),
            "argv": list(sys.argv),
            "cwd": os.getcwd(),
        }
    info = dict(_RUN_INFO)
    info["pid"] = os.getpid()
    info["seed"] = os.environ.get("PL_GLOBAL_SEED")
    return info


@dataclass
class SaveResult:
    """What a finished save produced."""

    name: str
    path: str
    step: int
    bytes: int
    snapshot_s: float
    write_s: float
    tags: list[str] = field(default_factory=list)
    kind: str = "full"
    metrics: dict = field(default_factory=dict)


class PendingSave:
    """Handle of a save. ``result()`` waits for the commit and returns a :class:`SaveResult` or raises.

    Until the save is committed, :meth:`CheckpointWriter.merge` can add tags and metrics to it (several callbacks
    asking for the same step get one checkpoint with all their tags).
    """

    def __init__(self, job: "_SaveJob", future: cf.Future, step: int) -> None:
        self._job = job
        self._future = future
        self.step = step

    @property
    def kind(self) -> str:
        return self._job.header["kind"]

    @property
    def tags(self) -> list[str]:
        return sorted(self._job.tags)

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> SaveResult:
        return self._future.result(timeout)


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
    ) -> None:
        if if_busy not in ("wait", "skip"):
            raise ValueError(f"if_busy={if_busy!r} is invalid; use 'wait' or 'skip'")
        if mode not in ("sharded", "rank0"):
            raise ValueError(f"mode={mode!r} is invalid; use 'sharded' (every rank writes its share) or 'rank0'")
        if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s!r} is invalid; it must be a positive number of seconds")
        self.mode = mode
        self.timeout_s = float(timeout_s)
        self.rank, self.world_size, self.pg = 0, 1, None
        self._given_pg = process_group is not None
        self.writer_id = uuid.uuid4().hex[:8]
        self._seq = 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            self.pg = process_group if process_group is not None else dist.new_group(
                backend="gloo", timeout=timedelta(seconds=self.timeout_s)
            )
            ids = [self.writer_id]
            dist.broadcast_object_list(ids, src=dist.get_global_rank(self.pg, 0) if process_group is not None else 0, group=self.pg)
            self.writer_id = ids[0]
        # Which ranks see the same folder (see detect_folders): all of them unless the folder is node-local.
        self.folder_ranks: tuple[int, ...] = tuple(range(self.world_size))
        self.node_local = False
        self.folder_pg: Any = None  # the process group of this folder's ranks, when node-local
        self.every_folder = True  # node-local: every folder gets a whole copy; False: only rank 0's folder is written
        self.dirpath = os.path.abspath(os.fspath(dirpath))
        self.async_save = bool(async_save)
        self.name_template = validate_name_template(name_template)
        self.if_busy = if_busy
        self.fsync = fsync
        self.auto_seal = auto_seal
        self._buffers = HostBuffers()
        self._executor = (
            cf.ThreadPoolExecutor(1, thread_name_prefix="lightning_ckpt-writer", initializer=_background_priority)
            if self.async_save else None
        )
        self._crc_pool = cf.ThreadPoolExecutor(
            1, thread_name_prefix="lightning_ckpt-crc", initializer=_background_priority if self.async_save else None
        )
        self._inflight: PendingSave | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self.last_result: SaveResult | None = None
        self.history: list[SaveResult] = []
        self.committed_names: set[str] = set()
        self.on_commit: list = []  # callables(SaveResult), run in the committing thread after latest.json

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
        if self.world_size == 1:
            return
        os.makedirs(self.dirpath, exist_ok=True)
        # In rounds: the lowest rank not yet placed leaves a probe file; the ranks that see it share its folder. One
        # round on a shared filesystem, one per node for node-local disks. Each rank looks up one name per round
        # (by name rather than listing: a shared filesystem such as NFS may serve a cached listing of the folder).
        leader_of: dict[int, int] = {}
        while len(leader_of) < self.world_size:
            leader = min(r for r in range(self.world_size) if r not in leader_of)
            probe = os.path.join(self.dirpath, f".probe-node-{self.writer_id}-{leader}")
            if self.rank == leader:
                with open(probe, "wb"):
                    pass
            dist.barrier(group=self.pg)
            sees = self.rank not in leader_of and os.path.exists(probe)
            flags: list = [None] * self.world_size
            dist.all_gather_object(flags, sees, group=self.pg)
            if self.rank == leader:
                try:
                    os.unlink(probe)  # every rank has looked by now
                except OSError:
                    pass
            if not flags[leader]:
                raise CheckpointWriteError(
                    f"rank {leader} cannot see the file it just created in the checkpoint folder {self.dirpath}; "
                    "use a folder on a filesystem that shows a file to the process that created it"
                )
            for r, seen in enumerate(flags):
                if seen:
                    leader_of[r] = leader
        dist.barrier(group=self.pg)  # no probe is left for the leftover cleanup that follows to report
        groups = sorted({tuple(r for r in range(self.world_size) if leader_of[r] == ld) for ld in leader_of.values()})
        if len(groups) == 1:
            return
        self.node_local = True
        for g in groups:  # every rank creates every group, in the same order
            pg = dist.new_group(ranks=list(g), backend="gloo", timeout=timedelta(seconds=self.timeout_s))
            if self.rank in g:
                self.folder_ranks, self.folder_pg = g, pg
        log.info("lightning_ckpt: %s is local to ranks %s (%d folders); each folder is committed as a whole checkpoint",
                 self.dirpath, list(self.folder_ranks), len(groups))

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
    ) -> PendingSave | None:
        """Save ``state``. Returns a handle, or ``None`` if skipped because the previous save is still writing.
        ``if_busy`` overrides the writer's setting for this save (say ``"wait"`` for the last save of a run).

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
        tensors = {
            k: v for k, v in tensors.items()
            if (writes_shared if is_model_or_optim(k) else own_kept)
        }
        if self.async_save:
            tensors = self._buffers.snapshot(tensors)
        else:
            tensors = {k: v.detach() for k, v in tensors.items()}  # DCP copies device tensors to host as it writes
        state_bytes = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8") if own_kept else None
        handoff = None
        if self.node_local:  # this rank's own state, for the folders of the other nodes (see detect_folders)
            handoff = None if not own_kept else (
                {k: _packed(v) for k, v in tensors.items() if not is_model_or_optim(k)}, state_bytes)
        if not writes_own:
            tensors = {k: v for k, v in tensors.items() if is_model_or_optim(k)}
            state_bytes = None
        snapshot_s = time.perf_counter() - t0
        name = self.name_template.format(step=int(step), epoch=int(epoch or 0))
        self._seq += 1
        job = _SaveJob(
            writer=self,
            name=name,
            tensors=tensors,
            state_bytes=state_bytes,
            header=self._manifest_header(step, epoch, tags, metrics, hparams, meta, kind),
            snapshot_s=snapshot_s,
            sealed=self.auto_seal,
            seq=self._seq,
            handoff=handoff,
        )
        if self._executor is not None:
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
        if self._executor is None and fut.done():
            self._collect(pending)
        return pending

    def seal(self) -> None:
        """Let the pending save commit (sync mode: commit it now)."""
        p = self._inflight
        if p is None or p._job.sealed.is_set():
            return
        p._job.sealed.set()
        if self._executor is None and not p._future.done():
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
            self._buffers.clear()
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
            if self._executor is None:
                self.raise_if_failed()
        else:
            res = p._future.result()
            if res is not None and (not self.history or self.history[-1] is not res):
                self.last_result = res
                self.history.append(res)

    def _manifest_header(self, step, epoch, tags, metrics, hparams, meta, kind) -> dict:
        h = {
            "format": mf.FORMAT_NAME,
            "format_version": mf.FORMAT_VERSION,
            "step": int(step),
            "epoch": None if epoch is None else int(epoch),
            "kind": kind,
            "world_size": self.world_size,
            "mode": self.mode,
            "tags": sorted(set(tags)),
            "metrics": _json_safe(metrics or {}),
            "hparams": _json_safe(hparams) if hparams is not None else None,
            "run": run_info(),
        }
        if meta:
            h.update(_json_safe(meta))
        return h


class _Abandoned(Exception):
    pass


class _SaveJob:
    def __init__(self, writer: CheckpointWriter, name: str, tensors: dict, state_bytes: bytes | None, header: dict,
                 snapshot_s: float, sealed: bool, seq: int = 0, handoff: tuple | None = None):
        self.w = writer
        self.handoff = handoff
        self.seq = seq
        self.name = name
        self.tensors = tensors
        self.state_bytes = state_bytes
        self.header = header
        self.tags: set[str] = set(header["tags"])
        self.snapshot_s = snapshot_s
        self.sealed = threading.Event()
        if sealed:
            self.sealed.set()
        self.abandoned = False
        self.future: cf.Future | None = None
        self._lock = threading.Lock()
        self._committing = False
        self.partial: str | None = None
        self.files: list[_FileResult] = []
        self.tensor_index: dict = {}
        self.t0 = time.perf_counter()

    def add(self, tags: Iterable[str], metrics: dict | None) -> bool:
        with self._lock:
            if self._committing:
                return False
            self.tags.update(tags)
            if metrics:
                self.header["metrics"].update(_json_safe(metrics))
            return True

    def run_logged(self) -> SaveResult:
        try:
            self.write()
            self.sealed.wait()
            return self.commit()
        except _Abandoned:
            raise
        except BaseException as e:
            log.error("lightning_ckpt: background save of %s failed: %r (earlier checkpoints are intact)", self.name, e)
            raise

    def write(self) -> None:
        """Phase 1: every file into the partial folder, fsynced."""
        w = self.w
        self.t0 = time.perf_counter()
        folder = f"-n{w.folder_ranks[0]}" if w.node_local else ""  # never one partial folder for two folder groups
        self.partial = os.path.join(w.dirpath, f"{mf.PARTIAL_PREFIX}{self.name}-{w.writer_id}-{self.seq}{folder}")
        failed: BaseException | None = None
        collective_failed = False
        try:
            extra_states: dict[int, bytes] = {}
            if w.node_local:  # each folder gets every rank's own state: hand it over first
                gathered: list = [None] * w.world_size
                collective_failed = True
                dist.all_gather_object(gathered, self.handoff, group=w.pg)
                collective_failed = False
                self.handoff = None
                if w.is_leader and w.folder_written:
                    for r, got in enumerate(gathered):
                        if got is not None and r not in w.folder_ranks:
                            self.tensors.update({k: _unpacked(v) for k, v in got[0].items()})
                            if got[1] is not None:
                                extra_states[r] = got[1]
            if w.folder_written:
                os.makedirs(self.partial, exist_ok=True)  # every rank: the folder may be shared or node-local

                def on_finish(files: list[_FileResult], tensor_index: dict) -> None:
                    self.files, self.tensor_index = files, tensor_index

                storage_writer = LCStorageWriter(
                    self.partial, state_bytes=self.state_bytes, on_finish=on_finish, crc_executor=w._crc_pool,
                    fsync=w.fsync, ranks=w.folder_ranks if w.node_local else None, extra_states=extra_states,
                )
                pg = w.folder_pg if w.node_local else w.pg
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
                    if pg is not None and len(w.folder_ranks) > 1:
                        dcp.save(self.tensors, storage_writer=storage_writer, planner=DefaultSavePlanner(), process_group=pg)
                    else:
                        dcp.save(self.tensors, storage_writer=storage_writer, planner=DefaultSavePlanner(), no_dist=True)
        except BaseException as e:
            failed = e
        finally:
            self.tensors = {}  # the buffers are the writer's; do not keep references
            self.handoff = None
        if w.node_local and not collective_failed:
            # every folder is written: only then may any folder commit (the others learn here that one failed)
            report = None if failed is None else f"{type(failed).__name__}: {failed}"[:500]
            outcome: list = [None] * w.world_size
            try:
                dist.all_gather_object(outcome, report, group=w.pg)
            except BaseException as e:  # noqa: BLE001 - a rank went away
                failed = failed or e
            else:
                bad = [(r, msg) for r, msg in enumerate(outcome) if msg is not None]
                if bad and failed is None:
                    failed = CheckpointWriteError(
                        f"checkpoint {self.name!r} was not committed in any folder: rank {bad[0][0]} failed to write "
                        f"its part ({bad[0][1]}). Earlier checkpoints are intact; see that rank's log."
                    )
        if failed is not None:
            if w.is_leader:
                remove_tree(self.partial)
            raise self._translate(failed)

    def _translate(self, e: BaseException) -> BaseException:
        err = unwrap_dcp_error(e)
        if isinstance(err, CheckpointError):
            return err
        if isinstance(err, OSError):
            wrapped = CheckpointWriteError(
                f"writing checkpoint {self.name!r} into {self.w.dirpath} failed: {err}. Free disk space or fix "
                "permissions; earlier checkpoints are intact and nothing partial was committed."
            )
            wrapped.__cause__ = err
            return wrapped
        text = str(err).lower()
        if self.w.world_size > 1 and ("timed out" in text or "timeout" in text or "connection closed" in text
                                      or "connection reset" in text or "broken pipe" in text):
            wrapped = CheckpointWriteError(
                f"checkpoint {self.name!r} was not committed: another rank did not finish its part within "
                f"save_timeout_s={self.w.timeout_s:g} or went away ({err}). Earlier checkpoints are intact; check the "
                "other ranks' logs, or raise save_timeout_s if their storage is slow."
            )
            wrapped.__cause__ = err
            return wrapped
        if err is not e and isinstance(err, Exception):
            wrapped = CheckpointWriteError(f"writing checkpoint {self.name!r} failed: {err!r}")
            wrapped.__cause__ = err
            return wrapped
        return e

    def commit(self) -> SaveResult:
        """Phase 2: manifest last, rename, latest.json, then the on-commit hooks (retention)."""
        with self._lock:
            self._committing = True
        name = None
        if self.w.node_local:
            name = self._agree_on_commit()
        if self.abandoned:
            if self.w.is_leader:
                remove_tree(self.partial)
            raise _Abandoned()
        if not (self.w.is_leader and self.w.folder_written):  # rank 0 (node-local: each folder's first rank) commits
            return SaveResult(name=self.name, path=os.path.join(self.w.dirpath, self.name), step=self.header["step"],
                              bytes=0, snapshot_s=self.snapshot_s, write_s=time.perf_counter() - self.t0,
                              tags=sorted(self.tags), kind=self.header["kind"], metrics=dict(self.header["metrics"]))
        try:
            res = self._commit(name)
        except BaseException as e:
            remove_tree(self.partial)
            raise self._translate(e)
        for hook in list(self.w.on_commit):
            try:
                hook(res)
            except Exception as e:  # noqa: BLE001 - retention must never fail a committed save
                log.error("lightning_ckpt: post-commit hook failed: %r", e)
        return res

    def _taken_names(self) -> list[str]:
        """Names this checkpoint cannot take in the folder: ``<name>`` and ``<name>-vN`` already committed."""
        try:
            entries = os.listdir(self.w.dirpath)
        except OSError:
            return []
        return [e for e in entries if e == self.name or e.startswith(self.name + "-v")]

    def _agree_on_commit(self) -> str:
        """Node-local folders: every rank learns rank 0's tags and metrics and whether any rank dropped the save, and
        every folder takes the same name (the first one free in all folders). One collective."""
        w = self.w
        mine = {"abandoned": self.abandoned, "tags": sorted(self.tags), "metrics": self.header["metrics"],
                "taken": self._taken_names() if w.is_leader else []}
        everyone: list = [None] * w.world_size
        try:
            dist.all_gather_object(everyone, mine, group=w.pg)
        except BaseException as e:  # noqa: BLE001
            if w.is_leader:
                remove_tree(self.partial)
            raise self._translate(e)
        self.abandoned = any(x["abandoned"] for x in everyone)
        self.tags = set(everyone[0]["tags"])
        self.header["metrics"] = everyone[0]["metrics"]
        taken = {n for x in everyone for n in x["taken"]}
        return self._first_free(lambda n: n in taken)

    def _first_free(self, taken: Any) -> str:
        """``<name>``, else ``<name>-v2``, ``-v3``, ...: the first for which ``taken(name)`` is false."""
        name, v = self.name, 1
        while taken(name):
            v += 1
            name = f"{self.name}-v{v}"
        return name

    def _commit(self, name: str | None = None) -> SaveResult:
        w = self.w
        files, partial = self.files, self.partial
        if name is None:
            name = self._first_free(lambda n: os.path.exists(os.path.join(w.dirpath, n)))
        final = os.path.join(w.dirpath, name)
        m = dict(self.header)
        m["tags"] = sorted(self.tags)
        m["name"] = name
        m["world_size"] = max(w.world_size, 1 + max((f.rank for f in files), default=0))
        m["files"] = {f.record["name"]: {k: v for k, v in f.record.items() if k != "name"} for f in files}
        m["tensors"] = self.tensor_index
        m["state_files"] = {str(f.rank): f.record["name"] for f in files if f.record["name"].startswith("state-")}
        total = sum(f.record["size"] for f in files)
        write_s = time.perf_counter() - self.t0
        m["timings"] = {
            "snapshot_s": round(self.snapshot_s, 6),
            "write_s": round(write_s, 6),
            "bytes": total,
            "throughput_gbps": round(total / write_s / 1e9, 4) if write_s > 0 else None,
        }
        m["created_unix"] = time.time()
        mf.validate_manifest(json.loads(mf.dumps(m)), "the manifest being written")
        mpath = os.path.join(partial, mf.MANIFEST)
        fd = os.open(mpath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            data = memoryview(mf.dumps(m))
            while data:
                data = data[os.write(fd, data):]
            if w.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if w.fsync:
            fsync_dir(partial)
        os.rename(partial, final)  # the commit point
        if w.fsync:
            fsync_dir(w.dirpath)
        atomic_write_bytes(
            os.path.join(w.dirpath, mf.LATEST),
            json.dumps({"name": name, "step": m["step"], "epoch": m["epoch"]}).encode(),
            fsync=w.fsync,
        )
        w.committed_names.add(name)
        log.info("lightning_ckpt: committed %s (%.1f MB in %.2fs)", final, total / 1e6, write_s)
        return SaveResult(
            name=name, path=final, step=m["step"], bytes=total, snapshot_s=self.snapshot_s, write_s=write_s,
            tags=m["tags"], kind=m["kind"], metrics=dict(m["metrics"]),
        )


BACKGROUND_NICE = 5


def _packed(t: torch.Tensor) -> tuple[str, list[int], bytes]:
    """A CPU tensor as plain values, to hand to another rank (no tensor pickling: the snapshot buffers are views)."""
    t = t.detach().cpu().contiguous()
    return dtype_name(t.dtype), list(t.shape), bytes(byte_view(t))


def _unpacked(p: tuple[str, list[int], bytes]) -> torch.Tensor:
    dtype, shape, data = p
    if not data:
        return torch.empty(shape, dtype=dtype_from_name(dtype))
    return torch.frombuffer(bytearray(data), dtype=dtype_from_name(dtype)).reshape(shape)


def _background_priority() -> None:
    """Background saves yield the CPU to training: on Linux a thread's nice value is its own (by thread id)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except (AttributeError, OSError):
        pass


def check_writable_dir(dirpath: str) -> None:
    if os.path.exists(dirpath) and not os.path.isdir(dirpath):
        raise CheckpointWriteError(
            f"dirpath {dirpath!r} is a file, not a folder. Give a folder path for checkpoints (it is created if missing)."
        )
    try:
        os.makedirs(dirpath, exist_ok=True)
        probe = os.path.join(dirpath, f".probe-{uuid.uuid4().hex[:8]}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.unlink(probe)
    except OSError as e:
        raise CheckpointWriteError(
            f"dirpath {dirpath!r} is not writable ({e.strerror or e}). Choose a folder this process can write to, or fix "
            "its permissions."
        ) from e


def cleanup_partials(dirpath: str) -> list[str]:
    """Remove folders of interrupted saves (``.partial-*``, ``.trash-*``) and stray temp files. Returns what was removed."""
    removed = []
    try:
        entries = os.listdir(dirpath)
    except OSError:
        return removed
    for e in entries:
        p = os.path.join(dirpath, e)
        if e.startswith(mf.PARTIAL_PREFIX) or e.startswith(mf.TRASH_PREFIX):
            remove_tree(p)
            removed.append(p)
        elif e.startswith(".tmp-") or e.startswith(".probe-"):
            try:
                os.unlink(p)
                removed.append(p)
            except OSError:
                pass
    if removed:
        log.warning("lightning_ckpt: removed %d leftover partial save(s) in %s", len(removed), dirpath)
    return removed


def _json_safe(x: Any) -> Any:
    """Metrics and hparams for the manifest: plain JSON, tensors as numbers, the rest as strings."""
    if isinstance(x, torch.Tensor):
        if x.numel() == 1:
            return _json_safe(x.item())
        return _json_safe(x.tolist()) if x.numel() <= 64 else f"<tensor {list(x.shape)} {x.dtype}>"
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return x if x == x and x not in (float("inf"), float("-inf")) else str(x)
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_json_safe(v) for v in x]
    if hasattr(x, "item") and callable(x.item):
        try:
            return _json_safe(x.item())
        except Exception:  # noqa: BLE001
            pass
    return str(x)
