"""PeriodicCheckpoint: save every N steps, N epochs or N seconds, and once at the end of training."""
from __future__ import annotations

import time
from typing import Any, Literal, Optional

import lightning.pytorch as pl

from ..policy.triggers import SaveTrigger
from .base import BaseCheckpointCallback


class PeriodicCheckpoint(BaseCheckpointCallback):
    """Save the full training state on a fixed schedule, without stalling training (``async_save=True``).

    Exactly one of ``every_n_train_steps``, ``every_n_epochs``, ``every_n_seconds`` may be set; none means every
    epoch. A checkpoint is also written when training ends (tag ``final``) unless one was just written at that step.

    Example::

        trainer = L.Trainer(callbacks=[PeriodicCheckpoint("ckpts/", every_n_train_steps=500)])
        trainer.fit(model, data)
        trainer.fit(model, data, ckpt_path=latest_checkpoint("ckpts/"))

    Args:
        dirpath: folder for this run's checkpoints; created if missing.
        every_n_train_steps: save after every N optimizer steps.
        every_n_epochs: save at the end of every N-th training epoch.
        every_n_seconds: save at the first step boundary at least N seconds after the previous save.
        async_save: snapshot into reused host buffers and write in the background.
        save_on_train_end: also save when ``fit`` finishes (tag ``final``).
        name_template: folder name of each checkpoint, fields ``{step}`` and ``{epoch}``.
        if_busy: ``"wait"`` for the previous save, or ``"skip"`` the new one, when a save is still being written.
        fsync: make files durable before the commit.
    """

    def __init__(
        self,
        dirpath: str,
        every_n_train_steps: Optional[int] = None,
        every_n_epochs: Optional[int] = None,
        every_n_seconds: Optional[float] = None,
        async_save: bool = True,
        save_on_train_end: bool = True,
        name_template: str = "step={step:06d}",
        if_busy: Literal["wait", "skip"] = "wait",
        fsync: bool = True,
    ) -> None:
        super().__init__(dirpath, async_save=async_save, name_template=name_template, if_busy=if_busy, fsync=fsync)
        self.trigger = SaveTrigger(every_n_train_steps, every_n_epochs, every_n_seconds)
        self.save_on_train_end = bool(save_on_train_end)

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        shared = self._shared
        if shared is None:
            return
        due = self.trigger.due_on_step(trainer.global_step, shared.last_saved_step, time.monotonic(), shared.last_save_time)
        if self.trigger.every_n_seconds is not None:
            due = bool(trainer.strategy.broadcast(due, src=0))  # ranks must agree on a wall-clock decision
        if due:
            self.save_now(trainer, tags=("periodic",))

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        shared = self._shared
        if shared is None:
            return
        if self.trigger.due_on_epoch_end(trainer.current_epoch, trainer.global_step, shared.last_saved_step):
            self.save_now(trainer, tags=("periodic",))

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.save_on_train_end:
            self.save_now(trainer, tags=("final",))
        super().on_train_end(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        shared = self._shared
        return {"dirpath": self.dirpath, "last_saved_step": None if shared is None else shared.last_saved_step}
