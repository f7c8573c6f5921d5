"""Choosing the checkpoint interval from measurements: an overhead budget and the Young/Daly optimum."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional


def overhead_interval(step_s: float, stall_s: float, max_overhead: float) -> int:
    """Smallest interval (in steps) that keeps ``stall_s / (interval * step_s)`` at or under ``max_overhead``."""
    if step_s <= 0:
        return 1
    return max(1, math.ceil(stall_s / (max_overhead * step_s) - 1e-9))


def young_daly_interval(step_s: float, stall_s: float, mtbf_s: float) -> int:
    """Young/Daly: checkpoint every ``sqrt(2 * C * MTBF)`` seconds of work, C the cost of one checkpoint."""
    if step_s <= 0:
        return 1
    return max(1, round(math.sqrt(2.0 * max(stall_s, 1e-9) * mtbf_s) / step_s))


@dataclass
class AdaptiveInterval:
    """Measures the step time and the stall per save and proposes the next interval in steps.

    ``max_overhead`` is the fraction of training time checkpoints may cost (0.05 = 5 %). With ``mtbf_s`` the interval
    is the Young/Daly one, but never shorter than the overhead budget allows.
    """

    max_overhead: float = 0.05
    mtbf_s: Optional[float] = None
    warmup_steps: int = 5
    max_interval: int = 100_000
    step_s: Optional[float] = None
    stall_s: Optional[float] = None
    _alpha: float = field(default=0.2, repr=False)

    def __post_init__(self) -> None:
        if (not isinstance(self.max_overhead, (int, float)) or isinstance(self.max_overhead, bool)
                or not 0 < self.max_overhead < 1):
            raise ValueError(f"max_overhead={self.max_overhead!r} is invalid; it must be a fraction in (0, 1), e.g. 0.05")
        if self.mtbf_s is not None and (not isinstance(self.mtbf_s, (int, float)) or isinstance(self.mtbf_s, bool)
                                        or not math.isfinite(self.mtbf_s) or self.mtbf_s <= 0):
            raise ValueError(f"mtbf_s={self.mtbf_s!r} is invalid; it must be a positive, finite number of seconds or None")

    def observe_step(self, seconds: float) -> None:
        if seconds <= 0:
            return
        self.step_s = seconds if self.step_s is None else (1 - self._alpha) * self.step_s + self._alpha * seconds

    def observe_stall(self, seconds: float) -> None:
        self.stall_s = seconds if self.stall_s is None else (1 - self._alpha) * self.stall_s + self._alpha * seconds

    def interval(self) -> int:
        """Steps until the next save; ``warmup_steps`` until both quantities have been measured."""
        if self.step_s is None or self.stall_s is None:
            return self.warmup_steps
        n = overhead_interval(self.step_s, self.stall_s, self.max_overhead)
        if self.mtbf_s is not None:
            n = max(n, young_daly_interval(self.step_s, self.stall_s, self.mtbf_s))
        return min(n, self.max_interval)
