"""One save of a :class:`~lightning_ckpt.writer.CheckpointWriter`: phase 1 writes every rank's files into the
folder's transaction (``writer/plain.py`` without sharded tensors, else through DCP), phase 2 commits it on the
folder's leader (manifest last, rename, latest.json) and runs the writer's on-commit hooks. Node-local folders add two
collectives: every rank's own state is handed to every folder before the write, and every folder learns before the
commit whether all folders were written.

A :class:`SaveJob` is given everything it uses (:class:`JobDeps`: the topology, the store, the save's identity, the
checksum pool, the deduplicator, the commit hooks); it never sees the writer. Its caller drives it through a
``writer/pending.py`` :class:`~.pending.PendingSave`."""
from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from ..dcp import LCStorageWriter, unwrap_dcp_error
from ..dcp.planned import save_planned
from ..errors import CheckpointError, CheckpointWriteError
from ..format import manifest as mf
from ..format.tensorfile import CHECKSUM_SECONDS
from ..format.gcpause import pausing
from ..store.base import first_free
from ..store.fs import IO_TIMES
from ..store.local import LocalStore
from .dedup import Decision, Deduper
from .folders import unpacked
from .meta import json_safe
from .pending import Abandoned, SaveResult
from .plain import write_plain
from .snapshot import total_nbytes
from .topology import Topology

log = logging.getLogger("lightning_ckpt")


@dataclass(frozen=True)
class JobDeps:
    """What a save needs of its writer, given explicitly (the writer builds one per save)."""

    topology: Topology
    store: LocalStore
    writer_id: str
    owner: str  # rank 0's owner token: every rank's files of one save go into one partial folder
    crc_pool: cf.Executor
    dedup: Deduper | None
    content_hash: bool
    on_commit: list  # callables(SaveResult), run in the committing thread after latest.json
    committed_names: set  # the names this writer committed (added to at each commit)


