"""One folder of committed checkpoints over its store: :class:`Folder`, the one place retention is planned and
applied.

Every deletion path goes through it: the session of a ``fit`` (``RetentionPolicy`` after each commit, best-k
evictions, ``session/deleting.py``), the S3 uploader (the location's own rules, ``session/backups.py``), the dry run
of ``RetentionPolicy`` and ``lightning-ckpt prune`` / ``remove_checkpoint`` (``tools/prune.py``). A deletion is
``plan`` (the names no rule set keeps, with the protections of every kind and their reasons: what any run needs,
``folder/needed.py``; the holds of live runs; the caller's own: a participant's ``protect()``, uploads pending, the
run's resume point, pins) then ``delete`` (through the store, never a protected name) then ``collect`` (the packs
of the content store the deletions left unreferenced).

A :class:`Folder` that lives across saves (the session's, the uploader's) keeps what it computed from the listing
(``folder/index.py``): one more save costs the changed entries, not the folder's size.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from ..policy.retention import RetentionRules
from ..read import ANY_RUN, scan_checkpoints
from ..store import open_store
from ..store.base import Store
from .index import NeededIndex, RetentionIndex, order_key
from .needed import failed_runs, live_holds
from .retention import plan_deletions, records_of

log = logging.getLogger("lightning_ckpt")

RULES = "retention rules"
FAILED = "its run ended in an exception"


@dataclass
class Plan:
    """What a deletion pass would do: ``doomed`` (name -> why, oldest first) and ``protected`` (name -> why kept
    whatever the rules say), over ``ckpts`` (the listing it was made from)."""

    ckpts: list
    doomed: dict = field(default_factory=dict)
    protected: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.doomed)


class Folder:
    """A folder of committed checkpoints (a local path or an ``s3://`` location) and what its deletions must respect.

    Args:
        where: the folder, or its :class:`~lightning_ckpt.store.base.Store`.
        run_name: rank (retention) only the checkpoints of this run, in a folder several runs share.
        copy: a backup location, a copy of a run folder kept by its own rules: only the newest of each run is needed
            there (the run's folder keeps the best and the history).
    """

    def __init__(self, where: Any, *, run_name: Any = ANY_RUN, copy: bool = False) -> None:
        self.store: Store = where if isinstance(where, Store) else open_store(where)
        self.uri = self.store.uri
        self.run_name = run_name
        self.copy = copy
        self._needed = NeededIndex(copy)
        self._rules: dict[RetentionRules, RetentionIndex] = {}
        self.sweep_every = 16  # deletion passes that freed no pack between two collections of a whole S3 location
        self._unswept = 0

    # ------------------------------------------------------------------ reading
    def checkpoints(self) -> list:
        """The committed checkpoints, oldest first (the unreadable ones left out without a warning: the listing
        commands say them)."""
        return scan_checkpoints(self.uri)[0]

    def records(self, ckpts: Optional[list] = None) -> list:
        """Retention records of the run's checkpoints (a shared pack counted once)."""
        from ..read import of_run

        return records_of(of_run(self.checkpoints() if ckpts is None else ckpts, self.run_name))

    def needed(self, ckpts: Optional[list] = None, live_rules: Iterable = ()) -> dict[str, str]:
        """What no deletion may take, from the manifests (``folder.needed.needed``; the same answer, kept across
        calls)."""
        return self._needed.needed(self.checkpoints() if ckpts is None else ckpts, live_rules)

    def get(self, name: str) -> Any:
        """The checkpoint ``name`` of the listing last planned or asked :meth:`needed` of (None: not in it)."""
        return self._needed.by_name.get(name)

    @property
    def keeps_notes(self) -> bool:
        """Failed-run notes and live runs' holds (``.runs/``) are local files beside the folder's lock: kept where
        the folder can be locked."""
        return self.store.locking

    def holds(self) -> dict[str, str]:
        """The checkpoints live runs of the folder resumed from and have not recorded in a manifest yet."""
        return live_holds(self.uri) if self.keeps_notes else {}

    def failed_runs(self, ckpts: list) -> set[str]:
        return failed_runs(self.uri, ckpts) if self.keeps_notes else set()

    # ------------------------------------------------------------------ planning
    def plan(self, rule_sets: Iterable[RetentionRules], *, ckpts: Optional[list] = None,
             protect: Any = (), live_rules: Iterable = (), holds: bool = False, failed: bool = False) -> Plan:
        """The deletions ``rule_sets`` ask (a checkpoint stays when any set keeps it) and, with ``failed``, the
        checkpoints of runs that ended in an exception, minus everything protected: what the folder needs (live
        ranking rules ``live_rules`` left to their live owner), with ``holds`` the live runs' holds, and ``protect``
        (names, or name -> why). Raises ValueError when a set ranks by a metric no checkpoint recorded."""
        ckpts = self.checkpoints() if ckpts is None else ckpts
        keep = self.needed(ckpts, live_rules)
        if holds:
            for n, why in self.holds().items():
                keep.setdefault(n, why)
        for n in protect:
            keep.setdefault(n, protect[n] if isinstance(protect, dict) else "protected by the run")
        plan = Plan(ckpts, protected=keep)
        doomed = self.doomed_by(ckpts, [r for r in rule_sets if r.has_keep_rule or r.max_total_bytes is not None],
                                set(keep))
        by_name = self._needed.by_name  # the listing's, after needed() above
        plan.doomed = {n: RULES for n in sorted(doomed, key=lambda n: order_key(by_name[n]))}
        if failed:
            ids = self.failed_runs(ckpts)
            for c in ckpts:
                if c.summary.get("run_id") in ids and c.name not in keep:
                    plan.doomed.setdefault(c.name, FAILED)
            plan.doomed = {c.name: plan.doomed[c.name] for c in ckpts if c.name in plan.doomed}  # oldest first
        return plan

    def doomed_by(self, ckpts: list, rule_sets: list[RetentionRules], protected: set) -> set[str]:
        """Names no rule set keeps. A set without ``max_total_bytes`` is planned from its kept state
        (``RetentionIndex``), any other over every record."""
        if not rule_sets:
            return set()
        if not all(RetentionIndex.fits(r) for r in rule_sets):
            return set(plan_deletions(self.records(ckpts), rule_sets, protected))
        out: Optional[set] = None
        for rules in rule_sets:
            idx = self._rules.get(rules)
            if idx is None:
                idx = self._rules[rules] = RetentionIndex(rules, self.run_name)
            got = idx.doomed(ckpts, protected)
            out = got if out is None else out & got
        return out or set()

    # ------------------------------------------------------------------ deleting
    def delete(self, names: Iterable[str], *, protected: Any = (), purge: Any = None,
               on_deleted: Optional[Callable[[str], None]] = None, on_gone: Optional[Callable[[str], None]] = None,
               on_error: Optional[Callable[[str, Exception], None]] = None) -> list[str]:
        """Delete committed checkpoints through the store, never a ``protected`` one: each leaves the listing at once.
        ``purge``: an executor that removes the bytes later (the session's deleter thread; a store that takes an entry
        out of its listing apart from its bytes, ``trash``/``purge``); else ``store.delete``. ``on_gone(name)``: the
        entry was not there; ``on_error(name, exc)``: its deletion failed, go on with the next (without it, raise).
        Returns the names deleted."""
        done = []
        for name in names:
            if name in protected:
                continue
            try:
                if purge is not None:
                    trash = self.store.trash(name)
                    if trash is not None:
                        purge.submit(self.store.purge, trash)
                    gone = trash is None
                else:
                    gone = not self.store.delete(name)
            except Exception as e:  # noqa: BLE001 - the caller says whether a failure stops the pass
                if on_error is None:
                    raise
                on_error(name, e)
                continue
            if gone:
                if on_gone is not None:
                    on_gone(name)
                continue
            done.append(name)
            if on_deleted is not None:
                on_deleted(name)
        return done

    def apply(self, plan: Plan, *, purge: Any = None, collect: bool = True,
              on_deleted: Optional[Callable[[str], None]] = None) -> list[str]:
        """Delete what ``plan`` dooms (never what it protects), then collect the packs left unreferenced (``purge``:
        after the purges, in that executor). The collection, which reads every manifest of the folder, runs when a
        pack the deleted manifests referenced is referenced by none left (or every ``sweep_every`` passes, or when a
        deleted manifest is unknown here): as the S3 uploader does, so that a run whose checkpoints share a pack (a
        frozen backbone) does not read the whole folder at each deletion. Returns the names deleted."""
        known = {c.name: c for c in plan.ckpts}
        done = self.delete(plan.doomed, protected=plan.protected, purge=purge, on_deleted=on_deleted)
        if done and collect:
            freed = self.packs_of(done, known)
            if purge is not None:
                purge.submit(self.collect, freed)
            else:
                self.collect(freed)
        return done

    def packs_of(self, names: Iterable[str], known: Optional[dict] = None) -> Optional[set]:
        """The packs the manifests of ``names`` referenced (from ``known``, name -> checkpoint, else the listing last
        planned), or None when one of them is unknown here: what :meth:`collect` takes as ``freed`` (None: the whole
        content store)."""
        known = known or {}
        out: set = set()
        for name in names:
            c = known.get(name) or self.get(name)
            m = getattr(c, "summary", None)
            if not isinstance(m, dict):
                return None
            out.update(m.get("packs") or {})
        return out

    # ------------------------------------------------------------------ the content store
    def collect_skipped(self) -> list[str]:
        """Collect the whole content store if a deletion pass skipped it since the last whole collection (the end of
        a fit: packs a crashed predecessor or an aborted commit left unreferenced are not left behind)."""
        return self.collect() if self._unswept else []

    def collect(self, freed: Optional[set] = None, *, mine: Any = frozenset(), listed: bool = True) -> list[str]:
        """Remove the packs no committed checkpoint references any more. ``freed``: the packs the deleted manifests
        referenced; then the collection (which lists every pack and manifest) runs only when one of them is
        unreferenced now (``listed``: the folder's listing is in memory, so that this is cheap to tell) or every
        ``sweep_every`` passes (packs left by others). ``mine``: packs this process wrote (no grace period). Never
        raises: a failure is logged, the next deletion tries again."""
        try:
            due = self._unswept + 1 >= self.sweep_every
            if freed is not None and not due:
                if freed and listed:
                    freed = freed - {p for c in self.checkpoints() for p in (c.summary.get("packs") or {})}
                if not freed:
                    self._unswept += 1
                    return []
            self._unswept = 0
            removed, size = self.store.collect_packs(mine=mine)
        except Exception as e:  # noqa: BLE001 - retried after the next deletion
            log.error("lightning_ckpt: could not collect unreferenced packs in %s: %r", self.uri, e)
            return []
        if removed:
            log.info("lightning_ckpt: removed %d unreferenced pack(s) from %s/.blobs (%.1f MB)", len(removed), self.uri,
                     size / 1e6)
        return removed

    def collect_report(self, ckpts: list, doomed: Iterable[str], dry_run: bool) -> list[dict]:
        """For ``prune``: the packs no kept checkpoint references, ``{"path", "bytes"}`` each: removed, or (``dry_run``)
        those the planned deletions would leave unreferenced."""
        doomed = set(doomed)
        sizes = {p: int(e["size"]) for c in ckpts for p, e in (c.summary.get("packs") or {}).items()}
        if dry_run:
            kept = {p for c in ckpts if c.name not in doomed for p in (c.summary.get("packs") or {})}
            gone = sorted(set(self.store.pack_names()) - kept)
        else:
            sizes = {**self.store.pack_sizes(), **sizes}  # an orphan's size is no manifest's: the store says it
            gone = sorted(self.store.collect_packs()[0])
        return [{"path": self.store.path(f".blobs/{p}"), "bytes": sizes.get(p)} for p in gone]
