"""Hyperparameter search with Optuna (SQLite storage) where every trial checkpoints and a killed study resumes.

One cohesive thing (hence over 400 lines): the study runner, its trial bookkeeping and its retention act on the same
Optuna storage and folders under one lock.

Layout under ``root_dir``::

    study.db                      Optuna's SQLite storage (default ``storage``)
    trials/<key>/ckpts/           the trial's checkpoints (PeriodicCheckpoint + BestMetricCheckpoint, one writer)
    trials/<key>/                 free for the objective's own files (logs, ...)
    best/best.json                the study's best trial: number, key, params, value, its best checkpoint
    best/model.safetensors        that checkpoint's weights, merged (clean names, loadable without this package)

Resume: the study runs in one worker process (a lock file enforces it). Any trial still ``RUNNING`` when
:meth:`CheckpointedStudy.optimize` starts was interrupted (killed, preempted), and so was one that Ctrl-C failed: it is
marked ``FAIL`` (user attr ``lightning_ckpt.interrupted``), its parameters are enqueued again with its folder key, and
the new trial resumes from the newest committed checkpoint of that folder (``run.ckpt_path``). Finished trials are never rerun: ``n_trials`` counts the study's finished trials (complete or
pruned) over all processes, not the trials of one call.

Retention: after every trial, the folders of pruned trials and of complete trials outside the ``keep_top_n`` best
are removed (``keep="best"``); ``keep="all"`` removes nothing. The study's best trial is always kept.

Example::

    study = CheckpointedStudy("runs/hpo", "mlp", monitor="val_loss", direction="minimize")

    def objective(trial, run):
        model = DemoModel(lr=trial.suggest_float("lr", 1e-3, 1e-1, log=True))
        trainer = pl.Trainer(max_steps=200, callbacks=run.callbacks, logger=False)
        trainer.fit(model, DemoDataModule(), ckpt_path=run.ckpt_path)   # None on a fresh trial
        return run.best_value                                            # best val_loss of this trial

    study.optimize(objective, n_trials=20)
    print(study.best()["value"], study.best()["model"])
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

import lightning.pytorch as pl

try:
    import optuna
    from optuna.trial import FrozenTrial, TrialState
except ImportError as _e:  # pragma: no cover - exercised only without the extra
    raise ImportError("lightning_ckpt.hpo needs optuna: pip install 'lightning-ckpt[hpo]'") from _e

from ..callbacks import BestMetricCheckpoint, PeriodicCheckpoint
from ..callbacks.base import metric_value
from ..errors import CheckpointError
from ..read import latest_checkpoint, list_checkpoints
from ..store import LocalStore
from ..store.fs import OPS, read_member
from ..store.lock import FolderBusyError
from ..tools.merge import merge_checkpoint

log = logging.getLogger("lightning_ckpt")

KEY_ATTR = "lightning_ckpt.key"  # user attr: the trial's folder key (kept when an interrupted trial is re-enqueued)
RESUMES_ATTR = "lightning_ckpt.resumes_trial"  # user attr: number of the interrupted trial this one continues
INTERRUPTED_ATTR = "lightning_ckpt.interrupted"  # user attr: the trial was interrupted (killed, Ctrl-C), not failed


class StudyLockedError(FolderBusyError, RuntimeError):
    """Another live process is already running :meth:`CheckpointedStudy.optimize` on the same ``root_dir``."""


class OptunaPruning(pl.Callback):
    """Reports ``monitor`` to the Optuna trial when validation ends (step = ``global_step``) and raises
    ``optuna.TrialPruned`` when the study's pruner says so. Sanity-check validation is not reported."""

    def __init__(self, trial: "optuna.Trial", monitor: str, reported_steps: Optional[set[int]] = None) -> None:
        self.trial = trial
        self.monitor = monitor
        self.reported_steps: set[int] = set(reported_steps or ())

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = metric_value(trainer, self.monitor, "OptunaPruning")
        step = int(trainer.global_step)
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"{self.monitor}={value} at step {step} is not finite")
        if step in self.reported_steps:  # already reported (before a resume, or validated twice at one step)
            return
        self.trial.report(value, step)
        self.reported_steps.add(step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} with {self.monitor}={value:.6g}")


