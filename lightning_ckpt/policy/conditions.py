"""Monitored-metric decisions: is a value an improvement, did it move enough since the last save."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Monitor:
    """A logged metric and the direction in which it improves.

    Attributes:
        monitor: name of the metric as logged with ``self.log``.
        mode: ``"min"`` (lower is better) or ``"max"``.
        min_delta: smallest change that counts as an improvement (absolute, in the metric's units).
    """

    monitor: str
    mode: str = "min"
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ValueError(f"monitor={self.monitor!r} is invalid; give the name of a metric logged with self.log")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode={self.mode!r} is invalid; use 'min' or 'max'")
        if not isinstance(self.min_delta, (int, float)) or isinstance(self.min_delta, bool) or self.min_delta < 0 or not math.isfinite(self.min_delta):
            raise ValueError(f"min_delta={self.min_delta!r} is invalid; it must be a finite number >= 0")

    def better(self, value: float, reference: Optional[float]) -> bool:
        """True when ``value`` improves on ``reference`` by more than ``min_delta`` (any finite value beats None)."""
        if value is None or not math.isfinite(value):
            return False
        if reference is None or not math.isfinite(reference):
            return True
        if self.mode == "min":
            return value < reference - self.min_delta
        return value > reference + self.min_delta

    def sort_key(self, value: float) -> float:
        """Smaller is better for every mode."""
        if value is None or not math.isfinite(value):
            return math.inf
        return value if self.mode == "min" else -value


def moved_enough(value: float, last: Optional[float], relative: float) -> bool:
    """True when ``value`` differs from ``last`` by more than ``relative`` times ``|last|`` (always True at first)."""
    if last is None:
        return True
    if value is None or not math.isfinite(value) or not math.isfinite(last):
        return value != last
    scale = abs(last) if last != 0 else 1e-12
    return abs(value - last) / scale > relative
