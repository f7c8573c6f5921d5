"""CheckpointedStudy: Optuna (real SQLite storage) + per-trial checkpoints, nested best, retention, pruning, and a
study killed with SIGKILL in the middle of a trial that resumes where it stopped."""
from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess

import lightning.pytorch as pl
import optuna
import pytest
import torch
from optuna.trial import TrialState
from safetensors.torch import load_file

from lightning_ckpt import BestMetricCheckpoint, latest_checkpoint, list_checkpoints, load_checkpoint
from lightning_ckpt.demo import DemoModel
from lightning_ckpt.extras.hpo import INTERRUPTED_ATTR, KEY_ATTR, RESUMES_ATTR, CheckpointedStudy, StudyLockedError, TrialRun
from lightning_ckpt.store import LocalStore

import support
from support import TESTS, data, run_python

SCRIPT = os.path.join(TESTS, "hpo_script.py")
optuna.logging.set_verbosity(optuna.logging.WARNING)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


_trainer = functools.partial(support.trainer, val_every=5)


def _objective(calls: list, max_steps: int = 15, pruned_ckpts: dict | None = None):
    def objective(trial: optuna.Trial, run: TrialRun) -> None:
        lr = trial.suggest_float("lr", 1e-3, 3e-2, log=True)
        hidden = trial.suggest_categorical("hidden", [8, 16])
        calls.append(trial.number)
        pl.seed_everything(trial.number, verbose=False)
        try:
            _trainer(run.callbacks, max_steps=max_steps).fit(
                DemoModel(hidden=hidden, lr=lr, dropout=0.0), data(n_train=96),
                ckpt_path=run.ckpt_path,
            )
        except optuna.TrialPruned:
            if pruned_ckpts is not None:
                pruned_ckpts[trial.number] = (run.dirpath, [c.name for c in list_checkpoints(run.ckpt_dir)])
            raise
        return None  # the trial's best val_loss

    return objective


def _trial_folders(root) -> set[str]:
    return {e for e in os.listdir(os.path.join(root, "trials")) if not e.startswith(".")}


# ----------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    "kwargs, setting",
    [
        ({"keep": "some"}, "keep="),
        ({"keep_top_n": 0}, "keep_top_n="),
        ({"direction": "down"}, "direction="),
        ({"monitor": ""}, "monitor="),
        ({"every_n_train_steps": 0}, "every_n_train_steps="),
        ({"storage": "study.db"}, "storage="),
        ({"study_name": ""}, "study_name="),
    ],
)
def test_bad_settings_name_the_setting(tmp_path, kwargs, setting):
    with pytest.raises(ValueError, match=setting):
        CheckpointedStudy(str(tmp_path), **kwargs)


def test_bad_n_trials_and_direction_mismatch(tmp_path):
    study = CheckpointedStudy(str(tmp_path), "s")
    with pytest.raises(ValueError, match="n_trials="):
        study.optimize(_objective([]), n_trials=0)
    with pytest.raises(ValueError, match="direction="):
        CheckpointedStudy(str(tmp_path), "s", direction="maximize")  # the stored study minimizes


# ----------------------------------------------------------------------------------------------- best + retention
def test_nested_best_and_retention_keep_best(tmp_path):
    calls: list[int] = []
    study = CheckpointedStudy(str(tmp_path), "s", every_n_train_steps=5, sampler=optuna.samplers.RandomSampler(seed=0),
                              pruner=optuna.pruners.NopPruner())
    study.optimize(_objective(calls), n_trials=3)
    s = study.study
    assert calls == [0, 1, 2]
    assert [t.state for t in s.trials] == [TrialState.COMPLETE] * 3
    bt = s.best_trial
    best = study.best()
    assert best is not None and best["number"] == bt.number and best["params"] == bt.params and best["value"] == bt.value
    # only the best trial's folder is left (keep="best", keep_top_n=1)
    assert _trial_folders(tmp_path) == {bt.user_attrs[KEY_ATTR]}
    # the recorded checkpoint is the trial's best one: its val_loss is the trial value
    info = next(c for c in list_checkpoints(os.path.dirname(best["checkpoint"])) if c.path == best["checkpoint"])
    assert "best" in info.tags and info.metrics["val_loss"] == pytest.approx(bt.value, rel=1e-6)
    # best/model.safetensors holds exactly that checkpoint's weights and loads into a fresh model
    merged = load_file(best["model"])
    sd = load_checkpoint(best["checkpoint"])["state_dict"]
    assert merged.keys() == sd.keys() and all(torch.equal(merged[k], sd[k]) for k in sd)
    DemoModel(hidden=bt.params["hidden"]).load_state_dict(merged, strict=True)
    # n_trials counts the study's finished trials: a second call with the same number runs nothing, +1 runs one
    study.optimize(_objective(calls), n_trials=3)
    assert calls == [0, 1, 2]
    study.optimize(_objective(calls), n_trials=4)
    assert calls == [0, 1, 2, 3] and len(s.trials) == 4
    assert _trial_folders(tmp_path) == {s.best_trial.user_attrs[KEY_ATTR]}
    assert study.best()["number"] == s.best_trial.number


