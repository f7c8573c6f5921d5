"""What to keep. Each rule is a small dataclass with a pure ``keep(records) -> list[bool]``; rules compose with
:class:`AnyOf`. :func:`plan_retention` adds the guarantees every deletion must respect."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

from .conditions import Monitor


class UnknownMonitorError(ValueError):
    """A retention rule ranks by a metric that no checkpoint recorded (a typo would otherwise delete the best)."""


@dataclass(frozen=True)
class Record:
    """What retention needs to know about one committed checkpoint."""

    name: str
    step: int
    size_bytes: int = 0
    metrics: dict = field(default_factory=dict, hash=False, compare=False)
    tags: tuple[str, ...] = ()
    created: float = 0.0


def _order(records: Sequence[Record]) -> list[int]:
    """Indices oldest -> newest."""
    return sorted(range(len(records)), key=lambda i: (records[i].step, records[i].created, records[i].name))


@dataclass(frozen=True)
class KeepLast:
    n: int

    def keep(self, records: Sequence[Record]) -> list[bool]:
        out = [False] * len(records)
        for i in _order(records)[-self.n :] if self.n > 0 else []:
            out[i] = True
        return out


@dataclass(frozen=True)
class KeepBest:
    k: int
    monitor: Monitor

    def keep(self, records: Sequence[Record]) -> list[bool]:
        scored = []
        for i, r in enumerate(records):
            v = r.metrics.get(self.monitor.monitor)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                scored.append((self.monitor.sort_key(float(v)), -r.step, i))
        out = [False] * len(records)
        for _, _, i in sorted(scored)[: self.k]:
            out[i] = True
        return out


@dataclass(frozen=True)
class KeepEveryNSteps:
    n: int

    def keep(self, records: Sequence[Record]) -> list[bool]:
        return [r.step % self.n == 0 for r in records]


@dataclass(frozen=True)
class KeepTagged:
    tags: tuple[str, ...]

    def keep(self, records: Sequence[Record]) -> list[bool]:
        return [bool(set(r.tags) & set(self.tags)) for r in records]


@dataclass(frozen=True)
class AnyOf:
    rules: tuple

    def keep(self, records: Sequence[Record]) -> list[bool]:
        out = [False] * len(records)
        for rule in self.rules:
            out = [a or b for a, b in zip(out, rule.keep(records))]
        return out


def _positive_int(name: str, v) -> None:
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
        raise ValueError(f"{name}={v!r} is invalid; it must be a positive integer or None")


@dataclass(frozen=True)
class RetentionRules:
    """The rules of :class:`~lightning_ckpt.RetentionPolicy` and ``lightning-ckpt prune``.

    A checkpoint is kept when any set rule keeps it (newest ``keep_last``, best ``keep_best`` by ``monitor``, steps
    that are multiples of ``keep_every_n_steps``, checkpoints carrying one of ``keep_tags``); with no keep rule set, every checkpoint is kept. Then, if
    ``max_total_bytes`` is set, the oldest kept ones are dropped until the total fits (protected ones never are).
    """

    keep_last: Optional[int] = None
    keep_best: Optional[int] = None
    monitor: Optional[str] = None
    mode: str = "min"
    keep_every_n_steps: Optional[int] = None
    max_total_bytes: Optional[int] = None
    keep_tags: Optional[tuple] = None

    def __post_init__(self) -> None:
        if isinstance(self.keep_tags, str):  # one tag, not its letters
            object.__setattr__(self, "keep_tags", (self.keep_tags,))
        elif isinstance(self.keep_tags, list):
            object.__setattr__(self, "keep_tags", tuple(self.keep_tags))
        _positive_int("keep_last", self.keep_last)
        _positive_int("keep_best", self.keep_best)
        _positive_int("keep_every_n_steps", self.keep_every_n_steps)
        _positive_int("max_total_bytes", self.max_total_bytes)
        if self.keep_tags is not None and (not isinstance(self.keep_tags, tuple) or not self.keep_tags
                                           or not all(isinstance(t, str) and t for t in self.keep_tags)):
            raise ValueError(f"keep_tags={self.keep_tags!r} is invalid; give a list of tags such as ['best', 'preempt']")
        if self.keep_best is not None and not self.monitor:
            raise ValueError("keep_best is set but monitor is not; give the metric that ranks checkpoints, e.g. monitor='val_loss'")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode={self.mode!r} is invalid; use 'min' or 'max'")

    @property
    def has_keep_rule(self) -> bool:
        return any(v is not None for v in (self.keep_last, self.keep_best, self.keep_every_n_steps, self.keep_tags))

    def rule(self) -> AnyOf:
        rules: list = []
        if self.keep_last is not None:
            rules.append(KeepLast(self.keep_last))
        if self.keep_best is not None:
            rules.append(KeepBest(self.keep_best, Monitor(self.monitor, self.mode)))  # type: ignore[arg-type]
        if self.keep_every_n_steps is not None:
            rules.append(KeepEveryNSteps(self.keep_every_n_steps))
        if self.keep_tags is not None:
            rules.append(KeepTagged(tuple(self.keep_tags)))
        return AnyOf(tuple(rules))


def plan_retention(records: Sequence[Record], rules: RetentionRules, protected: set[str] = frozenset()) -> list[bool]:
    """``should_preserve`` for every record. Guarantees, whatever the rules:

    - the newest checkpoint (highest step, then latest commit) is kept;
    - every checkpoint named in ``protected`` (resumed-from, current best-k, ...) is kept;
    - when ``keep_best`` ranks by a metric no checkpoint recorded, nothing is decided: :class:`UnknownMonitorError`.
    """
    n = len(records)
    if n == 0:
        return []
    if rules.keep_best is not None and not any(rules.monitor in r.metrics for r in records):
        recorded = sorted({k for r in records for k in r.metrics})
        raise UnknownMonitorError(
            f"keep_best ranks checkpoints by {rules.monitor!r}, which none of the {n} checkpoints recorded (they "
            f"recorded: {', '.join(recorded) or 'no metrics'}); nothing was deleted. Fix monitor, or wait until a "
            "checkpoint records it.")
    order = _order(records)
    forced = [records[i].name in protected for i in range(n)]
    forced[order[-1]] = True
    keep = rules.rule().keep(records) if rules.has_keep_rule else [True] * n
    keep = [k or f for k, f in zip(keep, forced)]
    if rules.max_total_bytes is not None:
        total = sum(records[i].size_bytes for i in range(n) if keep[i])
        for i in order:  # oldest first
            if total <= rules.max_total_bytes:
                break
            if keep[i] and not forced[i]:
                keep[i] = False
                total -= records[i].size_bytes
    return keep
