"""When to save: every N training steps, every N epochs, or every N seconds."""
from __future__ import annotations

from dataclasses import dataclass


def _check_positive(name: str, value, kind: type) -> None:
    if value is None:
        return
    ok = isinstance(value, kind) and not isinstance(value, bool) and value > 0
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if not ok:
        what = "a positive integer" if kind is int else "a positive number of seconds"
        raise ValueError(f"{name}={value!r} is invalid; it must be {what} or None")


@dataclass(frozen=True)
class SaveTrigger:
    """Exactly one of the three may be set; none set means every epoch.

    Attributes:
        every_n_train_steps: save when ``global_step`` (optimizer steps) is a multiple of this.
        every_n_epochs: save at the end of every N-th training epoch.
        every_n_seconds: save at the first step boundary at least this many seconds after the previous save
            (or the start of training).
    """

    every_n_train_steps: int | None = None
    every_n_epochs: int | None = None
    every_n_seconds: float | None = None

    def __post_init__(self) -> None:
        _check_positive("every_n_train_steps", self.every_n_train_steps, int)
        _check_positive("every_n_epochs", self.every_n_epochs, int)
        _check_positive("every_n_seconds", self.every_n_seconds, float)
        set_ = [n for n in ("every_n_train_steps", "every_n_epochs", "every_n_seconds") if getattr(self, n) is not None]
        if len(set_) > 1:
            raise ValueError(
                f"{' and '.join(set_)} are both set; set exactly one of every_n_train_steps, every_n_epochs, "
                "every_n_seconds (or none, which means every epoch)"
            )
        if not set_:
            object.__setattr__(self, "every_n_epochs", 1)

    def due_on_step(self, global_step: int, last_saved_step: int | None, now: float, last_save_time: float) -> bool:
        """At the end of a training batch, after ``global_step`` optimizer steps."""
        if last_saved_step == global_step or global_step == 0:
            return False
        if self.every_n_train_steps is not None:
            return global_step % self.every_n_train_steps == 0
        if self.every_n_seconds is not None:
            return now - last_save_time >= self.every_n_seconds
        return False

    def due_on_epoch_end(self, epoch: int, global_step: int, last_saved_step: int | None) -> bool:
        """At the end of training epoch ``epoch`` (0-based)."""
        if self.every_n_epochs is None or last_saved_step == global_step:
            return False
        return (epoch + 1) % self.every_n_epochs == 0
