"""What the saving callbacks keep per Trainer and folder, and read from the Trainer: the registry of the folders'
sessions (``SESSIONS``) and of their Lightning-side state (:class:`FolderFit`), monitored metrics, and the Trainer
adapted to the session's :class:`~lightning_ckpt.session.state.SaveContext`.

The session (``session/``) is free of Lightning. What only a Lightning fit has lives in one :class:`FolderFit` per
(Trainer, folder), next to the session and closed with it: the handles that undo what the callbacks hooked into
Lightning (the restore step, the training data set-up), the step plan (which hook ends the current training step),
the resume record and RNG states of the checkpoint the fit resumed from, and the inexact-resume warnings. It also
decides which callback acts where several on one folder see the same hook: the first saving callback to set up
installs the resume interception, the first to see a once-per-fit step takes it; no callback reads another's
private state.
"""
from __future__ import annotations

import time
import weakref
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch

from ..errors import CheckpointError
from ..format.codec import join_key
from ..format.manifest import STATE_KEY
from ..policy.enums import Position
from ..session.session import FolderSession
from ..session.state import SaveContext, warn_inexact
from . import compat, names, resume_exact

SESSIONS: "weakref.WeakKeyDictionary[Any, dict[str, FolderSession]]" = weakref.WeakKeyDictionary()
FITS: "weakref.WeakKeyDictionary[Any, dict[str, FolderFit]]" = weakref.WeakKeyDictionary()


class FolderFit:
    """The Lightning side of one folder's session during one ``fit`` (see the module docstring). Every saving callback
    on the folder holds the same one; its methods act once per fit, for all of them."""

    def __init__(self, session: FolderSession) -> None:
        self.session = session
        # Lightning's restore step intercepted to choose where the fit starts (compat.intercept_resume): installed by
        # the first saving callback at setup, undone at on_train_start (or at teardown if fit never restored)
        self.undo_resume: Optional[Callable[[], bool]] = None
        # Lightning's training data set-up hooked to put back what it does not restore (compat.after_train_data_setup)
        self.undo_data_hook: Optional[Callable[[], None]] = None
        self.configured: Optional[list] = None  # the optimizers' settings as this run configured them (a branch)
        self.step_plan: Optional[tuple] = None  # (step, StepEnd): which hook ends that step (resume_exact.stage_of)
        self.resume_info: Optional[dict] = None  # our entry of the checkpoint this fit resumed from ("resume")
        self.pending_rng: Optional[dict] = None  # its RNG states, restored once the training data is set up
        self.inexact_warned: set = set()  # the reasons a resume would not be exact, warned about once
        self.unwarned: Optional[tuple] = None  # (step, resume record) of a state taken early: warned if it is kept
        self._done: set[str] = set()  # the once-per-fit steps already taken

    def once(self, step: str) -> bool:
        """True for the first callback that reaches ``step`` in this fit."""
        if step in self._done:
            return False
        self._done.add(step)
        return True

    def context(self, trainer: "pl.Trainer", position: str = Position.AFTER_STEP, early: bool = False) -> "TrainerContext":
        return TrainerContext(trainer, position, early, fit=self)

    # ------------------------------------------------------------------ where the fit starts
    def intercept_start(self, trainer: "pl.Trainer", cb: Any) -> None:
        """At setup: the first saving callback on the folder makes Lightning's restore ask ``names.choose_start``."""
        if trainer.state.fn == "fit" and self.once("intercept"):
            self.undo_resume = compat.intercept_resume(trainer, lambda path: names.choose_start(cb, trainer, path))

    def fit_start(self, trainer: "pl.Trainer") -> None:
        if self.undo_resume is not None and self.once("fit_start"):
            self.configured = names.optimizer_settings(trainer)  # before a restore overwrites them

    def train_start(self, trainer: "pl.Trainer") -> None:
        """After Lightning restored (which some strategies do only after on_fit_start)."""
        if not self.once("train_start"):
            return
        session = self.session
        if self.undo_resume is not None:
            ran = self.undo_resume()
            self.undo_resume = None
            if not ran:
                raise CheckpointError(
                    f"{session.key}: Lightning {pl.__version__} did not call the restore step this package hooks "
                    "into, so resume='auto', resume_from and the check for another run's checkpoints would be skipped "
                    f"silently. Use a supported Lightning ({compat.SUPPORTED}) or pass "
                    "ckpt_path=lightning_ckpt.resume_path(dirpath) to fit().")
        if trainer.ckpt_path:
            session.resumed_from = str(trainer.ckpt_path)
        configured, self.configured = self.configured, None
        if session.branched and configured is not None:
            for change in names.apply_branch_settings(trainer, configured):  # a branch runs with its own settings
                session.announce(f"lightning_ckpt: branch {session.options.run_name or ''}: {change}")
        session.last_save_time = time.monotonic()
        if self.resume_info is not None:
            # Lightning decided how to restart; from here its fit loop must act as in a run that never stopped
            compat.end_restart_after_reset(trainer)

    def loaded(self, trainer: "pl.Trainer", checkpoint: dict) -> None:
        """``on_load_checkpoint``: keep the checkpoint's resume record and RNG states, and hook the training data
        set-up to put them back (once for the folder)."""
        session = self.session
        ours = checkpoint.get(STATE_KEY)
        if isinstance(ours, dict) and trainer.state.fn == "fit" and self.undo_data_hook is None:
            self.resume_info = ours.get("resume") if isinstance(ours.get("resume"), dict) else None
            self.pending_rng = ours.get("rng") if isinstance(ours.get("rng"), dict) else None
            # put back what Lightning does not, and the RNG, right after the fit loop set up its training data
            self.undo_data_hook = compat.after_train_data_setup(trainer, lambda: self._data_ready(trainer))
        if session.last_saved_step is None:
            # the step we resumed at is already on disk: do not write it again
            session.last_saved_step = int(checkpoint.get("global_step", -1))

    def _data_ready(self, trainer: "pl.Trainer") -> None:
        self.undo_data_hook = None
        rng, self.pending_rng = self.pending_rng, None
        resume_exact.on_train_data_ready(trainer, self.resume_info, rng)

    def undo(self) -> None:
        """Teardown: undo what is still hooked into Lightning (a fit that never restored, or never started its loop)."""
        if self.undo_resume is not None:
            self.undo_resume()
            self.undo_resume = None
        if self.undo_data_hook is not None:
            self.undo_data_hook()
            self.undo_data_hook = None

    # ------------------------------------------------------------------ inexact resumes
    def resume_noted(self, step: int, summary: Optional[dict], now: bool, speaks: bool) -> None:
        """A save recorded whether a resume from it is exact: warn about each reason it is not once per fit (``now``;
        ``speaks``: this rank says it, rank 0), or, for a state taken early, only if it is the one kept."""
        if now:
            if speaks:
                warn_inexact(self.inexact_warned, summary, step)
            self.unwarned = None
        else:
            self.unwarned = (step, summary) if speaks else None

    def warn_kept(self) -> None:
        """The fit ends in an exception: a state taken before its step's end is the one kept, say so now."""
        if self.unwarned is not None:
            step, record = self.unwarned
            self.unwarned = None
            warn_inexact(self.inexact_warned, record, step)


