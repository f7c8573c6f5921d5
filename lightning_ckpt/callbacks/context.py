"""What the saving callbacks read from the Trainer: the session registry, monitored metrics, and the Trainer adapted
to the session's :class:`~lightning_ckpt.session.state.SaveContext`."""
from __future__ import annotations

import weakref
from typing import Any, Optional

import lightning.pytorch as pl
import torch

from ..errors import CheckpointError
from ..format.codec import join_key
from ..session.session import FolderSession, SaveContext
from . import compat, resume_exact

SESSIONS: "weakref.WeakKeyDictionary[Any, dict[str, FolderSession]]" = weakref.WeakKeyDictionary()


class MonitorNotFoundError(CheckpointError, KeyError):
    """The monitored metric was never logged."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def session_of(trainer: Any, dirpath: str, who: str) -> FolderSession:
    """The session of the saving callbacks on ``dirpath``; a clear error when there is none."""
    session = SESSIONS.get(trainer, {}).get(dirpath)
    if session is None:
        raise ValueError(f"{who}({dirpath!r}) has no saving callback on that folder; add e.g. "
                         f"PeriodicCheckpoint({dirpath!r}, ...) to the same Trainer")
    return session


def metric_value(trainer: "pl.Trainer", monitor: str, who: str) -> float:
    """The monitored value as rank 0 sees it (broadcast, so every rank takes the same save decisions)."""
    metrics = trainer.callback_metrics
    present = monitor in metrics
    value = None
    if present:
        v = metrics[monitor]
        value = float(v.item() if isinstance(v, torch.Tensor) else v)
    logged = sorted(metrics)
    if trainer.world_size > 1:
        present, value, logged = trainer.strategy.broadcast((present, value, logged), src=0)
    if not present:
        raise MonitorNotFoundError(
            f"{who} monitors {monitor!r}, which was not logged. Metrics logged so far: "
            f"{', '.join(logged) if logged else '(none)'}. Log it with self.log({monitor!r}, value) or fix `monitor`."
        )
    return float(value)


class TrainerContext(SaveContext):
    """What a save needs from the Trainer (see :class:`~lightning_ckpt.session.session.SaveContext`)."""

    def __init__(self, trainer: "pl.Trainer", position: str = "after_step", early: bool = False) -> None:
        self.trainer = trainer
        self.step = int(trainer.global_step)
        self.epoch = int(trainer.current_epoch)
        self.position = position  # the hook the state is taken in (resume_exact.MID_EPOCH, "epoch_end", ...)
        self.early = early  # before the end of its training step (see BaseCheckpointCallback._hook)

    def metrics(self) -> dict:
        return dict(self.trainer.callback_metrics)

    def hparams(self) -> Optional[dict]:
        module = self.trainer.lightning_module
        return dict(module.hparams) if module is not None and module.hparams else None

    def dump(self, weights_only: bool) -> dict:
        return compat.dump_checkpoint(self.trainer, weights_only)

    def stable_keys(self) -> set[str]:
        """Frozen parameters and buffers of the module: expected to stay as they are (deduplicated saves)."""
        module = self.trainer.lightning_module
        if module is None:
            return set()
        names = [n for n, p in module.named_parameters() if not p.requires_grad]
        names += [n for n, _ in module.named_buffers()]
        return {join_key(("state_dict", n)) for n in names}

    def any_rank(self, flag: bool) -> bool:
        return bool(self.trainer.strategy.reduce_boolean_decision(flag, all=False))

    def resume_state(self, after: bool = False) -> dict:
        return resume_exact.resume_state(self.trainer, self.position, after, self.early)
