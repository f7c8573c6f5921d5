"""What a folder needs and what its retention rules keep, kept in step with the folder's listing across calls, so that
the work of one more save does not grow with the checkpoints the folder already holds (issue 22).

A :class:`Tracked` index follows one listing (``CheckpointInfo`` objects, oldest first): at each call it finds, by
identity, the checkpoints added and removed since the last call (a commit adds one, a deletion removes one: the
listing of a run's own folder and of a held S3 location keeps the same objects across calls, ``store/listing.py``,
``store/s3listing.py``) and updates its state with them. It starts over from the whole listing on its first call and
whenever more than ``MAX_CHANGES`` entries changed at once (a listing read afresh: another process's folder, a prune
from the command line), which is also what happens when the listing changed behind the run's back.

- :class:`NeededIndex`: :func:`~lightning_ckpt.folder.needed.needed` from per-run state (the newest of each run, its
  checkpoints tagged ``best`` and those that record a ranking rule, the checkpoints that name a resume or branch
  point); a call costs the runs, the best-tagged and the referencing checkpoints, not the folder.
- :class:`RetentionIndex`: one rule set's plan (``plan_retention``) from the checkpoints no per-checkpoint rule keeps
  (``keep_every_n_steps``, ``keep_tags``) plus the few that decide them: the ``keep_last`` newest, the
  ``keep_best`` top-k and the newest. The decisions for those candidates are the same as over the whole folder (a
  candidate is among the n newest, or the k best, of that set exactly when it is among those of the folder), and
  every other checkpoint is kept by a rule whatever the others are. A set with ``max_total_bytes`` (which weighs
  every checkpoint) is planned over the whole folder, as before.
"""
from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from typing import Any, Iterable, Optional

from ..policy.conditions import Monitor
from ..policy.retention import Record, RetentionRules, UnknownMonitorError, plan_retention
from ..read import ANY_RUN
from .best import rank_best
from .needed import recorded_best_rules, continues, checkpoint_ref


def order_key(c: Any) -> tuple:
    """The listing's order (``read.list_checkpoints``: step, then commit time, then name)."""
    return (c.step, c.created_unix or 0.0, c.name)


def _insert(seq: list, c: Any) -> None:
    bisect.insort(seq, c, key=order_key)


def _remove(seq: list, c: Any) -> None:
    """Remove the entry of ``c``'s name (the object held may be another one read with the same values)."""
    i = bisect.bisect_left(seq, order_key(c), key=order_key)
    if i < len(seq) and seq[i].name == c.name:
        del seq[i]


def listing_diff(last: list, new: list, limit: int) -> Optional[tuple[list, list]]:
    """(removed, added) from ``last`` to ``new``, two listings sorted by :func:`order_key` that share most of their
    objects; None when more than ``limit`` entries changed. The common parts are found by comparing slices (the same
    objects compare in C, without calling ``__eq__``; a checkpoint read again compares equal when its values are the
    same), so a commit or a deletion costs a few comparisons of slices, not a Python step per checkpoint."""
    removed: list = []
    added: list = []
    i = j = 0
    while True:
        k = _common_run(last, new, i, j)
        i, j = i + k, j + k
        if i == len(last) or j == len(new):
            removed += last[i:]
            added += new[j:]
            return (removed, added) if len(removed) + len(added) <= limit else None
        a, b = last[i], new[j]
        if order_key(a) <= order_key(b):  # a is not in ``new`` (sorted: it would be here), or was read again (b)
            removed.append(a)
            i += 1
        else:
            added.append(b)
            j += 1
        if len(removed) + len(added) > limit:
            return None


