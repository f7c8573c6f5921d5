"""A DDP run on CPU (gloo) that an elastic launcher restarts: torchrun ``--max-restarts``, or a relaunch of the same
command at another world size. Every attempt runs the same command; ``resume="auto"`` resumes from the newest valid
checkpoint of ``--dir``. Used by tests/distributed/test_elastic.py.

    torchrun --standalone --nproc_per_node 2 --max-restarts 1 tests/distributed/elastic_script.py \
        --dir D --max-steps N --every K [--kill A:R:S ...] [--out W]

``--kill A:R:S``: in attempt A (``TORCHELASTIC_RESTART_COUNT``, 0 first), global rank R waits until the checkpoint
of step S is committed, then kills itself with SIGKILL (no cleanup, no exception).
``--out W``: rank 0 writes the final weights and optimizer tensors to W (safetensors) and what happened to W.json;
each attempt writes the state it starts training from (after the restore) to ``W.restored-<attempt>``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lightning_ckpt import PeriodicCheckpoint, list_checkpoints  # noqa: E402
from lightning_ckpt.demo import DemoDataModule, DemoModel  # noqa: E402

ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def training_state(trainer: pl.Trainer) -> dict[str, torch.Tensor]:
    """The model's tensors and every tensor of the optimizer state, under flat names."""
    out = {f"model/{k}": v.detach().clone().contiguous() for k, v in trainer.lightning_module.state_dict().items()}
    for i, opt in enumerate(trainer.optimizers):
        for pid, st in opt.state_dict()["state"].items():
            for name, v in st.items():
                if torch.is_tensor(v):
                    out[f"optim{i}/{pid}/{name}"] = v.detach().clone().contiguous()
    return out


class KillAfterCommit(pl.Callback):
    """Global rank ``rank``, in attempt ``attempt``, kills itself with SIGKILL once the checkpoint of ``step`` is
    committed (polled at the start of each later step, while training waits for it)."""

    def __init__(self, dirpath: str, attempt: int, rank: int, step: int) -> None:
        self.dirpath, self.attempt, self.rank, self.step = dirpath, attempt, rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if ATTEMPT != self.attempt or trainer.global_rank != self.rank or trainer.global_step < self.step:
            return
        deadline = time.monotonic() + 60
        while self.step not in [c.step for c in list_checkpoints(self.dirpath)]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the checkpoint of step {self.step} was not committed within 60 s")
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGKILL)


class RecordRestored(pl.Callback):
    """Rank 0 writes the state training starts from (after Lightning and the callbacks restored it)."""

    def __init__(self, out: str | None) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module):
        if self.out and trainer.global_rank == 0:
            save_file(training_state(trainer), f"{self.out}.restored-{ATTEMPT}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--max-steps", type=int, default=12)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--kill", action="append", default=[], help="ATTEMPT:RANK:STEP")
    ap.add_argument("--out")
    a = ap.parse_args()
    pl.seed_everything(3, verbose=False)
    callbacks: list[pl.Callback] = [PeriodicCheckpoint(a.dir, every_n_train_steps=a.every, resume="auto",
                                                       save_timeout_s=30), RecordRestored(a.out)]
    for kill in a.kill:
        callbacks.append(KillAfterCommit(a.dir, *map(int, kill.split(":"))))
    trainer = pl.Trainer(
        accelerator="cpu", strategy="ddp", devices=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        num_nodes=int(os.environ.get("GROUP_WORLD_SIZE", 1) or 1), max_steps=a.max_steps, callbacks=callbacks,
        logger=False, enable_progress_bar=False, enable_model_summary=False, val_check_interval=a.every,
        check_val_every_n_epoch=None, num_sanity_val_steps=0,
    )
    # the demo loader is not a DataLoader: every rank trains on the same batches (no DistributedSampler split)
    trainer.fit(DemoModel(), DemoDataModule(n_train=128, n_val=32, batch_size=16))
    if a.out and trainer.global_rank == 0:
        save_file(training_state(trainer), a.out)
        with open(a.out + ".json", "w") as f:
            json.dump({"world_size": trainer.world_size, "global_step": trainer.global_step, "attempt": ATTEMPT,
                       "resumed_from": str(trainer.ckpt_path) if trainer.ckpt_path else None}, f)


if __name__ == "__main__":
    main()
