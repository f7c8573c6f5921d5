"""The saving callbacks' common part: a thin adapter from Lightning's hooks to the folder's :class:`FolderSession`.

- ``setup``: the first callback on a folder opens its session (every rank; the folder's lock, cleanup, node-local
  detection), the others join it. One registry, ``SESSIONS``, maps a Trainer to its sessions; next to each session
  a :class:`~lightning_ckpt.callbacks.context.FolderFit` holds the fit's Lightning-side state for that folder and
  decides which callback acts where several see the same hook (``FITS``).
- Every training hook: each saving callback decides (the subclasses' ``_want_save_on_*``) and requests; once every
  saving callback on the folder has seen the hook, the session writes the state once, with the union of the tags.
- A save takes the state at the end of its training step, the last of our hooks a run that goes on runs in that
  step (see ``resume_exact``); requests of earlier hooks of the step wait for it, those of later hooks of the same
  step add their tags. It is sealed (committed) at the next step boundary.
- On resume, right after Lightning set up the training data, ``resume_exact.on_train_data_ready`` puts back what
  Lightning does not (callback metrics, torchmetrics states, the start of the next epoch, plateau scheduler steps)
  and then the RNG states.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint

from ..read import latest_checkpoint, list_checkpoints, of_run
from ..session.options import SaveOptions, check_dirpath, check_option_names
from ..policy.enums import Hook, Position, Stage, StepEnd
from ..session.session import FolderSession, Participant
from ..session.state import FULL, SaveRequest
from ..store import is_remote
from ..tools.merge import merge_checkpoint
from ..folder.best import best_checkpoints
from . import compat, names, resume_exact
from .ray import attach as attach_ray
from .context import (FITS, SESSIONS, FolderFit, MonitorNotFoundError, TrainerContext, fit_of,  # noqa: F401
                      metric_value, register, session_of, unregister)
from .io import install_checkpoint_io

log = logging.getLogger("lightning_ckpt")



class BaseCheckpointCallback(Checkpoint, Participant):
    """Base of the saving callbacks. Subclasses decide *when* (``_want_save_on_*``); the session knows *how*.

    Args:
        dirpath: folder for this run's checkpoints (created if missing), or ``s3://bucket/prefix``: saves are then
            written to a local staging folder, uploaded, and the staged copy removed once uploaded. Default:
            ``<default_root_dir>/checkpoints`` of the Trainer, as Lightning's ``ModelCheckpoint``.
        **options: the options of :class:`~lightning_ckpt.SaveOptions` (``async_save``, ``name_template``,
            ``backup_uri``, ``resume``, ...), the same for every saving callback.
    """

    saves = True

    def __init__(self, dirpath: Optional[str] = None, **options: Any) -> None:
        super().__init__()
        check_option_names(type(self).__name__, options)
        self.options = SaveOptions(**options)
        self.dirpath: Optional[str] = check_dirpath(dirpath) if dirpath is not None else None  # None: at setup
        if self.dirpath is not None and is_remote(self.dirpath):
            if self.options.merge_on_train_end:
                raise ValueError("merge_on_train_end needs a local dirpath; with an s3:// dirpath run "
                                 "`lightning-ckpt merge s3://.../<checkpoint> OUT` after training")
            if any(loc.uri == self.dirpath for loc in self.options.locations):
                raise ValueError(f"backup_uri repeats dirpath {self.dirpath}; the checkpoints already go there")
        self._fit: Optional[FolderFit] = None  # the folder's Lightning-side state in the current fit (shared)

    # ------------------------------------------------------------ subclass hooks: return tags to save, or None
    def _want_save_on_train_batch_end(self, trainer: "pl.Trainer") -> Optional[Iterable[str]]:
        return None

    def _want_save_on_validation_end(self, trainer: "pl.Trainer") -> Optional[Iterable[str]]:
        return None

    def _want_save_on_train_epoch_end(self, trainer: "pl.Trainer") -> Optional[Iterable[str]]:
        return None

    def _want_save_on_train_end(self, trainer: "pl.Trainer") -> Optional[Iterable[str]]:
        return None

    # ------------------------------------------------------------ Lightning
    @property
    def _session(self) -> Optional[FolderSession]:
        """The folder's session during ``fit`` (None outside it)."""
        return self._fit.session if self._fit is not None else None

    @property
    def state_key(self) -> str:
        return compat.state_key(self, dirpath=self.dirpath)

    @property
    def writer(self) -> Any:
        if self._session is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a Trainer yet")
        return self._session.writer

    @property
    def best_model_path(self) -> Optional[str]:
        """The current best checkpoint of this callback's folder (from the manifests), or None (Lightning's name)."""
        if self.dirpath is None:
            return None
        best = best_checkpoints(self.dirpath, run_name=self.options.run_name)
        return best[0].path if best else None

    @property
    def last_model_path(self) -> Optional[str]:
        """The newest committed checkpoint of this callback's folder (not verified), or None (Lightning's name)."""
        if self.dirpath is None:
            return None
        return latest_checkpoint(self.dirpath, verify=False, run_name=self.options.run_name)

    def _announce(self, msg: str) -> None:
        (self._session.announce if self._session is not None else log.info)(msg)

    def _own_checkpoints(self) -> list:
        """The committed checkpoints of this callback's run in its folder (several runs may share one)."""
        return of_run(list_checkpoints(self.dirpath), self.options.run_name)

    def resolve_ckpt_path(self, trainer: "pl.Trainer", name: str, others: list) -> Optional[str]:
        """``fit/validate/test(ckpt_path="last" | "best")``: called by Lightning's path resolver (see
        ``compat.install_ckpt_path_names``) before any hook runs."""
        return names.resolve_ckpt_path(self, trainer, name, others)

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        compat.check(trainer)
        install_checkpoint_io(trainer)
        if stage != "fit" or self._fit is not None:
            return
        if self.dirpath is None:
            self.dirpath = names.default_dirpath(trainer)
        fit = fit_of(trainer, self.dirpath)
        if fit is None:
            session = FolderSession(self.dirpath, self.options)
            session.open()  # every rank: the folder may be local to each node
            fit = FolderFit(session)
            register(trainer, fit)
            attach_ray(session)  # under Ray Train / Tune: report each commit to Ray (a reference)
            trainer.strategy.barrier("lightning_ckpt.setup")
        session = fit.session
        session.join(self, self.options)
        self._fit = fit
        if self.options.verbose:
            from lightning.pytorch.utilities.rank_zero import rank_zero_info

            session.announce = rank_zero_info  # printed on rank 0 where Lightning prints its own lines
        session.add_backups(self.options.locations, uploading=trainer.is_global_zero)
        # where the fit starts (ckpt_path, resume="auto", resume_from, or fresh) is decided when Lightning restores
        fit.intercept_start(trainer, self)

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._fit is not None:
            self._fit.fit_start(trainer)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._fit is not None:
            self._fit.train_start(trainer)

    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]) -> None:
        if self._fit is not None:
            self._fit.loaded(trainer, checkpoint)

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        fit = self._fit
        if fit is None:
            return
        session = fit.session
        if session.requests:  # a hook we expected later in the last step did not come; save what was asked
            log.warning("lightning_ckpt: saving requests of step %s late (the step's last hook did not come)",
                        trainer.global_step)
            session.flush(fit.context(trainer, Position.LATE))
        session.guard(session.writer.seal)  # a step boundary: the previous step's save may commit now
        if session.arrive(self, Hook.BATCH_START):
            _report(trainer, session)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int) -> None:
        self._hook(trainer, self._want_save_on_train_batch_end, hook=Hook.BATCH_END)

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._hook(trainer, self._want_save_on_validation_end, hook=Hook.VALIDATION_END)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._hook(trainer, self._want_save_on_train_epoch_end, hook=Hook.EPOCH_END)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._hook(trainer, self._want_save_on_train_end, hook=Hook.TRAIN_END)
        fit = self._fit
        if fit is None or not fit.session.arrive(self, Hook.TRAIN_END_FINISH):
            return
        session = fit.session
        session.wait(raise_errors=session.on_save_error != "continue")
        trainer.strategy.barrier("lightning_ckpt.train_end")  # every rank sees the last commit
        _report(trainer, session)
        session.finish(trainer)
        if any(getattr(p, "options", None) is not None and p.options.merge_on_train_end for p in session.participants) \
                and trainer.is_global_zero:
            _merge_latest(session)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        fit = self._fit
        if fit is None:
            return
        session = fit.session
        session.requests.clear()
        # keep a save that was fully requested (it becomes a valid checkpoint) but never mask the training error
        session.wait(raise_errors=False)
        fit.warn_kept()  # a state taken before its step's end is the one kept: say so now
        if session.arrive(self, Hook.EXCEPTION):
            session.record_failure(exception)
            _end(trainer, fit)  # Lightning calls no teardown hook after an exception

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        fit = self._fit
        if fit is None:
            return
        fit.undo()  # a fit that never restored, or never started its loop: undo what is hooked into Lightning
        if stage != "fit":
            return
        stats = fit.session.writer.buffer_stats()
        self._last_buffer_allocations, self._last_buffer_tensors = stats.allocations, stats.tensors
        self._fit = None
        if fit.session.leave(self):
            _end(trainer, fit)

    def _condition_allows(self, trainer: "pl.Trainer") -> bool:
        """Whether a save this callback asks for should happen (PeriodicCheckpoint's conditional saving)."""
        return True

    # ------------------------------------------------------------ request / flush
    def _hook(self, trainer: "pl.Trainer", want: Any, hook: Hook) -> None:
        fit = self._fit
        if fit is None:
            return
        session = fit.session
        if hook == Hook.BATCH_END and compat.accumulating(trainer):
            fit.step_plan = (int(trainer.global_step), StepEnd.ACCUMULATING)
            session.arrive(self, hook)  # gradient accumulation: not a step boundary, nothing is decided here
            return
        stage = resume_exact.stage_of(trainer, fit, hook)
        tags = want(trainer)
        if tags is not None:
            self.request_save(trainer, tags)
        if not session.arrive(self, hook):
            return
        if stage == Stage.END and not any(r.group == FULL for r in session.requests) and \
                compat.fit_ends_after_step(trainer, epoch_end=hook == Hook.EPOCH_END):
            # the fit ends after this step and nothing saves its full state: its final save takes the state here, not
            # after Lightning's end-of-fit hooks (an epoch end it runs when it stops mid-epoch, averaged weights copied
            # into the model, ...); with a full save of this step, on_train_end adds its tag to that save
            for p in session.saving:
                if isinstance(p, BaseCheckpointCallback):
                    p.request_final_save(trainer)
        if stage == Stage.WAIT:
            if session.urgent:  # a preemption: take the state now as well, Lightning may stop before the step's end
                session.flush(fit.context(trainer, hook, early=True), keep=True)  # (the step's end replaces it)
            return
        if stage == Stage.END:
            position = Position(hook)
        else:
            position = Position.TRAIN_END if hook == Hook.TRAIN_END else Position.AFTER_STEP
        session.flush(fit.context(trainer, position), after=stage == Stage.AFTER)

    def request_final_save(self, trainer: "pl.Trainer") -> None:
        """Request this callback's end-of-fit save now: the fit ends after the current step (see ``_hook``)."""
        tags = self._want_save_on_train_end(trainer)
        if tags is not None:
            self.request_save(trainer, tags)

    def request_save(self, trainer: "pl.Trainer", tags: Iterable[str], *, force: bool = False,
                     content: Optional[str] = None, urgent: bool = False) -> None:
        """Ask for a save at the current step; it is written once per hook for all callbacks on this folder.
        ``content``: this content (no tensor selection) instead of the callback's own; ``urgent``: commit it before
        the hook returns."""
        session = self._session
        if session is None or trainer.sanity_checking:
            return
        if not force and not self._condition_allows(trainer):
            return
        o = self.options
        sync = not o.async_save
        if content is not None:
            session.request(SaveRequest(set(tags), content, urgent=urgent, sync=sync))
            return
        session.request(SaveRequest(set(tags), o.content, o.include, o.exclude, urgent=urgent, sync=sync))