def _common_run(last: list, new: list, i: int, j: int) -> int:
    """The length of the longest common run of ``last[i:]`` and ``new[j:]``. First a binary search on single
    elements (the same object at both ends of a run: O(log n) steps), checked with one comparison of the two slices;
    when a later change realigned the lists (the check fails), a binary search on slices."""
    n = min(len(last) - i, len(new) - j)
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if last[i + mid - 1] is new[j + mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    if last[i:i + lo] == new[j:j + lo] and (lo == n or last[i + lo] != new[j + lo]):
        return lo
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if last[i:i + mid] == new[j:j + mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class Tracked(ABC):
    """Follows one listing across calls (see the module's docstring); subclasses say what to do per checkpoint."""

    MAX_CHANGES = 64

    def __init__(self) -> None:
        self._last: Optional[list] = None  # the listing of the last call (its objects held: ids stay unique)
        self.rebuilds = 0  # times the state was computed from the whole listing (tests and the benchmark read it)

    def sync(self, ckpts: list) -> None:
        last, self._last = self._last, list(ckpts)
        diff = None if last is None else listing_diff(last, self._last, self.MAX_CHANGES)
        if diff is None:
            self.rebuilds += 1
            self.reset()
            for c in self._last:
                self.add(c)
            return
        for c in diff[0]:
            self.remove(c)
        for c in diff[1]:
            self.add(c)

    @abstractmethod
    def reset(self) -> None:
        """Forget every checkpoint."""

    @abstractmethod
    def add(self, c: Any) -> None:
        """Take checkpoint ``c`` into account (it is in the listing now)."""

    @abstractmethod
    def remove(self, c: Any) -> None:
        """Forget checkpoint ``c`` (it left the listing)."""


class NeededIndex(Tracked):
    """``needed(ckpts, live_rules, copy)`` for successive listings of one folder (see the module's docstring)."""

    def __init__(self, copy: bool = False) -> None:
        self.copy = copy
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self.by_name: dict[str, Any] = {}
        self.lines: dict[Optional[str], list] = {}  # run name -> its checkpoints, oldest first
        self.best: dict[Optional[str], list] = {}  # run name -> its checkpoints tagged "best"
        self.ruled: dict[Optional[str], list] = {}  # run name -> its checkpoints that record a ranking rule
        self.refs: dict[str, tuple] = {}  # name -> (checkpoint, its references) for those that name a parent

    def add(self, c: Any) -> None:
        self.by_name[c.name] = c
        line = c.run_name
        _insert(self.lines.setdefault(line, []), c)
        if "best" in c.tags:
            _insert(self.best.setdefault(line, []), c)
        if recorded_best_rules([c]):
            _insert(self.ruled.setdefault(line, []), c)
        m = c.summary
        lin = m.get("lineage") if isinstance(m.get("lineage"), dict) else {}
        refs = [(r, why) for r, why in ((checkpoint_ref(m.get("resumed_from")), f"the checkpoint {c.name} resumed from"),
                                        (checkpoint_ref(lin.get("parent")), f"the checkpoint the run of {c.name} started from"))
                if r]
        if refs:
            self.refs[c.name] = (c, refs)

    def remove(self, c: Any) -> None:
        self.by_name.pop(c.name, None)
        self.refs.pop(c.name, None)
        line = c.run_name
        for table in (self.lines, self.best, self.ruled):
            seq = table.get(line)
            if seq is not None:
                _remove(seq, c)
                if not seq:
                    del table[line]

    def needed(self, ckpts: list, live_rules: Iterable = ()) -> dict[str, str]:
        self.sync(ckpts)
        live_rules = list(live_rules)
        out: dict[str, str] = {}
        if not self.lines:
            return out
        out[max((cs[-1] for cs in self.lines.values()), key=order_key).name] = "the folder's newest checkpoint"
        for line, cs in self.lines.items():
            out.setdefault(cs[-1].name, f"the newest checkpoint of run {line!r}" if line
                           else "the newest checkpoint of the main line")
            if self.copy:
                continue
            for rule in recorded_best_rules(self.ruled.get(line, ())):
                if rule in live_rules:
                    continue
                for c in rank_best(self.best.get(line, []), rule["monitor"], rule.get("mode", "min"), rule.get("top_k")):
                    out.setdefault(c.name, f"a current best by {rule['monitor']}")
        if not self.copy:
            for c, refs in sorted(self.refs.values(), key=lambda cr: order_key(cr[0])):
                for ref, why in refs:
                    parent = self.by_name.get(ref)
                    if parent is not None and not continues(parent.summary, c.summary):
                        out.setdefault(ref, why)
        return out


def _record(c: Any) -> Record:
    return Record(c.name, c.step, c.size_bytes, dict(c.metrics), tuple(c.tags), c.created_unix or 0.0)


class RetentionIndex(Tracked):
    """One rule set's plan for successive listings of a folder (those of run ``run_name``); see the module's
    docstring. Only for a set without ``max_total_bytes`` (:meth:`fits`)."""

    def __init__(self, rules: RetentionRules, run_name: Any = ANY_RUN) -> None:
        self.rules = rules
        self.run_name = run_name
        self.monitor = Monitor(rules.monitor, rules.mode) if rules.keep_best is not None else None
        super().__init__()
        self.reset()

    @staticmethod
    def fits(rules: RetentionRules) -> bool:
        return rules.has_keep_rule and rules.max_total_bytes is None

    def reset(self) -> None:
        self.all: list = []  # the run's checkpoints, oldest first
        self.candidates: list = []  # those no per-checkpoint rule keeps
        self.scored: list = []  # (sort key of the metric, -step, listing order, checkpoint), best first
        self.with_monitor: dict[str, Any] = {}  # the checkpoints that recorded the monitored metric

    def _mine(self, c: Any) -> bool:
        return self.run_name is ANY_RUN or c.run_name == self.run_name

    def _stable(self, c: Any) -> bool:
        r = self.rules
        return bool((r.keep_every_n_steps is not None and c.step % r.keep_every_n_steps == 0)
                    or (r.keep_tags is not None and set(c.tags) & set(r.keep_tags)))

    def _score(self, c: Any) -> Optional[tuple]:
        v = c.metrics.get(self.monitor.monitor) if self.monitor is not None else None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return (self.monitor.sort_key(float(v)), -c.step, order_key(c))
        return None

    def add(self, c: Any) -> None:
        if not self._mine(c):
            return
        _insert(self.all, c)
        if not self._stable(c):
            _insert(self.candidates, c)
        if self.monitor is not None:
            if self.monitor.monitor in c.metrics:
                self.with_monitor[c.name] = c
            s = self._score(c)
            if s is not None:
                bisect.insort(self.scored, (*s, c), key=lambda t: t[:3])

    def remove(self, c: Any) -> None:
        if not self._mine(c):
            return
        _remove(self.all, c)
        _remove(self.candidates, c)
        if self.monitor is not None:
            self.with_monitor.pop(c.name, None)
            s = self._score(c)
            if s is not None:
                i = bisect.bisect_left(self.scored, s, key=lambda t: t[:3])
                if i < len(self.scored) and self.scored[i][2] == s[2]:
                    del self.scored[i]

    def doomed(self, ckpts: list, protected: set) -> set[str]:
        """The names this rule set does not keep (``protected`` kept whatever the rules say). Raises
        UnknownMonitorError (a ValueError) when ``keep_best`` ranks by a metric no checkpoint recorded."""
        self.sync(ckpts)
        if not self.all:
            return set()
        r = self.rules
        if self.monitor is not None and not self.with_monitor:
            plan_retention([_record(c) for c in self.all], r, protected)  # raises UnknownMonitorError
            raise UnknownMonitorError(f"keep_best ranks checkpoints by {r.monitor!r}, which none recorded")
        if not self.candidates:
            return set()
        deciders = {c.name: c for c in self.candidates}
        deciders[self.all[-1].name] = self.all[-1]
        for c in self.all[-r.keep_last:] if r.keep_last else ():
            deciders[c.name] = c
        if self.monitor is not None:
            for t in self.scored[: r.keep_best]:
                deciders[t[-1].name] = t[-1]
            if not any(self.monitor.monitor in c.metrics for c in deciders.values()):
                c = next(iter(self.with_monitor.values()))
                deciders[c.name] = c
        chosen = sorted(deciders.values(), key=order_key)
        keep = plan_retention([_record(c) for c in chosen], r, protected)
        return {c.name for c, k in zip(chosen, keep) if not k}