def test_keep_all_and_keep_top_n(tmp_path):
    a = CheckpointedStudy(str(tmp_path / "all"), "s", keep="all", every_n_train_steps=5,
                          sampler=optuna.samplers.RandomSampler(seed=1), pruner=optuna.pruners.NopPruner())
    a.optimize(_objective([], max_steps=5), n_trials=3)
    assert _trial_folders(tmp_path / "all") == {"trial-00000", "trial-00001", "trial-00002"}
    b = CheckpointedStudy(str(tmp_path / "top2"), "s", keep_top_n=2, every_n_train_steps=5,
                          sampler=optuna.samplers.RandomSampler(seed=1), pruner=optuna.pruners.NopPruner())
    b.optimize(_objective([], max_steps=5), n_trials=3)
    top2 = sorted(b.study.trials, key=lambda t: t.value)[:2]
    assert _trial_folders(tmp_path / "top2") == {t.user_attrs[KEY_ATTR] for t in top2}


# ----------------------------------------------------------------------------------------------- pruning
class _PruneOdd(optuna.pruners.BasePruner):
    """Prunes odd-numbered trials once they reported step 10 (after the checkpoint of step 5 was committed)."""

    def prune(self, study, trial) -> bool:
        return trial.number % 2 == 1 and (trial.last_step or 0) >= 10


def test_pruned_trials_are_pruned_counted_and_removed(tmp_path):
    pruned: dict = {}
    calls: list[int] = []
    study = CheckpointedStudy(str(tmp_path), "s", every_n_train_steps=5, pruner=_PruneOdd(),
                              sampler=optuna.samplers.RandomSampler(seed=2))
    study.optimize(_objective(calls, max_steps=20, pruned_ckpts=pruned), n_trials=4)
    states = [t.state for t in study.study.trials]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE, TrialState.PRUNED]
    assert set(pruned) == {1, 3}
    for number, (dirpath, names) in pruned.items():
        assert names, f"pruned trial {number} had no committed checkpoint, so its removal proves nothing"
        assert study.study.trials[number].last_step == 10  # pruned at the report of step 10, not at the end
        assert not os.path.exists(dirpath)
    assert study.best()["number"] in (0, 2)
    assert _trial_folders(tmp_path) == {study.study.best_trial.user_attrs[KEY_ATTR]}


# ----------------------------------------------------------------------------------------------- resume bookkeeping
def test_interrupted_trial_is_requeued_once_with_its_folder(tmp_path):
    """A RUNNING trial left by a dead process is failed and continued by one new trial with the same folder key
    and params, also when a kill came between the enqueue and the FAIL mark (no second copy is enqueued)."""
    study = CheckpointedStudy(str(tmp_path), "s", pruner=optuna.pruners.NopPruner())
    dead = study.study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)})
    dead.set_user_attr(KEY_ATTR, "trial-00000")
    study.study.enqueue_trial(dict(dead.params), user_attrs={KEY_ATTR: "trial-00000", RESUMES_ATTR: dead.number})
    seen = []

    def objective(trial, run):
        seen.append((trial.number, run.key, run.resumes_trial, trial.suggest_float("lr", 1e-3, 1e-1, log=True)))
        return 1.0

    study.optimize(objective, n_trials=2)
    trials = study.study.trials
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs.get(INTERRUPTED_ATTR) is True
    assert seen[0] == (1, "trial-00000", 0, dead.params["lr"])
    assert seen[1][1] == "trial-00002" and seen[1][2] is None
    assert len(trials) == 3


class _CtrlC(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 7:
            raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["in_fit", "after_fit"])
