"""Machinery shared by the saving callbacks: one writer per (trainer, dirpath), the CheckpointIO that reads our
folders, RNG capture and restore, metrics, and waiting for background saves at the end of ``fit``."""
from __future__ import annotations

import logging
import os
import time
import weakref
from typing import Any, Iterable, Literal, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint

from ..errors import CheckpointError
from ..rng import capture_rng, restore_rng
from ..writer import CheckpointWriter, cleanup_partials
from ..writer.writer import validate_name_template
from .io import install_checkpoint_io

log = logging.getLogger("lightning_ckpt")

STATE_KEY = "lightning_ckpt"


class _SharedWriter:
    """One writer and its bookkeeping for every callback of a trainer that saves into the same folder."""

    def __init__(self, writer: CheckpointWriter) -> None:
        self.writer = writer
        self.users = 0
        self.last_saved_step: Optional[int] = None
        self.last_save_time = time.monotonic()


_SHARED: "weakref.WeakKeyDictionary[Any, dict[str, _SharedWriter]]" = weakref.WeakKeyDictionary()
_PENDING_RNG: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


class BaseCheckpointCallback(Checkpoint):
    """Base of the saving callbacks. Subclasses decide *when*; this class knows *how*.

    Args:
        dirpath: folder for this run's checkpoints; created if missing.
        async_save: snapshot into reused host buffers and write in the background (training continues).
        name_template: folder name of each checkpoint, with fields ``{step}`` and ``{epoch}``.
        if_busy: a save requested while the previous one is still being written either ``"wait"``s or is
            ``"skip"``ped.
        fsync: make every file durable before committing (keep on unless the run is throwaway).
    """

    def __init__(
        self,
        dirpath: str,
        *,
        async_save: bool = True,
        name_template: str = "step={step:06d}",
        if_busy: Literal["wait", "skip"] = "wait",
        fsync: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(dirpath, (str, os.PathLike)) or not os.fspath(dirpath):
            raise ValueError(f"dirpath={dirpath!r} is invalid; give the folder where checkpoints go, e.g. 'ckpts/'")
        if if_busy not in ("wait", "skip"):
            raise ValueError(f"if_busy={if_busy!r} is invalid; use 'wait' or 'skip'")
        if not isinstance(async_save, bool):
            raise ValueError(f"async_save={async_save!r} is invalid; use True or False")
        self.dirpath = os.path.abspath(os.fspath(dirpath))
        self.async_save = async_save
        self.name_template = validate_name_template(name_template)
        self.if_busy = if_busy
        self.fsync = fsync
        self._shared: Optional[_SharedWriter] = None

    # ------------------------------------------------------------ Lightning
    @property
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=self.dirpath)

    @property
    def writer(self) -> CheckpointWriter:
        if self._shared is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a Trainer yet")
        return self._shared.writer

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        install_checkpoint_io(trainer)
        if stage != "fit" or self._shared is not None:
            return
        per_trainer = _SHARED.setdefault(trainer, {})
        shared = per_trainer.get(self.dirpath)
        if shared is None:
            shared = _SharedWriter(
                CheckpointWriter(
                    self.dirpath,
                    async_save=self.async_save,
                    name_template=self.name_template,
                    if_busy=self.if_busy,
                    fsync=self.fsync,
                )
            )
            per_trainer[self.dirpath] = shared
            if trainer.is_global_zero:
                shared.writer.prepare_dir()
                cleanup_partials(self.dirpath)
            trainer.strategy.barrier("lightning_ckpt.setup")
        shared.users += 1
        self._shared = shared

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._shared is not None:
            self._shared.last_save_time = time.monotonic()

    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]) -> None:
        ours = checkpoint.get(STATE_KEY)
        if isinstance(ours, dict) and isinstance(ours.get("rng"), dict):
            _PENDING_RNG[trainer] = ours["rng"]
        if self._shared is not None and self._shared.last_saved_step is None:
            # the step we resumed at is already on disk: do not write it again
            self._shared.last_saved_step = int(checkpoint.get("global_step", -1))

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        # Restore RNG states as late as possible: right before the first training step after a resume, where the
        # uninterrupted run was when it saved. Lightning's own set-up (sanity check, iterator creation) may consume
        # random numbers before this point; restoring here makes those draws irrelevant.
        rng = _PENDING_RNG.pop(trainer, None)
        if rng is not None:
            restore_rng(rng)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._wait(raise_errors=True)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        # keep an in-flight save (it becomes a valid checkpoint) but never mask the training error
        self._wait(raise_errors=False)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        shared = self._shared
        if shared is None or stage != "fit":
            return
        self._shared = None
        shared.users -= 1
        if shared.users <= 0:
            per_trainer = _SHARED.get(trainer, {})
            per_trainer.pop(self.dirpath, None)
            self._last_buffer_allocations = shared.writer._buffers.allocations
            self._last_buffer_tensors = len(shared.writer._buffers._buffers)
            try:
                shared.writer.close()
            except CheckpointError as e:  # already reported at on_train_end / on_exception
                log.error("lightning_ckpt: %s", e)

    # ------------------------------------------------------------ saving
    def _wait(self, raise_errors: bool) -> None:
        if self._shared is None:
            return
        try:
            self._shared.writer.wait()
        except CheckpointError as e:
            if raise_errors:
                raise
            log.error("lightning_ckpt: a background save failed: %s", e)

    def save_now(self, trainer: "pl.Trainer", tags: Iterable[str] = ()) -> bool:
        """Save the full training state at the current step. Returns False when skipped (already saved at this
        step, or busy with ``if_busy="skip"``)."""
        shared = self._shared
        if shared is None or trainer.sanity_checking:
            return False
        step = int(trainer.global_step)
        if shared.last_saved_step == step:
            return False
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        checkpoint[STATE_KEY] = {"rng": capture_rng(), "format": 1}
        pl_module = trainer.lightning_module
        hparams = dict(pl_module.hparams) if pl_module is not None and pl_module.hparams else None
        pending = shared.writer.save(
            checkpoint,
            step=step,
            epoch=int(trainer.current_epoch),
            tags=tags,
            metrics=dict(trainer.callback_metrics),
            hparams=hparams,
            meta={"resumed_from": _str_or_none(trainer.ckpt_path)},
        )
        if pending is None:
            return False
        shared.last_saved_step = step
        shared.last_save_time = time.monotonic()
        return True


def _str_or_none(x: Any) -> Optional[str]:
    return None if x is None else str(x)
