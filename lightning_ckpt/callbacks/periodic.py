"""PeriodicCheckpoint: save every N steps, N epochs, N seconds or at an adaptive interval, and at the end."""
from __future__ import annotations

import logging
import time
from typing import Any, Literal, Optional

import lightning.pytorch as pl

from ..policy.adaptive import AdaptiveInterval
from ..policy.triggers import SaveTrigger
from ..policy.conditions import Monitor, moved_enough
from ..writer.options import check_bool, check_fraction
from .base import BaseCheckpointCallback, metric_value

log = logging.getLogger("lightning_ckpt")


class PeriodicCheckpoint(BaseCheckpointCallback):
    """Save the training state on a schedule, without stalling training (``async_save=True``).

    Exactly one of ``every_n_train_steps``, ``every_n_epochs``, ``every_n_seconds``, ``every="auto"`` may be set;
    none means every epoch. A checkpoint is also written when training ends (tag ``final``); when the last step was
    just saved, that checkpoint gets the tag instead.

    Example::

        trainer = L.Trainer(callbacks=[PeriodicCheckpoint("ckpts/", every_n_train_steps=500)])
        trainer.fit(model, data)
        trainer.fit(model, data, ckpt_path=latest_checkpoint("ckpts/"))

    Args:
        dirpath: folder for this run's checkpoints (created if missing), or ``s3://bucket/prefix``.
        every_n_train_steps: save after every N optimizer steps.
        every_n_epochs: save at the end of every N-th training epoch.
        every_n_seconds: save at the first step boundary at least N seconds after the previous save.
        every: ``"auto"``: measure the training stall of each save and the step time, and save as often as keeps
            the stall under ``max_overhead`` of the training time (or at the Young/Daly interval when ``mtbf_s`` is
            given, never more often than the budget allows). The chosen interval is logged as
            ``checkpoint/interval_steps``.
        max_overhead: fraction of training time that saves may cost with ``every="auto"`` (0.05 = 5 %).
        mtbf_s: mean time between failures in seconds, for the Young/Daly interval with ``every="auto"``.
        save_on_train_end: also save when ``fit`` finishes (tag ``final``).
        monitor: metric for conditional saving (``only_on_improvement`` / ``on_change``).
        mode: ``"min"`` or ``"max"``: the direction in which ``monitor`` improves.
        min_delta: smallest change of ``monitor`` that counts as an improvement.
        only_on_improvement: when a save is due, skip it unless ``monitor`` improved on every earlier save of this
            callback.
        on_change: when a save is due, skip it unless ``monitor`` moved by more than this fraction since the last.
        **options: the options every saving callback shares (:class:`~lightning_ckpt.SaveOptions`): ``async_save``,
            ``name_template``, ``content``, ``backup_uri``, ``resume``, ...
    """

    def __init__(
        self,
        dirpath: Optional[str] = None,
        every_n_train_steps: Optional[int] = None,
        every_n_epochs: Optional[int] = None,
        every_n_seconds: Optional[float] = None,
        every: Optional[Literal["auto"]] = None,
        max_overhead: float = 0.05,
        mtbf_s: Optional[float] = None,
        save_on_train_end: bool = True,
        monitor: Optional[str] = None,
        mode: Literal["min", "max"] = "min",
        min_delta: float = 0.0,
        only_on_improvement: bool = False,
        on_change: Optional[float] = None,
        **options: Any,
    ) -> None:
        super().__init__(dirpath, **options)
        self.monitor_spec = Monitor(monitor or "x", mode, min_delta)  # mode and min_delta, even without a monitor
        self.monitor, self.mode, self.min_delta = monitor, mode, min_delta
        self.only_on_improvement = check_bool("only_on_improvement", only_on_improvement)
        self.on_change = check_fraction("on_change", on_change, optional=True)
        if only_on_improvement and on_change is not None:
            raise ValueError("only_on_improvement and on_change are mutually exclusive; set one of them")
        if (only_on_improvement or on_change is not None) and not monitor:
            raise ValueError("only_on_improvement/on_change need monitor='<metric name>'")
        self._cond_best: Optional[float] = None  # best value at a save of this callback
        self._cond_last: Optional[float] = None  # value at this callback's last save
        if every not in (None, "auto"):
            raise ValueError(f"every={every!r} is invalid; the only value is 'auto' (or use every_n_train_steps=...)")
        if every == "auto":
            others = [n for n, v in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs), ("every_n_seconds", every_n_seconds)) if v is not None]
            if others:
                raise ValueError(f"every='auto' and {others[0]} are both set; set exactly one trigger")
            self.adaptive: Optional[AdaptiveInterval] = AdaptiveInterval(max_overhead=max_overhead, mtbf_s=mtbf_s)
            self.trigger = SaveTrigger(every_n_train_steps=1)  # validated placeholder; the adaptive interval decides
        else:
            if mtbf_s is not None:
                raise ValueError("mtbf_s is only used with every='auto'")
            self.adaptive = None
            self.trigger = SaveTrigger(every_n_train_steps, every_n_epochs, every_n_seconds)
        self.every = every
        self.save_on_train_end = check_bool("save_on_train_end", save_on_train_end)
        self.interval_steps: Optional[int] = None
        self._next_auto_step: Optional[int] = None
        self._last_batch_end: Optional[float] = None
        self._awaiting_stall: Optional[int] = None

    # ---------------------------------------------------------------- conditional saving
    def _condition_allows(self, trainer: "pl.Trainer") -> bool:
        if not (self.only_on_improvement or self.on_change is not None):
            return True
        v = metric_value(trainer, self.monitor_spec.monitor, type(self).__name__)
        if self.only_on_improvement:
            ok = self.monitor_spec.better(v, self._cond_best)
        else:
            ok = moved_enough(v, self._cond_last, float(self.on_change))  # type: ignore[arg-type]
        if ok:
            self._cond_last = v
            if self.monitor_spec.better(v, self._cond_best):
                self._cond_best = v
        return ok

    # ---------------------------------------------------------------- every="auto"
    def _auto_due(self, trainer: "pl.Trainer") -> bool:
        """Measure, then decide. Step time is the time between batch ends minus our own stall."""
        ad, shared = self.adaptive, self._session
        assert ad is not None and shared is not None
        now = time.perf_counter()
        stall = 0.0
        if self._awaiting_stall is not None:
            if shared.last_saved_step == self._awaiting_stall and shared.last_stall_s is not None:
                stall = shared.last_stall_s
                ad.observe_stall(stall)
        if self._last_batch_end is not None:
            ad.observe_step(now - self._last_batch_end - stall)
        self._last_batch_end = now
        if self._awaiting_stall is not None:
            self._schedule_next(trainer, from_step=self._awaiting_stall)
            self._awaiting_stall = None
        if self._next_auto_step is None:
            self._next_auto_step = ad.interval()
        return trainer.global_step >= self._next_auto_step and trainer.global_step != shared.last_saved_step

    def _schedule_next(self, trainer: "pl.Trainer", from_step: int) -> None:
        ad = self.adaptive
        assert ad is not None
        n = int(trainer.strategy.broadcast(ad.interval(), src=0))
        if n != self.interval_steps:
            log.info(
                "lightning_ckpt: checkpoint interval is now %d steps (step %.4fs, stall per save %.4fs, budget %.1f%%%s)",
                n, ad.step_s or 0.0, ad.stall_s or 0.0, 100 * ad.max_overhead,
                f", MTBF {ad.mtbf_s:.0f}s" if ad.mtbf_s else "",
            )
            for lg in trainer.loggers:
                lg.log_metrics({"checkpoint/interval_steps": float(n)}, step=trainer.global_step)
        self.interval_steps = n
        self._next_auto_step = from_step + n

    def _want_save_on_train_batch_end(self, trainer: "pl.Trainer"):
        shared = self._session
        if shared is None:
            return None
        if self.adaptive is not None:
            due = bool(trainer.strategy.broadcast(self._auto_due(trainer), src=0))
            if due:
                self._awaiting_stall = trainer.global_step
                return ("periodic",)
            return None
        due = self.trigger.due_on_step(trainer.global_step, shared.last_saved_step, time.monotonic(), shared.last_save_time)
        if self.trigger.every_n_seconds is not None:
            due = bool(trainer.strategy.broadcast(due, src=0))  # ranks must agree on a wall-clock decision
        return ("periodic",) if due else None

    def _want_save_on_train_epoch_end(self, trainer: "pl.Trainer"):
        shared = self._session
        if shared is None or self.adaptive is not None:
            return None
        if self.trigger.due_on_epoch_end(trainer.current_epoch, trainer.global_step, shared.last_saved_step):
            return ("periodic",)
        return None

    def _want_save_on_train_end(self, trainer: "pl.Trainer"):
        return ("final",) if self.save_on_train_end else None

    def state_dict(self) -> dict[str, Any]:
        return {"dirpath": self.dirpath, "interval_steps": self.interval_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.interval_steps = state_dict.get("interval_steps")
