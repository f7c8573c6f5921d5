"""EarlyStopAndSave: stop on a plateau or divergence, with the best and the final state safely on disk."""
from __future__ import annotations

import logging
import math
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch

from ..load import load_weights
from ..policy.conditions import Monitor
from ..policy.enums import Kind
from . import compat
from .base import BaseCheckpointCallback, best_path_at, metric_value

log = logging.getLogger("lightning_ckpt")


class EarlyStopAndSave(BaseCheckpointCallback):
    """Stop training when ``monitor`` stops improving, and guarantee two checkpoints: the best one (tag ``best``,
    written whenever the metric improves; the previous best is deleted once the new one is committed, unless another
    callback also wanted it) and the state at the stop (tag ``early-stop``). With ``restore_best_weights`` the model
    holds the best weights (read back from the verified best checkpoint) when ``fit`` returns.

    The thresholds behave like Lightning's ``EarlyStopping``: ``stopping_threshold`` stops as soon as the metric is
    better than it; ``divergence_threshold`` stops as soon as it is worse; ``check_finite`` stops on NaN/inf.

    Args:
        dirpath: folder for the checkpoints.
        monitor: metric logged with ``self.log``.
        mode: ``"min"`` or ``"max"``.
        patience: checks without improvement before stopping (a check happens when validation ends, or at the end of
            a training epoch when ``check_on_train_epoch_end`` is True).
        min_delta: smallest change that counts as an improvement.
        restore_best_weights: load the best weights into the model when training ends.
        stopping_threshold: stop once the metric is better than this.
        divergence_threshold: stop once the metric is worse than this.
        check_finite: stop when the metric becomes NaN or infinite.
        check_on_train_epoch_end: check at the end of each training epoch instead of at validation end.
        **options: the options every saving callback shares (:class:`~lightning_ckpt.SaveOptions`); ``content``
            applies to the best checkpoint, the early-stop one is always full.
    """

    def __init__(
        self,
        dirpath: Optional[str] = None,
        monitor: Optional[str] = None,
        mode: Literal["min", "max"] = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        restore_best_weights: bool = True,
        stopping_threshold: Optional[float] = None,
        divergence_threshold: Optional[float] = None,
        check_finite: bool = True,
        check_on_train_epoch_end: bool = False,
        **options: Any,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"{type(self).__name__} needs monitor=, the name of a metric logged with self.log "
                             f"(got {monitor!r})")
        super().__init__(dirpath, **options)
        self.spec = Monitor(monitor, mode, min_delta)
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ValueError(f"patience={patience!r} is invalid; it must be a positive integer")
        for name, v in (("stopping_threshold", stopping_threshold), ("divergence_threshold", divergence_threshold)):
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
                raise ValueError(f"{name}={v!r} is invalid; it must be a finite number or None")
        if stopping_threshold is not None and divergence_threshold is not None:
            if Monitor("x", mode).better(divergence_threshold, stopping_threshold) or divergence_threshold == stopping_threshold:
                raise ValueError(
                    f"stopping_threshold={stopping_threshold} and divergence_threshold={divergence_threshold} overlap for "
                    f"mode={mode!r}; the divergence threshold must be worse than the stopping threshold"
                )
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.restore_best_weights = bool(restore_best_weights)
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.check_finite = bool(check_finite)
        self.check_on_train_epoch_end = bool(check_on_train_epoch_end)
        self.best_score: Optional[float] = None
        self.best_step: Optional[int] = None
        self.wait_count = 0
        self.stopped_step: Optional[int] = None
        self.stop_reason: Optional[str] = None
        self._previous_best_steps: list[int] = []

    @property
    def state_key(self) -> str:
        return compat.state_key(self, dirpath=self.dirpath, monitor=self.monitor, mode=self.mode)

    @property
    def best_model_path(self) -> Optional[str]:
        return None if self.best_step is None else best_path_at(self.dirpath, run_name=self.options.run_name, step=self.best_step)

    @property
    def best_rule(self) -> dict:
        """How this callback ranks checkpoints (its best is the one it keeps); recorded in every manifest."""
        return {"monitor": self.monitor, "mode": self.mode, "top_k": 1}

    def protect(self) -> set[str]:
        if self.best_step is None:
            return set()
        return {c.name for c in self._own_checkpoints() if c.step == self.best_step and "best" in c.tags}

    def after_commit(self, result: Any) -> None:
        shared = self._session
        if shared is None or "best" not in result.tags:
            return
        ready = [e for e in self._previous_best_steps if e < result.step]
        self._previous_best_steps = [e for e in self._previous_best_steps if e >= result.step]
        names = [c.name for c in self._own_checkpoints()
                 if c.step in ready and c.step != self.best_step and set(c.tags) <= {"best"}]
        shared.delete(names, reason=f"a better {self.monitor} was saved")

    # ------------------------------------------------------------------ decisions
    def _check(self, trainer: "pl.Trainer"):
        if trainer.sanity_checking or self.stopped_step is not None:
            return None
        value = metric_value(trainer, self.monitor, "EarlyStopAndSave")
        step = int(trainer.global_step)
        tags: set[str] = set()
        reason = None
        if self.check_finite and not math.isfinite(value):
            reason = f"{self.monitor} = {value} is not finite"
        elif self.spec.better(value, self.best_score):
            if self.best_step is not None:
                self._previous_best_steps.append(self.best_step)
            self.best_score, self.best_step, self.wait_count = value, step, 0
            tags.add("best")
            if self.stopping_threshold is not None and self.spec.better(value, self.stopping_threshold):
                reason = f"{self.monitor} = {value:.6g} reached stopping_threshold {self.stopping_threshold}"
        else:
            self.wait_count += 1
            if self.divergence_threshold is not None and self.spec.better(self.divergence_threshold, value):
                reason = f"{self.monitor} = {value:.6g} is worse than divergence_threshold {self.divergence_threshold}"
            elif self.wait_count >= self.patience:
                reason = f"{self.monitor} did not improve for {self.wait_count} checks (best {self.best_score:.6g} at step {self.best_step})"
        if reason is not None:
            self.stopped_step, self.stop_reason = step, reason
            trainer.should_stop = True
            tags.add("early-stop")
            self._announce(f"lightning_ckpt: early stop at step {step}: {reason}")
        if not tags:
            return None
        return tags

    def _want_save_on_validation_end(self, trainer: "pl.Trainer"):
        return None if self.check_on_train_epoch_end else self._check(trainer)

    def _want_save_on_train_epoch_end(self, trainer: "pl.Trainer"):
        return self._check(trainer) if self.check_on_train_epoch_end else None

    def request_save(self, trainer: "pl.Trainer", tags, *, force: bool = False, content: Optional[str] = None,
                     urgent: bool = False) -> None:
        tags = set(tags)
        o = self.options
        if "early-stop" in tags and content is None and (o.content != Kind.FULL or o.partial):
            # the state at the stop is always a full checkpoint; the best one follows `content`
            super().request_save(trainer, {"early-stop"}, force=force, content=Kind.FULL, urgent=urgent)
            tags.discard("early-stop")
            if not tags:
                return
        super().request_save(trainer, tags, force=force, content=content, urgent=urgent)

    def at_end(self, session: Any, trainer: Any) -> None:
        """Every rank, after the last commit of fit (so the final checkpoint holds the final weights)."""
        if self.restore_best_weights and self.best_step is not None:
            path = self.best_model_path
            if path is None:
                log.warning("lightning_ckpt: the best checkpoint of step %s is gone; weights not restored", self.best_step)
                return
            load_weights(path, trainer.lightning_module, strict=not self.options.partial)
            self._announce(f"lightning_ckpt: restored the best weights ({self.monitor}={self.best_score:.6g}, step "
                           f"{self.best_step}) from {path}")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor, "mode": self.mode, "best_score": self.best_score, "best_step": self.best_step,
            "wait_count": self.wait_count, "patience": self.patience,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score = state_dict.get("best_score")
        self.best_step = state_dict.get("best_step")
        self.wait_count = int(state_dict.get("wait_count", 0))
        if isinstance(self.best_score, torch.Tensor):
            self.best_score = float(self.best_score)
