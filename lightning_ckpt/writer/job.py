"""One save of a :class:`~lightning_ckpt.writer.CheckpointWriter`: phase 1 writes every rank's files into the
folder's transaction (``writer/plain.py`` without sharded tensors, else through DCP), phase 2 commits it on the folder's leader (manifest last, rename, latest.json) and
runs the writer's on-commit hooks. Node-local folders add two collectives: every rank's own state is handed to every
folder before the write, and every folder learns before the commit whether all folders were written."""
from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from ..dcp import LCStorageWriter, _FileResult, unwrap_dcp_error
from ..errors import CheckpointError, CheckpointWriteError
from ..format import manifest as mf
from ..format.tensorfile import CHECKSUM_SECONDS
from ..format.gcpause import pausing
from ..store.base import first_free
from ..store.fs import IO_TIMES
from .meta import json_safe
from .folders import _unpacked
from .plain import write_plain
from .snapshot import total_nbytes
if TYPE_CHECKING:
    from .writer import CheckpointWriter

log = logging.getLogger("lightning_ckpt")


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
    breakdown: dict = field(default_factory=dict)  # where the time went (seconds): see SaveJob.write and _commit


class PendingSave:
    """Handle of a save. ``result()`` waits for the commit and returns a :class:`SaveResult` or raises.

    Until the save is committed, :meth:`CheckpointWriter.merge` can add tags and metrics to it (several callbacks
    asking for the same step get one checkpoint with all their tags).
    """

    def __init__(self, job: "SaveJob", future: cf.Future, step: int) -> None:
        self._job, self._future, self.step = job, future, step

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


class _Abandoned(Exception):  # a save dropped before its commit (CheckpointWriter.abandon)
    pass


