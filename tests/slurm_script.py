"""Trains the demo model as a SLURM job step would (the test sets the SLURM_* variables); used by the SLURM
auto-requeue tests. Relaunching the same command resumes from the newest valid checkpoint, as a requeued job does.

    python tests/slurm_script.py --dir D --root R --max-steps N --every K [--signal-at S [--signal-rank R]]
        [--devices N] [--lightning-requeue] [--out W]
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
_ours = logging.getLogger("lightning_ckpt")
_ours.addHandler(logging.StreamHandler())
_ours.setLevel(logging.INFO)

import lightning.pytorch as pl  # noqa: E402
from lightning.fabric.plugins.environments import SLURMEnvironment  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lightning_ckpt import PeriodicCheckpoint, PreemptionCheckpoint  # noqa: E402
from lightning_ckpt.demo import DemoDataModule, DemoModel  # noqa: E402


class SignalAt(pl.Callback):
    """Sends SIGUSR1 to this process in the middle of step ``step`` (as SLURM does with ``--signal=USR1@90``), on
    global rank ``rank`` only if given."""

    def __init__(self, step: int, rank: int | None) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step - 1 and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), signal.SIGUSR1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--root", required=True, help="the Trainer's default_root_dir (where hpc_ckpt_*.ckpt would go)")
    ap.add_argument("--max-steps", type=int, required=True)
    ap.add_argument("--every", type=int, required=True)
    ap.add_argument("--signal-at", type=int, help="send SIGUSR1 to ourselves during this step")
    ap.add_argument("--signal-rank", type=int, help="only this global rank gets the signal")
    ap.add_argument("--devices", type=int, default=1, help="ranks (DDP on CPU), one process each, started by the test")
    ap.add_argument("--lightning-requeue", action="store_true", help="PreemptionCheckpoint(slurm_requeue=False)")
    ap.add_argument("--out")
    a = ap.parse_args()
    pl.seed_everything(7, verbose=False)
    model = DemoModel(dropout=0.2)
    data = DemoDataModule(n_train=200, n_val=48, batch_size=16)
    # signals: only SIGTERM (the default); the SLURM requeue signal is added by the callback itself
    preempt = PreemptionCheckpoint(a.dir, slurm_requeue=not a.lightning_requeue)
    # resume='auto': a relaunch (the requeued job) resumes from the newest valid checkpoint of a.dir
    callbacks = [PeriodicCheckpoint(a.dir, every_n_train_steps=a.every, resume="auto"), preempt]
    if a.signal_at is not None:
        callbacks.append(SignalAt(a.signal_at, a.signal_rank))
    env = SLURMEnvironment(auto_requeue=True)
    assert SLURMEnvironment.detect(), "the test must set the SLURM variables"
    ddp = {"accelerator": "cpu", "strategy": "ddp", "devices": a.devices} if a.devices > 1 else {}
    trainer = pl.Trainer(
        **ddp, max_steps=a.max_steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, val_check_interval=5, check_val_every_n_epoch=None, num_sanity_val_steps=2,
        default_root_dir=a.root, plugins=[env],
    )
    trainer.fit(model, data)  # no ckpt_path: on SLURM Lightning would take an hpc_ckpt_*.ckpt first, if there was one
    ckpt_path = trainer.ckpt_path
    if a.out and trainer.global_rank == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, a.out)
    print(f"rank={trainer.global_rank} resumed_from={ckpt_path} global_step={trainer.global_step} preempted_step={preempt.preempted_step} "
          f"requeued={preempt.requeued}")


if __name__ == "__main__":
    main()