class SaveJob:
    """One save's files and commit, on every rank (see the module's docstring); driven by its
    :class:`~.pending.PendingSave`. ``deps`` is all it uses of its writer."""

    def __init__(self, deps: JobDeps, name: str, tensors: dict, state_bytes: bytes | None, header: dict,
                 snapshot_s: float, sealed: bool, seq: int = 0, handoff: tuple | None = None, plan: Any = None):
        self.deps = deps
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
        self._lock = threading.Lock()
        self._committing = False
        self.tx: Any = None
        self.files: list[Any] = []
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
        except Abandoned:
            raise
        except BaseException as e:
            log.error("lightning_ckpt: background save of %s failed: %r (earlier checkpoints are intact)", self.name, e)
            raise

    def write(self) -> None:
        """Phase 1: every file into the partial folder, fsynced."""
        d, topo = self.deps, self.deps.topology
        self.t0 = time.perf_counter()
        IO_TIMES.reset()
        IO_TIMES.on_bytes = self._progress
        crc0 = CHECKSUM_SECONDS[0]
        if self.state_bytes is not None and not isinstance(self.state_bytes, bytes):  # encoded here, off the caller
            self.state_bytes = bytes(self.state_bytes)
        self.bytes_total = total_nbytes(self.tensors) + len(self.state_bytes or b"")
        folder = f"-n{topo.folder_ranks[0]}" if topo.node_local else ""  # never one partial folder for two folder groups
        # every rank of the folder writes into the same transaction: the same id, and rank 0's owner token
        self.tx = d.store.begin(self.name, tx_id=f"{d.writer_id}-{self.seq}{folder}", owner=d.owner)
        failed: BaseException | None = None
        collective_failed = False
        try:
            extra_states: dict[int, bytes] = {}
            if topo.node_local:  # each folder gets every rank's own state: hand it over first
                collective_failed = True
                gathered = topo.gather(self.handoff)
                collective_failed = False
                self.handoff = None
                if topo.is_leader and topo.folder_written:
                    for r, got in enumerate(gathered):
                        if got is not None and r not in topo.folder_ranks:
                            self.tensors.update({k: unpacked(v) for k, v in got[0].items()})
                            if got[1] is not None:
                                extra_states[r] = got[1]
            pack_keys: set[str] = set()
            if self.plan is not None:
                collective_failed = True
                self.decision, collective_failed = self._decide(), False
                self.tensors = {k: v for k, v in self.tensors.items() if k not in self.decision.reuse}
                self.bytes_total = total_nbytes(self.tensors) + len(self.state_bytes or b"")
                pack_keys = set(self.decision.to_pack)
            if topo.folder_written:
                self.tx.open()  # every rank: the folder may be shared or node-local

                def on_finish(files: list[Any], tensor_index: dict) -> None:
                    self.files, self.tensor_index = files, tensor_index

                storage_writer = LCStorageWriter(
                    self.tx, state_bytes=self.state_bytes, on_finish=on_finish, crc_executor=d.crc_pool,
                    ranks=topo.folder_ranks if topo.node_local else None, extra_states=extra_states,
                    pack_keys=pack_keys, pack_name=lambda r: mf.pack_name(self.header["save_id"], r),
                    content_hash=d.content_hash,
                )
                plain = None
                if not topo.node_local:  # no sharded tensor: written without DCP's planning (writer/plain.py)
                    plain = write_plain(topo, d.crc_pool, self.tx, self.tensors, state_bytes=self.state_bytes,
                                        pack_keys=pack_keys, pack_name=storage_writer.pack_name,
                                        content_hash=d.content_hash)
                if plain is not None:
                    self.files, self.tensor_index = plain
                else:
                    self._save_dcp(storage_writer, topo.write_group)
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
        if topo.node_local and not collective_failed:
            # every folder is written: only then may any folder commit (the others learn here that one failed)
            report = None if failed is None else f"{type(failed).__name__}: {failed}"[:500]
            try:
                outcome = topo.gather(report)
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
            if topo.is_leader:
                self.tx.abort()
            self._release()
            raise self._translate(failed)

    def _save_dcp(self, storage_writer: LCStorageWriter, pg: Any) -> None:
        """Sharded state (or node-local folders): DCP's planner decides who writes which chunk;
        ``dcp.planned.save_planned`` drives it as ``dcp.save`` does, less DCP's per-tensor costs that buy nothing
        here, and reuses the writer's last global plan while no rank's local plan changed (issue 22)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            if pg is not None and len(self.deps.topology.folder_ranks) > 1:
                save_planned(self.tensors, storage_writer, DefaultSavePlanner(), group=pg,
                             cache_key=self.deps.writer_id)
            else:
                save_planned(self.tensors, storage_writer, DefaultSavePlanner(), use_dist=False,
                             cache_key=self.deps.writer_id)

    def _decide(self) -> Any:
        """The leader decides which tensors are reused or packed (writer/dedup.py); every rank learns it (one
        broadcast on the writer's group)."""
        dedup, topo = self.deps.dedup, self.deps.topology
        if self.plan.later is not None:  # the plan of the tensors copied in bulk, from their snapshot (Deduper.finish)
            skip = dedup.finish(self.plan, self.tensors, leader=topo.is_leader)
            self.tensors = {k: v for k, v in self.tensors.items() if k not in skip} if skip else self.tensors
        d = dedup.decide(self.plan, self.tensors) if topo.is_leader else None
        if topo.world_size > 1:
            got = topo.broadcast(d.for_others() if d is not None else None)
            if d is None:
                reused, packed = got
                d = Decision(reuse={k: None for k in reused}, to_pack=set(packed))
        return d

    def _release(self) -> None:
        """The save is over: the packs its decision held for it are no longer pinned by it (writer/dedup.py)."""
        if self.decision is not None and self.deps.dedup is not None:
            self.deps.dedup.release(self.decision)

    def _translate(self, e: BaseException) -> BaseException:
        err = unwrap_dcp_error(e)
        if isinstance(err, CheckpointError):
            return err
        if isinstance(err, OSError):
            wrapped = CheckpointWriteError(
                f"writing checkpoint {self.name!r} into {self.deps.store.root} failed: {err}. Free disk space or fix "
                "permissions; earlier checkpoints are intact and nothing partial was committed."
            )
            wrapped.__cause__ = err
            return wrapped
        text = str(err).lower()
        if self.deps.topology.world_size > 1 and ("timed out" in text or "timeout" in text or "connection closed" in text
                                      or "connection reset" in text or "broken pipe" in text):
            wrapped = CheckpointWriteError(
                f"checkpoint {self.name!r} was not committed: another rank did not finish its part within "
                f"save_timeout_s={self.deps.topology.timeout_s:g} or went away ({err}). Earlier checkpoints are intact; check the "
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
        d, topo = self.deps, self.deps.topology
        name = None
        if topo.node_local:
            name = self._agree_on_commit()
        if self.abandoned:
            if topo.is_leader:
                self.tx.abort()
            self._release()
            raise Abandoned()
        if not (topo.is_leader and topo.folder_written):  # rank 0 (node-local: each folder's first rank) commits
            if self.decision is not None and d.dedup is not None:
                d.dedup.follower_saw(self.plan, self.decision.for_others())
            self.files, self.tensor_index, self.plan = [], {}, None  # freed here, not by the training thread later
            return SaveResult(name=self.name, path=os.path.join(d.store.root, self.name), step=self.header["step"],
                              bytes=0, snapshot_s=self.snapshot_s, write_s=time.perf_counter() - self.t0,
                              tags=sorted(self.tags), kind=self.header["kind"], metrics=dict(self.header["metrics"]))
        try:
            res = self._commit(name)
        except BaseException as e:
            if self.tx.committed is None:
                self.tx.abort()
                if d.dedup is not None:
                    d.dedup.forget()  # a pack it counted on may be gone: the next save looks again
            raise self._translate(e)
        finally:
            self._release()
        for hook in list(d.on_commit):
            try:
                hook(res)
            except Exception as e:  # noqa: BLE001 - retention must never fail a committed save
                log.error("lightning_ckpt: post-commit hook failed: %r", e)
        return res

    def _agree_on_commit(self) -> str:
        """Node-local folders: every rank learns rank 0's tags and metrics and whether any rank dropped the save, and
        every folder takes the same name (the first one free in all folders). One collective."""
        topo = self.deps.topology
        mine = {"abandoned": self.abandoned, "tags": sorted(self.tags), "metrics": self.header["metrics"],
                "taken": self.deps.store.taken(self.name) if topo.is_leader else []}
        try:
            everyone = topo.gather(mine)
        except BaseException as e:  # noqa: BLE001
            if topo.is_leader:
                self.tx.abort()
            raise self._translate(e)
        self.abandoned = any(x["abandoned"] for x in everyone)
        self.tags = set(everyone[0]["tags"])
        self.header["metrics"] = everyone[0]["metrics"]
        taken = {n for x in everyone for n in x["taken"]}
        return first_free(self.name, lambda n: n in taken)

    def _commit(self, name: str | None = None) -> SaveResult:
        d = self.deps
        files, self.files = self.files, []  # (freed here, not by the training thread at its next save)
        if name is None:
            name = first_free(self.name, lambda n: os.path.lexists(d.store.path(n)))
        m = dict(self.header)
        m["tags"] = sorted(self.tags)
        m["name"] = name
        m["world_size"] = max(d.topology.world_size, 1 + max((f.rank for f in files), default=0))
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
            blobs = d.dedup.blobs
            with blobs.lock:  # no collection of the folder's packs between their adoption and the commit
                blobs.adopt(self.tx.path, sorted(new_packs))
                blobs.check_present(packs)
                name = self.tx.commit(raw, name=name)  # manifest last, then the rename: the commit point
        else:
            name = self.tx.commit(raw, name=name)  # manifest last, then the rename: the commit point
        if self.plan is not None and d.dedup is not None:
            d.dedup.committed(self.plan, m)
        try:
            d.store.publish_latest({"name": name, "step": m["step"], "epoch": m["epoch"]})
        except OSError as e:  # the checkpoint is committed all the same; latest.json is only a hint
            log.error("lightning_ckpt: committed %s but could not update latest.json (%s); readers find the "
                      "checkpoint by listing the folder", d.store.path(name), e)
        d.committed_names.add(name)
        self.breakdown["commit_s"] = time.perf_counter() - t_commit
        final = d.store.path(name)
        log.info("lightning_ckpt: committed %s (%.1f MB in %.2fs)", final, total / 1e6, write_s)
        return SaveResult(
            name=name, path=final, step=m["step"], bytes=total, snapshot_s=self.snapshot_s, write_s=write_s,
            tags=m["tags"], kind=m["kind"], metrics=dict(m["metrics"]), breakdown=dict(self.breakdown),
        )
