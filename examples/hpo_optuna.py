"""Hyperparameter search with Optuna where every trial checkpoints and a killed study resumes (CPU, about 30 s).

    pip install optuna
    python examples/hpo_optuna.py --fresh --kill-in-trial 1    # dies (SIGKILL) half-way through trial 1
    python examples/hpo_optuna.py                              # resumes: trial 1 goes on from its checkpoint

Searches the learning rate and hidden size of the demo MLP. Trials that look worse than the median are pruned
(MedianPruner) and their checkpoints removed; so are those of finished trials that lose. The best model of the study
is kept in <dir>/best/ (best.json + model.safetensors). Kill the script at any moment (Ctrl-C, kill -9) and run
it again without --fresh: finished trials are not rerun and the interrupted one resumes from its last checkpoint.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import shutil
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)

import lightning.pytorch as pl  # noqa: E402
import optuna  # noqa: E402

from lightning_ckpt.demo import DemoDataModule, DemoModel  # noqa: E402
from lightning_ckpt.extras.hpo import CheckpointedStudy, TrialRun  # noqa: E402


class KillHalfWay(pl.Callback):
    """Simulates a crash: SIGKILL at the first step >= `step` once a checkpoint of this trial is committed."""

    def __init__(self, periodic: pl.Callback, step: int) -> None:
        self.periodic, self.step = periodic, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            self.periodic.writer.wait()  # the newest checkpoint is committed
            print(f"   killed at step {trainer.global_step}; run the same command again (without --fresh) to resume", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="runs/hpo", help="study folder (SQLite storage, trials, best model)")
    ap.add_argument("--trials", type=int, default=8, help="finished trials the study should have in total")
    ap.add_argument("--steps", type=int, default=120, help="optimizer steps per trial")
    ap.add_argument("--kill-in-trial", type=int, help="SIGKILL this process half-way through this trial (demo)")
    ap.add_argument("--fresh", action="store_true", help="delete the study folder first")
    a = ap.parse_args()
    if a.fresh:
        shutil.rmtree(a.dir, ignore_errors=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    study = CheckpointedStudy(
        a.dir, "demo-mlp", direction="minimize", monitor="val_loss", keep="best", every_n_train_steps=10,
        # no sampler seed: a seeded sampler restarts its sequence in a new process and repeats earlier suggestions
        sampler=optuna.samplers.TPESampler(),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=20),
    )

    def objective(trial: optuna.Trial, run: TrialRun) -> None:
        lr = trial.suggest_float("lr", 1e-3, 1e-1, log=True)
        hidden = trial.suggest_categorical("hidden", [16, 32, 64, 128])
        what = f"resumes trial {run.resumes_trial} from {run.ckpt_path}" if run.ckpt_path else "starts"
        print(f"trial {trial.number}: lr={lr:.4g} hidden={hidden} {what}")
        pl.seed_everything(trial.number, verbose=False)
        callbacks = list(run.callbacks)
        if trial.number == a.kill_in_trial and run.ckpt_path is None:
            callbacks.append(KillHalfWay(run.callbacks[0], a.steps // 2))
        trainer = pl.Trainer(
            max_steps=a.steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
            enable_model_summary=False, val_check_interval=10, check_val_every_n_epoch=None,
        )
        try:
            trainer.fit(DemoModel(hidden=hidden, lr=lr), DemoDataModule(n_train=1024, n_val=128, batch_size=32),
                        ckpt_path=run.ckpt_path)
        except optuna.TrialPruned as e:
            print(f"trial {trial.number}: {e}")
            raise
        print(f"trial {trial.number}: best val_loss {run.best_value:.4f}")
        return None  # the trial's value is its best val_loss (the checkpoint that can become the study's best)

    t0 = time.perf_counter()
    study.optimize(objective, n_trials=a.trials)
    s = study.study
    counts = {st.name: sum(t.state == st for t in s.trials) for st in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)}
    print(f"== {len(s.trials)} trials ({', '.join(f'{k.lower()}: {v}' for k, v in counts.items())}) in {time.perf_counter() - t0:.1f}s")
    best = study.best()
    print(f"best trial {best['number']}: val_loss={best['value']:.4f} params={best['params']}")
    print(f"   full checkpoint (resume / fine-tune): {best['checkpoint']}")
    print(f"   merged weights (safetensors):         {best['model']}")
    print(f"   trial folders kept: {sorted(e for e in os.listdir(os.path.join(a.dir, 'trials')) if not e.startswith('.'))}")


if __name__ == "__main__":
    main()
