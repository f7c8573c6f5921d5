"""Quickstart: train a small model on CPU with asynchronous checkpoints, "crash", and resume exactly.

    python examples/quickstart.py [--dir runs/quickstart] [--steps 200]

1. trains for half the steps with PeriodicCheckpoint (async saves every 25 steps) and stops, as if preempted;
2. lists and verifies the checkpoints;
3. resumes from latest_checkpoint() in a fresh Trainer and model and finishes the run.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", ".*does not have many workers.*")
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)

import lightning.pytorch as pl  # noqa: E402

from lightning_ckpt import PeriodicCheckpoint, latest_checkpoint, list_checkpoints, verify_checkpoint  # noqa: E402
from lightning_ckpt.demo import DemoDataModule, DemoModel  # noqa: E402


def make_trainer(dirpath: str, max_steps: int) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        callbacks=[PeriodicCheckpoint(dirpath, every_n_train_steps=25, async_save=True)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=50,
        check_val_every_n_epoch=None,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="runs/quickstart", help="checkpoint folder (emptied first)")
    ap.add_argument("--steps", type=int, default=200, help="total optimizer steps")
    a = ap.parse_args()
    shutil.rmtree(a.dir, ignore_errors=True)

    t0 = time.perf_counter()
    pl.seed_everything(0, verbose=False)
    print(f"== phase 1: train {a.steps // 2} of {a.steps} steps, async checkpoints every 25 steps into {a.dir}")
    trainer = make_trainer(a.dir, max_steps=a.steps // 2)
    trainer.fit(DemoModel(hidden=256), DemoDataModule(n_train=2048, batch_size=64))

    print("== checkpoints on disk")
    for c in list_checkpoints(a.dir):
        print(f"   {c.name}  tags={','.join(c.tags)}  {c.size_bytes / 1e6:.2f} MB  train_loss={c.metrics.get('train_loss', float('nan')):.4f}")
    latest = latest_checkpoint(a.dir)
    verify_checkpoint(latest)
    print(f"   latest_checkpoint -> {latest} (verified: every byte matches its CRC32C)")

    print(f"== phase 2: a fresh process would resume from {latest}; finishing the run")
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(a.dir, max_steps=a.steps)
    trainer.fit(DemoModel(hidden=256), DemoDataModule(n_train=2048, batch_size=64), ckpt_path=latest)
    print(f"   resumed at step {a.steps // 2}, finished at step {trainer.global_step}")
    print(f"   newest checkpoint: {latest_checkpoint(a.dir)}")
    print(f"   inspect it with: lightning-ckpt ls {a.dir}   /   lightning-ckpt show {latest_checkpoint(a.dir)}")
    print(f"done in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
