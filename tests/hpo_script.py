"""Runs a small CheckpointedStudy in its own process; used by tests/test_hpo.py to kill a study and resume it.

    python tests/hpo_script.py --root R --n-trials N [--kill-trial T --kill-at-step S]

Appends one JSON line per event to <root>/calls.jsonl: {"event": "start"|"end", "pid", "number", "key",
"ckpt_path", "step", "params"}.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

import lightning.pytorch as pl  # noqa: E402
import optuna  # noqa: E402

from lightning_ckpt import PeriodicCheckpoint  # noqa: E402
from lightning_ckpt.demo import DemoDataModule, DemoModel  # noqa: E402
from lightning_ckpt.extras.hpo import CheckpointedStudy, TrialRun  # noqa: E402

MAX_STEPS = 30
EVERY = 10


def record(root: str, **line) -> None:
    with open(os.path.join(root, "calls.jsonl"), "a") as f:
        f.write(json.dumps({"pid": os.getpid(), **line}) + "\n")
        f.flush()
        os.fsync(f.fileno())


class Recorder(pl.Callback):
    def __init__(self, root: str, run: TrialRun) -> None:
        self.root, self.run = root, run

    def on_train_start(self, trainer, pl_module):  # after a resume, global_step is the checkpoint's step
        record(self.root, event="start", number=self.run.trial.number, key=self.run.key, ckpt_path=self.run.ckpt_path,
               step=int(trainer.global_step), params=self.run.trial.params)


class KillAt(pl.Callback):
    """SIGKILL at the start of step `step`, once the checkpoint of that step is committed."""

    def __init__(self, ckpt: PeriodicCheckpoint, step: int) -> None:
        self.ckpt, self.step = ckpt, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.ckpt.writer.wait()
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--n-trials", type=int, required=True)
    ap.add_argument("--kill-trial", type=int)
    ap.add_argument("--kill-at-step", type=int)
    a = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = CheckpointedStudy(a.root, "kill-test", every_n_train_steps=EVERY, keep="best",
                              sampler=optuna.samplers.RandomSampler(seed=os.getpid()), pruner=optuna.pruners.NopPruner())

    def objective(trial: optuna.Trial, run: TrialRun) -> None:
        lr = trial.suggest_float("lr", 1e-3, 3e-2, log=True)
        hidden = trial.suggest_categorical("hidden", [8, 16])
        pl.seed_everything(trial.number, verbose=False)
        callbacks = list(run.callbacks) + [Recorder(a.root, run)]
        if trial.number == a.kill_trial and run.ckpt_path is None:
            periodic = next(c for c in run.callbacks if isinstance(c, PeriodicCheckpoint))
            callbacks.append(KillAt(periodic, a.kill_at_step))
        trainer = pl.Trainer(
            max_steps=MAX_STEPS, callbacks=callbacks, logger=False, enable_progress_bar=False,
            enable_model_summary=False, val_check_interval=5, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        )
        trainer.fit(DemoModel(hidden=hidden, lr=lr, dropout=0.0), DemoDataModule(n_train=128, n_val=32, batch_size=16),
                    ckpt_path=run.ckpt_path)
        record(a.root, event="end", number=trial.number, key=run.key, step=int(trainer.global_step), value=run.best_value)
        return None  # the trial's best val_loss

    study.optimize(objective, n_trials=a.n_trials)


if __name__ == "__main__":
    main()