@dataclass
class TrialRun:
    """What the objective needs for one trial: where to save, the callbacks to add to its Trainer and the
    checkpoint to resume from.

    Attributes:
        trial: the Optuna trial (suggest parameters on it as usual).
        key: the trial's folder key (stable across an interruption: the resumed trial keeps it).
        dirpath: ``<root>/trials/<key>``; free for the objective's own files.
        ckpt_dir: ``<root>/trials/<key>/ckpts``, where the callbacks save.
        ckpt_path: newest committed checkpoint of this trial (pass it to ``Trainer.fit(ckpt_path=...)``);
            ``None`` for a fresh trial.
        resumes_trial: number of the interrupted trial this one continues, or ``None``.
        callbacks: ``[PeriodicCheckpoint, BestMetricCheckpoint, OptunaPruning]`` for the Trainer.
    """

    trial: "optuna.Trial"
    key: str
    dirpath: str
    ckpt_dir: str
    ckpt_path: Optional[str]
    resumes_trial: Optional[int]
    callbacks: list = field(default_factory=list)

    @property
    def best_callback(self) -> BestMetricCheckpoint:
        return next(c for c in self.callbacks if isinstance(c, BestMetricCheckpoint))

    @property
    def best_value(self) -> float:
        """Best value of the monitored metric over the whole trial (resumed part included). Raises RuntimeError
        when no validation produced it."""
        v = self.best_callback.best_model_score
        if v is None:
            raise RuntimeError(
                f"trial {self.trial.number} has no best value of {self.best_callback.monitor!r}: validation never "
                "ran or never logged it (check val_check_interval / limit_val_batches)"
            )
        return float(v)


Objective = Callable[["optuna.Trial", TrialRun], Optional[float]]