def _end(trainer: Any, fit: FolderFit) -> None:
    """The fit is over for this folder: close its session (writer, threads, lock) and detach its callbacks."""
    unregister(trainer, fit)
    fit.undo()  # after an exception Lightning runs no teardown: nothing of this fit stays hooked into the Trainer
    for p in fit.session.participants:
        if isinstance(p, BaseCheckpointCallback):
            p._fit = None
    fit.session.close()


def best_path_at(dirpath: str, *, step: int, run_name: Optional[str] = None) -> Optional[str]:
    """The committed checkpoint of ``step`` tagged ``best`` in ``dirpath`` (of run ``run_name``), if any."""
    for c in reversed(of_run(list_checkpoints(dirpath), run_name)):
        if c.step == step and "best" in c.tags:
            return c.path
    return None


def _merge_latest(session: FolderSession) -> None:
    import os

    latest = latest_checkpoint(session.key, verify=False)
    if latest is None:
        return
    out = os.path.join(session.dirpath, "merged", "model.safetensors")
    res = merge_checkpoint(latest, out)
    log.info("lightning_ckpt: merged %s into %s (%d tensors, %.1f MB, %.2fs)", latest, out, res.tensors,
             res.bytes / 1e6, res.seconds)


def _report(trainer: "pl.Trainer", session: FolderSession) -> None:
    """Report committed saves to the Trainer's loggers under ``checkpoint/`` (on the training thread)."""
    while session.committed:
        res = session.committed.pop(0)
        if not trainer.is_global_zero:
            continue
        stall = session.stalls.pop(res.step, res.snapshot_s)
        metrics = {
            "checkpoint/bytes": float(res.bytes),
            "checkpoint/stall_s": float(stall),
            "checkpoint/write_s": float(res.write_s),
            "checkpoint/throughput_gbps": float(res.bytes / res.write_s / 1e9) if res.write_s > 0 else 0.0,
            "checkpoint/step": float(res.step),
        }
        for lg in trainer.loggers:
            try:
                lg.log_metrics(metrics, step=res.step)
            except Exception as e:  # noqa: BLE001 - a logger problem must not stop training
                log.error("lightning_ckpt: logger %s failed: %r", type(lg).__name__, e)
    for reporter in session.reporters:  # every rank (Ray: every rank reports each sealed save)
        reporter.report(trainer)