class SaveJob:
    def __init__(self, writer: CheckpointWriter, name: str, tensors: dict, state_bytes: bytes | None, header: dict,
                 snapshot_s: float, sealed: bool, seq: int = 0, handoff: tuple | None = None, plan: Any = None):
        self.w = writer
        self.plan = plan  # deduplication (writer/dedup.py): what the training thread saw; None when off
        self.decision: Any = None
        self.handoff = handoff
        self.seq = seq
        self.name = name
        self.tensors = tensors
        self.state_bytes = state_bytes  # (a background save's: encoded in write())
        self.header = header
        self.tags: set[str] = set(header["tags"])
        self.snapshot_s = snapshot_s
        self.inline = False  # written (and committed when sealed) in the caller's thread
        self.sealed = threading.Event()
        if sealed:
            self.sealed.set()
        self.abandoned = False
        self.future: cf.Future | None = None
        self._lock = threading.Lock()
        self._committing = False
        self.tx: Any = None
        self.files: list[_FileResult] = []
        self.tensor_index: dict = {}
        self.t0 = time.perf_counter()
        self.breakdown: dict = {}
        # the write's progress (any thread may read it): bytes of this rank's files written so far, of about how many
        self.bytes_done = self.bytes_total = 0  # (the total is counted in write(), off the training thread)

    def _progress(self, n: int) -> None:
        self.bytes_done += n

    def add(self, tags: Iterable[str], metrics: dict | None) -> bool:
        with self._lock:
            if self._committing:
                return False
            self.tags.update(tags)
            if metrics:
                self.header["metrics"].update(json_safe(metrics))
            return True

    @pausing
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
        IO_TIMES.reset()
        IO_TIMES.on_bytes = self._progress
        crc0 = CHECKSUM_SECONDS[0]
        if self.state_bytes is not None and not isinstance(self.state_bytes, bytes):  # encoded here, off the caller
            self.state_bytes = bytes(self.state_bytes)
        self.bytes_total = total_nbytes(self.tensors) + len(self.state_bytes or b"")
        folder = f"-n{w.folder_ranks[0]}" if w.node_local else ""  # never one partial folder for two folder groups
        # every rank of the folder writes into the same transaction: the same id, and rank 0's owner token
        self.tx = w.store.begin(self.name, tx_id=f"{w.writer_id}-{self.seq}{folder}", owner=w.owner)
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
            pack_keys: set[str] = set()
            if self.plan is not None:
                collective_failed = True
                self.decision, collective_failed = self._decide(), False
                self.tensors = {k: v for k, v in self.tensors.items() if k not in self.decision.reuse}
                self.bytes_total = total_nbytes(self.tensors) + len(self.state_bytes or b"")
                pack_keys = set(self.decision.to_pack)
            if w.folder_written:
                self.tx.open()  # every rank: the folder may be shared or node-local

                def on_finish(files: list[_FileResult], tensor_index: dict) -> None:
                    self.files, self.tensor_index = files, tensor_index

                storage_writer = LCStorageWriter(
                    self.tx, state_bytes=self.state_bytes, on_finish=on_finish, crc_executor=w._crc_pool,
                    ranks=w.folder_ranks if w.node_local else None, extra_states=extra_states,
                    pack_keys=pack_keys, pack_name=lambda r: mf.pack_name(self.header["save_id"], r),
                    content_hash=w.content_hash,
                )
                pg = w.folder_pg if w.node_local else w.pg
                plain = None
                if not w.node_local:  # no sharded tensor: written without DCP's planning (writer/plain.py)
                    plain = write_plain(w, self.tx, self.tensors, state_bytes=self.state_bytes, pack_keys=pack_keys,
                                        pack_name=storage_writer.pack_name, content_hash=w.content_hash)
                if plain is not None:
                    self.files, self.tensor_index = plain
                else:
                    self._save_dcp(storage_writer, pg)
        except BaseException as e:
            failed = e
        finally:
            self.tensors = {}  # the buffers are the writer's; do not keep references
            self.handoff = None
            IO_TIMES.on_bytes = None
            direct_bytes = IO_TIMES.direct_bytes
            write_s, fsync_s, nbytes = IO_TIMES.reset()
            self.breakdown = {"snapshot_s": self.snapshot_s, "write_phase_s": time.perf_counter() - self.t0,
                              "write_syscalls_s": write_s, "fsync_s": fsync_s, "bytes_written": nbytes,
                              "bytes_direct": direct_bytes, "checksum_s": CHECKSUM_SECONDS[0] - crc0}
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
                self.tx.abort()
            self._release()
            raise self._translate(failed)

    def _save_dcp(self, storage_writer: LCStorageWriter, pg: Any) -> None:
        """Sharded state (or node-local folders): DCP plans who writes which chunk."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            if pg is not None and len(self.w.folder_ranks) > 1:
                dcp.save(self.tensors, storage_writer=storage_writer, planner=DefaultSavePlanner(), process_group=pg)
            else:
                dcp.save(self.tensors, storage_writer=storage_writer, planner=DefaultSavePlanner(), no_dist=True)

    def _decide(self) -> Any:
        """The leader decides which tensors are reused or packed (writer/dedup.py); every rank learns it (one
        broadcast on the writer's group)."""
        from .dedup import Decision

        w = self.w
        if self.plan.later is not None:  # the plan of the tensors copied in bulk, from their snapshot (Deduper.finish)
            skip = w.dedup.finish(self.plan, self.tensors, leader=w.is_leader)
            self.tensors = {k: v for k, v in self.tensors.items() if k not in skip} if skip else self.tensors
        d = w.dedup.decide(self.plan, self.tensors) if w.is_leader else None
        if w.world_size > 1:
            box = [d.for_others() if d is not None else None]
            src = dist.get_global_rank(w.pg, 0) if w._given_pg else 0
            dist.broadcast_object_list(box, src=src, group=w.pg)
            if d is None:
                reused, packed = box[0]
                d = Decision(reuse={k: None for k in reused}, to_pack=set(packed))
        return d

    def _release(self) -> None:
        """The save is over: the packs its decision held for it are no longer pinned by it (writer/dedup.py)."""
        if self.decision is not None and self.w.dedup is not None:
            self.w.dedup.release(self.decision)

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

    @pausing
    def commit(self) -> SaveResult:
        """Phase 2: manifest last, rename, latest.json, then the on-commit hooks (retention)."""
        with self._lock:
            self._committing = True
        name = None
        if self.w.node_local:
            name = self._agree_on_commit()
        if self.abandoned:
            if self.w.is_leader:
                self.tx.abort()
            self._release()
            raise _Abandoned()
        if not (self.w.is_leader and self.w.folder_written):  # rank 0 (node-local: each folder's first rank) commits
            if self.decision is not None and self.w.dedup is not None:
                self.w.dedup.follower_saw(self.plan, self.decision.for_others())
            return SaveResult(name=self.name, path=os.path.join(self.w.dirpath, self.name), step=self.header["step"],
                              bytes=0, snapshot_s=self.snapshot_s, write_s=time.perf_counter() - self.t0,
                              tags=sorted(self.tags), kind=self.header["kind"], metrics=dict(self.header["metrics"]))
        try:
            res = self._commit(name)
        except BaseException as e:
            if self.tx.committed is None:
                self.tx.abort()
                if self.w.dedup is not None:
                    self.w.dedup.forget()  # a pack it counted on may be gone: the next save looks again
            raise self._translate(e)
        finally:
            self._release()
        for hook in list(self.w.on_commit):
            try:
                hook(res)
            except Exception as e:  # noqa: BLE001 - retention must never fail a committed save
                log.error("lightning_ckpt: post-commit hook failed: %r", e)
        return res

    def _agree_on_commit(self) -> str:
        """Node-local folders: every rank learns rank 0's tags and metrics and whether any rank dropped the save, and
        every folder takes the same name (the first one free in all folders). One collective."""
        w = self.w
        mine = {"abandoned": self.abandoned, "tags": sorted(self.tags), "metrics": self.header["metrics"],
                "taken": w.store.taken(self.name) if w.is_leader else []}
        everyone: list = [None] * w.world_size
        try:
            dist.all_gather_object(everyone, mine, group=w.pg)
        except BaseException as e:  # noqa: BLE001
            if w.is_leader:
                self.tx.abort()
            raise self._translate(e)
        self.abandoned = any(x["abandoned"] for x in everyone)
        self.tags = set(everyone[0]["tags"])
        self.header["metrics"] = everyone[0]["metrics"]
        taken = {n for x in everyone for n in x["taken"]}
        return first_free(self.name, lambda n: n in taken)

    def _commit(self, name: str | None = None) -> SaveResult:
        w = self.w
        files, self.files = self.files, []  # (freed here, not by the training thread at its next save)
        if name is None:
            name = first_free(self.name, lambda n: os.path.lexists(w.store.path(n)))
        m = dict(self.header)
        m["tags"] = sorted(self.tags)
        m["name"] = name
        m["world_size"] = max(w.world_size, 1 + max((f.rank for f in files), default=0))
        own = [f for f in files if not f.record.get("pack")]
        new_packs = {f.record["name"]: {k: v for k, v in f.record.items() if k not in ("name", "pack")}
                     for f in files if f.record.get("pack")}
        m["files"] = {f.record["name"]: {k: v for k, v in f.record.items() if k != "name"} for f in own}
        tensors, self.tensor_index = self.tensor_index, {}  # (the same: tens of ms at 50,000 tensors)
        packs = dict(new_packs)
        for key, ref in sorted((self.decision.reuse if self.decision is not None else {}).items()):
            rec = ref.entry["tensors"][ref.name]
            tensors[key] = {"dtype": rec["dtype"], "shape": list(rec["shape"]), "chunks": [ref.chunk(rec["shape"])]}
            packs[ref.pack] = ref.entry
        m["tensors"] = tensors
        if packs:
            m["packs"] = packs
        m["format_version"] = mf.version_for(len(tensors), bool(packs))
        m["state_files"] = {str(f.rank): f.record["name"] for f in own if f.record["name"].startswith("state-")}
        total = sum(f.record["size"] for f in files)  # written by this save (its own files and its new packs)
        write_s = time.perf_counter() - self.t0
        m["timings"] = {
            "snapshot_s": round(self.snapshot_s, 6),
            "write_s": round(write_s, 6),
            "bytes": total,
            "throughput_gbps": round(total / write_s / 1e9, 4) if write_s > 0 else None,
        }
        m["timings"].update({k: round(v, 6) for k, v in self.breakdown.items() if k.endswith("_s")})
        m["created_unix"] = time.time()
        t_commit = time.perf_counter()
        raw = mf.dumps(m)
        mf.parse_manifest(raw, "the manifest being written")
        if packs:
            blobs = w.dedup.blobs
            with blobs.lock:  # no collection of the folder's packs between their adoption and the commit
                blobs.adopt(self.tx.path, sorted(new_packs))
                blobs.check_present(packs)
                name = self.tx.commit(raw, name=name)  # manifest last, then the rename: the commit point
        else:
            name = self.tx.commit(raw, name=name)  # manifest last, then the rename: the commit point
        if self.plan is not None and w.dedup is not None:
            w.dedup.committed(self.plan, m)
        try:
            w.store.publish_latest({"name": name, "step": m["step"], "epoch": m["epoch"]})
        except OSError as e:  # the checkpoint is committed all the same; latest.json is only a hint
            log.error("lightning_ckpt: committed %s but could not update latest.json (%s); readers find the "
                      "checkpoint by listing the folder", w.store.path(name), e)
        w.committed_names.add(name)
        self.breakdown["commit_s"] = time.perf_counter() - t_commit
        final = w.store.path(name)
        log.info("lightning_ckpt: committed %s (%.1f MB in %.2fs)", final, total / 1e6, write_s)
        return SaveResult(
            name=name, path=final, step=m["step"], bytes=total, snapshot_s=self.snapshot_s, write_s=write_s,
            tags=m["tags"], kind=m["kind"], metrics=dict(m["metrics"]), breakdown=dict(self.breakdown),
        )