def test_ctrl_c_interrupted_trial_is_continued(tmp_path, where):
    """Ctrl-C in fit (Lightning turns it into SystemExit: Optuna leaves the trial RUNNING) or outside fit (Optuna
    fails the trial): the next optimize() continues the trial from its checkpoint instead of dropping it."""
    seen = []
    study = CheckpointedStudy(str(tmp_path), "s", every_n_train_steps=5, async_save=False, pruner=optuna.pruners.NopPruner())

    def objective(trial, run):
        lr = trial.suggest_float("lr", 1e-3, 1e-1, log=True)
        seen.append((trial.number, run.key, run.ckpt_path and os.path.basename(run.ckpt_path)))
        callbacks = list(run.callbacks) + ([_CtrlC()] if where == "in_fit" and run.ckpt_path is None else [])
        _trainer(callbacks, max_steps=10).fit(DemoModel(hidden=8, lr=lr), data(n_train=96),
                                    ckpt_path=run.ckpt_path)
        if where == "after_fit" and run.ckpt_path is None:
            raise KeyboardInterrupt
        return None

    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit if where == "in_fit" else KeyboardInterrupt):
            study.optimize(objective, n_trials=1)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after a Ctrl-C in fit
    first = study.study.trials[0]
    assert first.state == (TrialState.RUNNING if where == "in_fit" else TrialState.FAIL)
    assert first.user_attrs[INTERRUPTED_ATTR] is True
    study.optimize(objective, n_trials=1)
    expected = "step=000005" if where == "in_fit" else "step=000010"
    assert seen == [(0, "trial-00000", None), (1, "trial-00000", expected)]
    trials = study.study.trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].user_attrs[RESUMES_ATTR] == 0 and trials[1].params == first.params


def test_second_worker_on_the_same_study_is_refused(tmp_path):
    study = CheckpointedStudy(str(tmp_path), "s")
    lock = LocalStore(str(tmp_path)).lock({"run_id": "the other worker"})
    try:
        with pytest.raises(StudyLockedError, match="another process"):
            study.optimize(_objective([]), n_trials=1)
    finally:
        lock.release()
    assert study.study.trials == []


# ----------------------------------------------------------------------------------------------- kill -9 and resume
def _run_script(root: str, *args: str) -> subprocess.CompletedProcess:
    return run_python([SCRIPT, "--root", root, *args], capture_output=True, text=True, timeout=240)


def _calls(root: str) -> list[dict]:
    with open(os.path.join(root, "calls.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.usefixtures("forkserver")
def test_study_killed_mid_trial_resumes_the_trial_from_its_checkpoint(tmp_path):
    root = str(tmp_path / "study")
    p = _run_script(root, "--n-trials", "3", "--kill-trial", "1", "--kill-at-step", "20")
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    s = optuna.load_study(study_name="kill-test", storage=f"sqlite:///{root}/study.db")
    assert [t.state for t in s.trials] == [TrialState.COMPLETE, TrialState.RUNNING]
    killed = s.trials[1]
    killed_dir = os.path.join(root, "trials", killed.user_attrs[KEY_ATTR], "ckpts")
    last = latest_checkpoint(killed_dir)
    assert last is not None and last.endswith("step=000020"), "the killed trial committed no checkpoint"
    first_pid = _calls(root)[0]["pid"]

    p = _run_script(root, "--n-trials", "3")
    assert p.returncode == 0, p.stderr[-3000:]
    rerun = [c for c in _calls(root) if c["pid"] != first_pid]
    # finished trials are not rerun: the first thing the rerun trains is the interrupted trial, from its checkpoint
    assert "trial-00000" not in {c["key"] for c in rerun}
    start = rerun[0]
    assert start["event"] == "start" and start["key"] == killed.user_attrs[KEY_ATTR]
    assert start["ckpt_path"] == last and start["step"] == 20 > 0
    assert start["params"] == killed.params
    end = next(c for c in rerun if c["event"] == "end" and c["number"] == start["number"])
    assert end["step"] == 30
    # the study completes the requested number of trials; the interrupted one is failed and continued once
    s = optuna.load_study(study_name="kill-test", storage=f"sqlite:///{root}/study.db")
    states = [t.state for t in s.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    cont = s.trials[2]
    assert cont.user_attrs[RESUMES_ATTR] == 1 and cont.params == killed.params
    assert set(cont.intermediate_values) == {5, 10, 15, 20, 25, 30}  # reports before the kill carried over
    # the resumed trial ends exactly where an uninterrupted run of the same trial ends (same seed, same params)
    pl.seed_everything(killed.number, verbose=False)
    ref = BestMetricCheckpoint(str(tmp_path / "ref"), monitor="val_loss", async_save=False)
    _trainer([ref], max_steps=30).fit(
        DemoModel(hidden=killed.params["hidden"], lr=killed.params["lr"], dropout=0.0),
        data(n_train=128),
    )
    assert cont.value == pytest.approx(ref.best_model_score, rel=1e-6, abs=1e-7)
    # nested best and retention hold over both processes
    best = json.load(open(os.path.join(root, "best", "best.json")))
    assert best["number"] == s.best_trial.number and best["value"] == s.best_trial.value
    assert _trial_folders(root) == {s.best_trial.user_attrs[KEY_ATTR]}