class CheckpointedStudy:
    """An Optuna study whose trials checkpoint into their own folders, resume after a kill, and leave behind the
    study's best model.

    Args:
        root_dir: folder of the study (created if missing).
        study_name: Optuna study name (one storage may hold several studies).
        storage: Optuna storage URL; default ``sqlite:///<root_dir>/study.db``.
        direction: ``"minimize"`` or ``"maximize"`` the objective (and ``monitor``).
        monitor: metric logged with ``self.log`` that ranks checkpoints, is reported to the pruner, and is the trial
            value when the objective returns ``None``.
        keep: ``"best"``: remove the folders of pruned trials and of complete trials outside the ``keep_top_n`` best;
            ``"all"``: remove nothing.
        keep_top_n: how many of the best complete trials keep their folders with ``keep="best"`` (>= 1).
        every_n_train_steps: periodic checkpoint interval of each trial, in optimizer steps (the resume point).
        async_save: write checkpoints in the background (see :class:`PeriodicCheckpoint`).
        sampler, pruner: passed to ``optuna.create_study`` (defaults: Optuna's TPE sampler and median pruner). A
            seeded sampler starts its random sequence again in each process, so after a restart it may repeat
            earlier suggestions (Optuna's behaviour).
        export_best_weights: write ``best/model.safetensors`` (merged weights of the study's best checkpoint).
    """

    def __init__(
        self,
        root_dir: str,
        study_name: str = "study",
        *,
        storage: Optional[str] = None,
        direction: Literal["minimize", "maximize"] = "minimize",
        monitor: str = "val_loss",
        keep: Literal["best", "all"] = "best",
        keep_top_n: int = 1,
        every_n_train_steps: int = 50,
        async_save: bool = True,
        sampler: Optional["optuna.samplers.BaseSampler"] = None,
        pruner: Optional["optuna.pruners.BasePruner"] = None,
        export_best_weights: bool = True,
    ) -> None:
        if not isinstance(root_dir, (str, os.PathLike)) or not os.fspath(root_dir):
            raise ValueError(f"root_dir={root_dir!r} is invalid; give the study's folder, e.g. 'runs/hpo'")
        if not isinstance(study_name, str) or not study_name:
            raise ValueError(f"study_name={study_name!r} is invalid; give a non-empty string")
        if direction not in ("minimize", "maximize"):
            raise ValueError(f"direction={direction!r} is invalid; use 'minimize' or 'maximize'")
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor={monitor!r} is invalid; give the name of a logged metric such as 'val_loss'")
        if keep not in ("best", "all"):
            raise ValueError(f"keep={keep!r} is invalid; use 'best' (remove pruned and losing trials) or 'all'")
        if not isinstance(keep_top_n, int) or isinstance(keep_top_n, bool) or keep_top_n < 1:
            raise ValueError(f"keep_top_n={keep_top_n!r} is invalid; it must be a positive integer (the best trial is always kept)")
        if not isinstance(every_n_train_steps, int) or isinstance(every_n_train_steps, bool) or every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps={every_n_train_steps!r} is invalid; it must be a positive integer (optimizer steps)")
        if storage is not None and (not isinstance(storage, str) or "://" not in storage):
            raise ValueError(f"storage={storage!r} is invalid; give an Optuna storage URL such as 'sqlite:///runs/hpo/study.db'")
        self.root_dir = os.path.abspath(os.fspath(root_dir))
        self.study_name = study_name
        self.storage_url = storage or f"sqlite:///{os.path.join(self.root_dir, 'study.db')}"
        self.direction = direction
        self.monitor = monitor
        self.keep = keep
        self.keep_top_n = keep_top_n
        self.every_n_train_steps = every_n_train_steps
        self.async_save = async_save
        self.export_best_weights = bool(export_best_weights)
        os.makedirs(os.path.join(self.root_dir, "trials"), exist_ok=True)
        self._storage = optuna.storages.RDBStorage(self.storage_url)
        self.study: optuna.Study = optuna.create_study(
            storage=self._storage, study_name=study_name, direction=direction, load_if_exists=True,
            sampler=sampler, pruner=pruner,
        )
        if self.study.direction.name.lower() != direction:
            raise ValueError(
                f"direction={direction!r} does not match the existing study {study_name!r} "
                f"({self.study.direction.name.lower()}); use the same direction or another study_name"
            )

    # ------------------------------------------------------------------ paths
    @property
    def trials_dir(self) -> str:
        return os.path.join(self.root_dir, "trials")

    @property
    def best_dir(self) -> str:
        return os.path.join(self.root_dir, "best")

    def trial_dir(self, key: str) -> str:
        return os.path.join(self.trials_dir, key)

    def best(self) -> Optional[dict[str, Any]]:
        """The study's best trial as recorded in ``best/best.json`` (``None`` before a trial completes): ``number``,
        ``key``, ``params``, ``value``, ``checkpoint`` (its best committed checkpoint) and ``model`` (merged weights,
        when ``export_best_weights``)."""
        try:
            doc = json.loads(read_member(self.best_dir, "best.json", 1 << 20))
        except (OSError, ValueError, CheckpointError):
            return None
        return doc if isinstance(doc, dict) else None

    # ------------------------------------------------------------------ running
    def callbacks(self, trial: "optuna.Trial", ckpt_dir: str, reported_steps: Optional[set[int]] = None) -> list[pl.Callback]:
        """Callbacks for a trial's Trainer: periodic checkpoints (the resume points), the trial's best checkpoint by
        ``monitor``, and Optuna pruning on ``monitor`` (``reported_steps``: steps already reported to ``trial``)."""
        mode = "min" if self.direction == "minimize" else "max"
        return [
            PeriodicCheckpoint(ckpt_dir, every_n_train_steps=self.every_n_train_steps, async_save=self.async_save),
            BestMetricCheckpoint(ckpt_dir, monitor=self.monitor, mode=mode, top_k=1, async_save=self.async_save),
            OptunaPruning(trial, self.monitor, reported_steps),
        ]

    def finished_trials(self) -> int:
        """Trials that count towards ``n_trials``: complete or pruned."""
        return len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))

    def optimize(self, objective: Objective, n_trials: int, *, timeout: Optional[float] = None, catch: tuple = ()) -> "optuna.Study":
        """Run trials until the study has ``n_trials`` finished (complete or pruned) trials in total.

        ``objective(trial, run)`` suggests parameters on ``trial``, trains with ``run.callbacks`` and
        ``ckpt_path=run.ckpt_path``, and returns the trial's value, or ``None`` for ``run.best_value`` (the best
        ``monitor`` of the trial, which is the value of the checkpoint that becomes the study's best).

        Args:
            objective: see above.
            n_trials: total finished trials wanted in the study (a rerun after a kill runs only the rest).
            timeout: stop starting new trials after this many seconds (Optuna's ``timeout``).
            catch: exception types that fail a trial without stopping the study (Optuna's ``catch``); such a failed
                trial uses up one of this call's trials.
        """
        if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
            raise ValueError(f"n_trials={n_trials!r} is invalid; it must be a positive integer (total finished trials of the study)")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ValueError(f"timeout={timeout!r} is invalid; give seconds > 0 or None")
        root = LocalStore(self.root_dir)
        try:
            lock = root.lock({"run_id": f"optuna study {self.study_name}"})
        except FolderBusyError as e:
            raise StudyLockedError(f"another process is running this study: {e}") from None
        try:
            self._cleanup_trash()
            self._requeue_interrupted()
            self._refresh_best()
            self._apply_retention()
            remaining = n_trials - self.finished_trials()
            if remaining > 0:
                self.study.optimize(
                    lambda t: self._run_trial(objective, t), n_trials=remaining, timeout=timeout, catch=catch,
                    callbacks=[self._after_trial],
                )
        finally:
            lock.release()
        return self.study

    def _run_trial(self, objective: Objective, trial: "optuna.Trial") -> float:
        key = trial.user_attrs.get(KEY_ATTR)
        if not key:
            key = f"trial-{trial.number:05d}"
            trial.set_user_attr(KEY_ATTR, key)
        resumes = trial.user_attrs.get(RESUMES_ATTR)
        reported: set[int] = set()
        if resumes is not None:  # carry the interrupted trial's reports over, so the pruner sees the whole curve
            old = next((t for t in self.study.get_trials(deepcopy=False) if t.number == int(resumes)), None)
            for step, value in sorted((old.intermediate_values if old else {}).items()):
                trial.report(value, step)
                reported.add(int(step))
        dirpath = self.trial_dir(key)
        ckpt_dir = os.path.join(dirpath, "ckpts")
        os.makedirs(ckpt_dir, exist_ok=True)
        ckpt_path = latest_checkpoint(ckpt_dir)
        if ckpt_path is not None:
            log.info("lightning_ckpt: trial %d resumes %s from %s", trial.number, key, ckpt_path)
        run = TrialRun(trial, key, dirpath, ckpt_dir, ckpt_path, None if resumes is None else int(resumes),
                       self.callbacks(trial, ckpt_dir, reported_steps=reported))
        try:
            value = objective(trial, run)
        except (KeyboardInterrupt, SystemExit):
            # Optuna marks a trial FAIL on Ctrl-C (Lightning turns Ctrl-C during fit into SystemExit, which leaves it
            # RUNNING); either way the next optimize() continues it from its checkpoints
            trial.set_user_attr(INTERRUPTED_ATTR, True)
            raise
        return run.best_value if value is None else float(value)

    # ------------------------------------------------------------------ bookkeeping
    def _requeue_interrupted(self) -> None:
        """Continue interrupted trials: those still RUNNING (we hold the lock, so their process is dead) and those
        Optuna failed on Ctrl-C. Each is marked FAIL and its parameters are enqueued again with its folder key, once
        (the enqueue comes first, so a kill in between loses nothing and a continued trial is not enqueued twice)."""
        trials = self.study.get_trials(deepcopy=False)
        continued = {int(t.user_attrs[RESUMES_ATTR]) for t in trials if RESUMES_ATTR in t.user_attrs}
        for t in trials:
            stale = t.state == TrialState.RUNNING
            if not stale and not (t.state == TrialState.FAIL and t.user_attrs.get(INTERRUPTED_ATTR)):
                continue
            key = t.user_attrs.get(KEY_ATTR)
            if key and t.number not in continued:
                self.study.enqueue_trial(dict(t.params), user_attrs={KEY_ATTR: key, RESUMES_ATTR: t.number})
                log.info("lightning_ckpt: trial %d (%s) was interrupted; enqueued to resume from its checkpoints", t.number, key)
            if stale:
                study_id = self._storage.get_study_id_from_name(self.study_name)
                trial_id = self._storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
                self._storage.set_trial_user_attr(trial_id, INTERRUPTED_ATTR, True)
                self._storage.set_trial_state_values(trial_id, TrialState.FAIL)

    def _after_trial(self, study: "optuna.Study", frozen: FrozenTrial) -> None:
        self._refresh_best()
        self._apply_retention()

    def _refresh_best(self) -> None:
        """Record the study's best trial in ``best/`` when it changed (also repairs a ``best/`` a kill left stale)."""
        try:
            bt = self.study.best_trial
        except ValueError:  # no complete trial yet
            return
        key = bt.user_attrs.get(KEY_ATTR)
        cur = self.best()
        if cur is not None and cur.get("number") == bt.number and os.path.isdir(cur.get("checkpoint") or ""):
            return
        if not key:
            return
        ckpt_dir = os.path.join(self.trial_dir(key), "ckpts")
        ckpts = list_checkpoints(ckpt_dir)
        best_ckpts = [c for c in ckpts if "best" in c.tags] or ckpts
        if not best_ckpts:
            log.warning("lightning_ckpt: best trial %d (%s) has no checkpoint in %s", bt.number, key, ckpt_dir)
            return
        sign = 1.0 if self.direction == "minimize" else -1.0

        def score(c: Any) -> float:
            v = c.metrics.get(self.monitor)
            return sign * float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.inf

        chosen = min(best_ckpts, key=lambda c: (score(c), -c.step))
        info: dict[str, Any] = {
            "study_name": self.study_name, "number": bt.number, "key": key, "params": bt.params, "value": bt.value,
            "monitor": self.monitor, "direction": self.direction, "checkpoint": chosen.path, "step": chosen.step,
            "model": None,
        }
        root = LocalStore(self.root_dir)
        tx = root.begin(os.path.basename(self.best_dir)).open()
        try:
            if self.export_best_weights:
                merge_checkpoint(chosen.path, tx.file("model.safetensors"))
                info["model"] = os.path.join(self.best_dir, "model.safetensors")
            OPS.write_file(tx.file("best.json"), json.dumps(info, indent=2, default=str).encode(), fsync=True)
            tx.commit(None, if_exists="replace")  # the previous best/ is swapped out atomically
        except BaseException:
            tx.abort()
            raise
        log.info("lightning_ckpt: study best is trial %d (%s=%s), checkpoint %s", bt.number, self.monitor, bt.value, chosen.path)

    def _apply_retention(self) -> None:
        """Remove the folders of pruned trials and of complete trials outside the ``keep_top_n`` best. The folders
        of running, waiting (resumable) and failed trials (an exception in the objective: kept to look into) stay."""
        if self.keep == "all":
            return
        trials = self.study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
        sign = 1.0 if self.direction == "minimize" else -1.0
        complete.sort(key=lambda t: (sign * t.value, t.number))
        keep_keys = {t.user_attrs.get(KEY_ATTR) for t in complete[: self.keep_top_n]}
        cur = self.best()
        if cur:
            keep_keys.add(cur.get("key"))
        # a folder is judged by the newest trial that used it (an interrupted trial and its continuation share one)
        newest: dict[str, FrozenTrial] = {}
        for t in trials:
            key = t.user_attrs.get(KEY_ATTR)
            if key and (key not in newest or t.number > newest[key].number):
                newest[key] = t
        drop = {key for key, t in newest.items() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}
        trials = LocalStore(self.trials_dir)
        for key in sorted(k for k in drop - keep_keys if k):
            if trials.delete(key):  # out of sight at once (a rename), then removed
                log.info("lightning_ckpt: removed %s (pruned or not among the best %d trials)", self.trial_dir(key),
                         self.keep_top_n)

    def _cleanup_trash(self) -> None:
        """What a killed worker left (this worker holds the study's lock, so nobody else writes here)."""
        for parent in (self.root_dir, self.trials_dir):
            LocalStore(parent).cleanup(everyone=True)


__all__ = ["CheckpointedStudy", "OptunaPruning", "StudyLockedError", "TrialRun"]
