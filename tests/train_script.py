"""Trains the demo model in its own process; used by tests that kill a run and resume it.

    python tests/train_script.py --dir D --max-steps N --every K [--kill-at S [--kill-inflight]] [--resume] --out W
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

import lightning.pytorch as pl  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lightning_ckpt import PeriodicCheckpoint, PreemptionCheckpoint, latest_checkpoint  # noqa: E402
from lightning_ckpt.demo import DemoDataModule, DemoModel  # noqa: E402


class KillAt(pl.Callback):
    def __init__(self, ckpt: PeriodicCheckpoint, step: int, inflight: bool) -> None:
        self.ckpt, self.step, self.inflight = ckpt, step, inflight

    # Lightning runs Checkpoint callbacks after the others in each hook, so act at the start of the next batch
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            if not self.inflight:
                self.ckpt.writer.wait()  # the save at this step is committed
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAt(pl.Callback):
    """Sends a signal to this process in the middle of step ``step`` (as a cluster scheduler would)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), self.signum)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--max-steps", type=int, required=True)
    ap.add_argument("--every", type=int, required=True)
    ap.add_argument("--kill-at", type=int)
    ap.add_argument("--kill-inflight", action="store_true")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--sync", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--preempt-at", type=int, help="send --signal to ourselves during this step")
    ap.add_argument("--signal", default="SIGTERM")
    a = ap.parse_args()
    pl.seed_everything(7, verbose=False)
    model = DemoModel(dropout=0.2)
    data = DemoDataModule(n_train=200, n_val=48, batch_size=16)
    ckpt = PeriodicCheckpoint(a.dir, every_n_train_steps=a.every, async_save=not a.sync)
    callbacks = [ckpt]
    if a.kill_at is not None:
        callbacks.append(KillAt(ckpt, a.kill_at, a.kill_inflight))
    if a.preempt_at is not None:
        callbacks += [PreemptionCheckpoint(a.dir, signals=[a.signal], async_save=not a.sync),
                      SignalAt(a.preempt_at, getattr(signal, a.signal))]
    trainer = pl.Trainer(
        max_steps=a.max_steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, val_check_interval=5, check_val_every_n_epoch=None, num_sanity_val_steps=2,
    )
    ckpt_path = latest_checkpoint(a.dir) if a.resume else None
    trainer.fit(model, data, ckpt_path=ckpt_path)
    if a.out:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, a.out)
    print(f"resumed_from={ckpt_path} global_step={trainer.global_step}")


if __name__ == "__main__":
    main()
