"""A DDP fine-tune on CPU (gloo) under torchrun with deduplicated checkpoints: ``DemoModel`` with frozen layers,
``PeriodicCheckpoint`` (``dedup`` is the default) and ``RetentionPolicy``. Two fits in the same ranks: the first from
scratch (or from ``--start-from``, the newest checkpoint of a folder, say one written by a single process), the second
a new Trainer that resumes the newest checkpoint with ``fit(ckpt_path=...)``.

    torchrun --standalone --nproc_per_node 2 tests/distributed/dedup_script.py --dir D --out INFO.json

Rank 0 writes ``INFO.json``: the bytes each save wrote (``SaveResult.bytes``, as reported to the loggers under
``checkpoint/bytes``), keyed by fit and step, the global step and world size of each fit, what the second fit
resumed from, and the trained weights next to it (``INFO.json.safetensors``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.loggers import Logger  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lightning_ckpt import PeriodicCheckpoint, RetentionPolicy, latest_checkpoint  # noqa: E402
from lightning_ckpt.demo import DemoDataModule, DemoModel  # noqa: E402

MODEL_KW = {"hidden": 96, "layers": 3, "frozen_layers": 2}  # tests/distributed/test_ddp_dedup.py builds the same


class SaveBytes(Logger):
    """Keeps what the checkpoint callbacks report of each save: ``{step: bytes written}``."""

    def __init__(self) -> None:
        super().__init__()
        self.saves: dict[int, int] = {}

    @property
    def name(self) -> str:
        return "save-bytes"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        if "checkpoint/bytes" in metrics:
            self.saves[int(metrics["checkpoint/step"])] = int(metrics["checkpoint/bytes"])


def fit(a, max_steps: int, ckpt_path: str | None) -> tuple[pl.Trainer, SaveBytes]:
    pl.seed_everything(3, verbose=False)
    bytes_logger = SaveBytes()
    callbacks = [PeriodicCheckpoint(a.dir, every_n_train_steps=a.every, distributed=a.mode, allow_existing=True),
                 RetentionPolicy(a.dir, keep_last=a.keep_last)]
    trainer = pl.Trainer(
        accelerator="cpu", strategy="ddp", devices=int(os.environ.get("LOCAL_WORLD_SIZE", 1)), max_steps=max_steps,
        callbacks=callbacks, logger=[bytes_logger], enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1,
    )
    trainer.fit(DemoModel(**MODEL_KW), DemoDataModule(n_train=128, n_val=32, batch_size=16), ckpt_path=ckpt_path)
    return trainer, bytes_logger


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", default="sharded")
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--keep-last", type=int, default=2)
    ap.add_argument("--steps", type=int, nargs=2, default=[6, 10], help="max_steps of the first and the second fit")
    ap.add_argument("--start-from", help="a folder whose newest checkpoint the first fit resumes")
    a = ap.parse_args()
    first = latest_checkpoint(a.start_from) if a.start_from else None
    t1, b1 = fit(a, a.steps[0], first)
    resume = latest_checkpoint(a.dir)  # every rank: the folder is shared
    t2, b2 = fit(a, a.steps[1], resume)
    if t2.global_rank == 0:
        state = {k: v.contiguous() for k, v in t2.lightning_module.state_dict().items()}
        save_file(state, a.out + ".safetensors")
        with open(a.out, "w") as f:
            json.dump({"world_size": t2.world_size, "steps": [t1.global_step, t2.global_step],
                       "first_from": first, "resumed_from": resume,
                       "bytes": [b1.saves, b2.saves]}, f)


if __name__ == "__main__":
    main()
