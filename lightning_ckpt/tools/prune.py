"""Deleting checkpoints by rule, safely: ``lightning-ckpt prune`` and the retention of the callbacks and backups.

Deletion goes through the store (``Store.delete``: out of the listing atomically, then the bytes). A prune of a local
folder takes the folder's lock first, so it never runs beside a training run that writes there (whose protections it
cannot see); leftovers of interrupted saves are removed only when their writer is gone. No deletion takes a checkpoint
a run needs (:func:`~lightning_ckpt.folder.needed.needed`: the newest, the current best, resume and branch points),
whatever the rules or ``--failed`` say. A prune plans everything first (the listing, the notes, the leftovers, each
checked for its type) and deletes only once the plan is complete, so a failure while planning deletes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError
from ..folder import Folder
from ..folder.needed import CheckpointProtectedError, failed_run_ids, needed  # noqa: F401 - re-exported
from ..folder.retention import committed_records  # noqa: F401 - re-exported (the CLI's prune --dry-run)
from ..policy.retention import RetentionRules
from ..read import list_checkpoints
from ..store import open_store
from ..store.fs import OPS, is_real_dir


def remove_checkpoint(path: Any, *, force: bool = False) -> None:
    """Delete a committed checkpoint: it disappears from listings atomically, then its files are removed, then the
    packs of the folder's content store no checkpoint references any more.

    Refuses (``CheckpointProtectedError``, nothing deleted) a checkpoint a run needs (the newest of the folder or of
    a run, a current best, one a run resumed or branched from) unless ``force=True``, and (``FolderBusyError``) a
    local folder whose lock another process holds: a run writes there, whose protections cannot be seen from here."""
    from ..store import locate

    store, name = locate(path)
    folder = Folder(store)
    lock = store.lock_unless_mine({"run_id": "remove_checkpoint"})  # None: this process holds it, or no lock there
    try:
        if not force:
            why = {**folder.holds(), **needed(list_checkpoints(store.uri))}.get(name)
            if why is not None:
                raise CheckpointProtectedError(
                    f"{path} is {why}: a run needs it, so it was not deleted. Pass force=True to delete it all the same.")
        folder.delete([name])
        if store.may_collect(lock):  # the store's one rule (store/base.py): never beside a live writer's save
            folder.collect()
    finally:
        if lock is not None:
            lock.release()


@dataclass
class PruneReport:
    dry_run: bool
    deleted: list = field(default_factory=list)  # {"path", "reason", "bytes"}
    partials: list = field(default_factory=list)  # paths of interrupted saves removed
    kept: list = field(default_factory=list)  # paths
    left_alone: list = field(default_factory=list)  # partial saves of a writer that still runs
    protected: dict = field(default_factory=dict)  # path -> why a run needs it (kept whatever the rules say)
    packs: list = field(default_factory=list)  # {"path", "bytes"}: packs of the content store no checkpoint kept needs


def prune(dirpath: Any, rules: RetentionRules | None, *, failed: bool = False, dry_run: bool = False) -> PruneReport:
    """Delete the checkpoints of ``dirpath`` that ``rules`` do not keep and, with ``failed``, those of runs that ended
    in an exception (and were not resumed since) plus the leftovers of interrupted saves whose writer is gone. A
    checkpoint a run needs (``report.protected``: the newest, the current best, resume and branch points) is never
    deleted.

    Raises ``FolderBusyError`` when a run holds the folder's lock, ``LockFileError``/``RunNotesError`` when the lock or
    the failed-run notes are not what this package writes there, ValueError when ``rules`` rank by a metric no
    checkpoint recorded; nothing is deleted then."""
    store = open_store(dirpath)
    folder = Folder(store)
    lock = None if dry_run else store.lock({"run_id": "lightning-ckpt prune"})  # NoLock where there is none (S3)
    try:
        report = PruneReport(dry_run)
        # ---- the plan: nothing is deleted before all of it is known (with the holds of live runs: locks disabled)
        plan = folder.plan([rules] if rules is not None else [], ckpts=list_checkpoints(dirpath), holds=True,
                           failed=failed)
        ckpts, doomed, keep = plan.ckpts, plan.doomed, plan.protected
        debris: list[str] = []
        if failed:  # the leftovers of interrupted saves (a folder without owners has none: found by age, in cleanup)
            debris = store.debris(everyone=store.owns(lock))
            report.left_alone = [p for p in store.debris(everyone=True) if p not in debris]
        report.protected = {c.path: keep[c.name] for c in ckpts if c.name in keep}
        # ---- the deletions
        if not dry_run:
            _remove_debris(debris)
        report.partials = debris
        for c in ckpts:
            if c.name in doomed:
                if not dry_run:
                    folder.delete([c.name])
                report.deleted.append({"path": c.path, "reason": doomed[c.name], "bytes": c.size_bytes})
        report.kept = [c.path for c in ckpts if c.name not in doomed]
        if store.may_collect(lock):  # the store's one rule (store/base.py): never beside a live writer's save
            report.packs = folder.collect_report(ckpts, doomed, dry_run)
        return report
    finally:
        if lock is not None:
            lock.release()


def _remove_debris(paths: list[str]) -> None:
    """Remove planned leftovers: a real folder with its content (never following a link inside), anything else (a
    file, a link, a FIFO) by unlinking the entry itself."""
    for p in paths:
        try:
            if is_real_dir(p):
                OPS.rmtree(p)
            else:
                OPS.unlink(p)
        except OSError as e:
            raise CheckpointError(f"could not remove the leftover {p} ({e.strerror or e}); no checkpoint was deleted. "
                                  "Check the folder's permissions and run again.") from None