def fit_of(trainer: Any, dirpath: str) -> Optional[FolderFit]:
    """The Lightning-side state of the folder's session in this Trainer's fit, if one is open."""
    return FITS.get(trainer, {}).get(dirpath)


def register(trainer: Any, fit: FolderFit) -> None:
    SESSIONS.setdefault(trainer, {})[fit.session.key] = fit.session
    FITS.setdefault(trainer, {})[fit.session.key] = fit


def unregister(trainer: Any, fit: FolderFit) -> None:
    SESSIONS.get(trainer, {}).pop(fit.session.key, None)
    FITS.get(trainer, {}).pop(fit.session.key, None)


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

    def __init__(self, trainer: "pl.Trainer", position: str = Position.AFTER_STEP, early: bool = False,
                 fit: Optional[FolderFit] = None) -> None:
        self.trainer = trainer
        self.step = int(trainer.global_step)
        self.epoch = int(trainer.current_epoch)
        self.position = Position(position)  # where the state is taken (policy.enums.MID_EPOCH, EPOCH_END, ...)
        self.early = early  # before the end of its training step (see BaseCheckpointCallback._hook)
        self.fit = fit  # where inexact resumes are warned about (None: not warned)

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

    def resume_noted(self, summary: Optional[dict], now: bool, speaks: bool) -> None:
        """Called by the session after it took a checkpoint's state (see ``FolderSession._save``)."""
        if self.fit is not None:
            self.fit.resume_noted(self.step, summary, now, speaks)
