"""Deleting checkpoints by rule, safely: ``lightning-ckpt prune`` and the retention of the callbacks and backups.

Deletion goes through the store (``Store.delete``: out of the listing atomically, then the bytes). A prune of a local
folder takes the folder's lock first, so it never runs beside a training run that writes there (whose protections it
cannot see); leftovers of interrupted saves are removed only when their writer is gone.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError
from ..policy.retention import Record, RetentionRules, plan_retention
from ..read import ANY_RUN, list_checkpoints, of_run
from ..store import LocalStore, open_store
from ..store.fs import read_member

RUNS_DIR = ".runs"  # <dirpath>/.runs/<run_id>.json: a note left by a run that ended in an exception


def committed_records(where: Any, run_name: Any = ANY_RUN) -> list[Record]:
    """Retention records of the committed checkpoints of a folder or of an ``s3://`` location (``run_name``: of that
    run only, in a folder several runs share). A pack of the content store that several checkpoints share counts once,
    in the size of the oldest of them."""
    out, counted = [], set()
    for c in of_run(list_checkpoints(where), run_name):
        rec = c.__dict__.get("_record")  # made once per listed checkpoint (a run's folder is listed from memory)
        packs = c.manifest.get("packs")
        if not packs:
            if rec is None:
                rec = c.__dict__["_record"] = Record(c.name, c.step, c.size_bytes, dict(c.metrics), tuple(c.tags),
                                                     c.created_unix or 0.0)
            out.append(rec)
            continue
        size = c.size_bytes + sum(int(e["size"]) for n, e in packs.items() if n not in counted)
        counted.update(packs)
        if rec is None or rec.size_bytes != size:
            rec = c.__dict__["_record"] = Record(c.name, c.step, size, dict(c.metrics), tuple(c.tags),
                                                 c.created_unix or 0.0)
        out.append(rec)
    return out


def plan_deletions(records: list[Record], rule_sets: list[RetentionRules], protected: set[str] = frozenset()) -> list[str]:
    """Names no rule set keeps (a checkpoint stays when any rule of any set keeps it). Raises ValueError (from
    ``plan_retention``) when a set ranks by a metric no checkpoint recorded."""
    keep = [False] * len(records)
    for rules in rule_sets:
        keep = [a or b for a, b in zip(keep, plan_retention(records, rules, protected))]
    return [r.name for r, k in zip(records, keep) if not k]


def _collect_packs(store: Any, ckpts: list, doomed: dict, dry_run: bool) -> list[dict]:
    """The packs no kept checkpoint references: removed (or, ``dry_run``, only listed)."""
    from ..format import manifest as mf
    from ..store.blobs import BlobStore

    if dry_run:  # what the deletions would leave unreferenced
        needed = {p for c in ckpts if c.name not in doomed for p in (c.manifest.get("packs") or {})}
        sizes = {p: int(e["size"]) for c in ckpts for p, e in (c.manifest.get("packs") or {}).items()}
        if store.remote:
            present = set(store.blob_listing()[0])  # the packs, not their reuse marks
        else:
            present = set(BlobStore(store.uri).names())
        return [{"path": f"{store.uri}/{mf.BLOBS}/{p}", "bytes": sizes.get(p, 0)}
                for p in sorted(present - needed)]
    if store.remote:
        removed, _ = store.collect_packs()
        return [{"path": f"{store.uri}/{mf.BLOBS}/{p}", "bytes": None} for p in removed]
    blobs = BlobStore(store.uri, fsync=store.fsync)
    sizes = {p: os.path.getsize(blobs.pack(p)) for p in blobs.names()}
    removed, _ = blobs.collect()
    return [{"path": blobs.pack(p), "bytes": sizes.get(p)} for p in removed]


def remove_checkpoint(path: Any) -> None:
    """Delete a committed checkpoint: it disappears from listings atomically, then its files are removed. The packs
    of the folder's content store it alone referenced are removed too, unless a run holds the folder's lock (its next
    retention pass, or ``lightning-ckpt prune``, removes them then)."""
    from ..store import locate
    from ..store.blobs import BlobStore
    from ..store.lock import FolderBusyError

    store, name = locate(path)
    store.delete(name)
    if store.remote:
        store.collect_packs()
        return
    try:
        lock = store.lock({"run_id": "remove_checkpoint"})
    except FolderBusyError:
        return
    try:
        BlobStore(store.uri, fsync=store.fsync).collect()
    finally:
        lock.release()


def failed_run_ids(dirpath: str) -> set[str]:
    """Runs recorded as ended in an exception (``<dirpath>/.runs/<run_id>.json``)."""
    d = os.path.join(dirpath, RUNS_DIR)
    out: set[str] = set()
    try:
        entries = os.listdir(d)
    except OSError:
        return out
    for e in entries:
        try:
            rec = json.loads(read_member(d, e, 1 << 16))
        except (CheckpointError, OSError, ValueError):
            continue
        if isinstance(rec, dict) and rec.get("status") == "failed" and isinstance(rec.get("run_id"), str):
            out.add(rec["run_id"])
    return out


def record_failed_run(dirpath: str, run_id: str, error: str, when: float) -> None:
    """Leave the note :func:`failed_run_ids` reads (``lightning-ckpt prune --failed`` removes that run's checkpoints)."""
    LocalStore(os.path.join(dirpath, RUNS_DIR), fsync=False).write_atomic(
        f"{run_id}.json", json.dumps({"run_id": run_id, "status": "failed", "error": error[:2000], "time": when}).encode())


@dataclass
class PruneReport:
    dry_run: bool
    deleted: list = field(default_factory=list)  # {"path", "reason", "bytes"}
    partials: list = field(default_factory=list)  # paths of interrupted saves removed
    kept: list = field(default_factory=list)  # paths
    left_alone: list = field(default_factory=list)  # partial saves of a writer that still runs
    packs: list = field(default_factory=list)  # {"path", "bytes"}: packs of the content store no checkpoint kept needs


def prune(dirpath: Any, rules: RetentionRules | None, *, failed: bool = False, dry_run: bool = False) -> PruneReport:
    """Delete the checkpoints of ``dirpath`` that ``rules`` do not keep (the newest is always kept) and, with
    ``failed``, those of runs that ended in an exception plus the leftovers of interrupted saves whose writer is gone.

    Raises ``FolderBusyError`` when a run holds the folder's lock, ValueError when ``rules`` rank by a metric no
    checkpoint recorded (nothing is deleted then)."""
    store = open_store(dirpath)
    lock = None
    if not store.remote and not dry_run:
        lock = store.lock({"run_id": "lightning-ckpt prune"})
    try:
        report = PruneReport(dry_run)
        ckpts = list_checkpoints(dirpath)
        doomed: dict[str, str] = {}
        if rules is not None and (rules.has_keep_rule or rules.max_total_bytes is not None):
            from .lineage import branch_points

            keep = branch_points(store.uri) if not store.remote else set()
            for name in plan_deletions(committed_records(dirpath), [rules], keep):
                doomed[name] = "retention rules"
        if failed and not store.remote:
            ids = failed_run_ids(store.uri)
            newest = ckpts[-1].name if ckpts else None
            for c in ckpts:
                if c.manifest.get("run_id") in ids and c.name != newest:
                    doomed.setdefault(c.name, "its run ended in an exception")
            holder = store.lock_holder() if lock is None else None
            debris = store.debris(everyone=holder is None)
            report.left_alone = [p for p in store.debris(everyone=True) if p not in debris]
            if not dry_run:
                debris = store.cleanup(everyone=True)
            report.partials = debris
        for c in ckpts:
            if c.name in doomed:
                if not dry_run:
                    store.delete(c.name)
                report.deleted.append({"path": c.path, "reason": doomed[c.name], "bytes": c.size_bytes})
        report.kept = [c.path for c in ckpts if c.name not in doomed]
        report.packs = _collect_packs(store, ckpts, doomed, dry_run)
        return report
    finally:
        if lock is not None:
            lock.release()
