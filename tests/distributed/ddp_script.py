"""A DDP run on CPU (gloo) under torchrun, used by the distributed tests and examples/ddp_torchrun.sh.

    torchrun --standalone --nproc_per_node 2 tests/distributed/ddp_script.py --dir D --max-steps N --every K
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
from safetensors.torch import save_file  # noqa: E402

from lightning_ckpt import BestMetricCheckpoint, PeriodicCheckpoint, PreemptionCheckpoint, latest_checkpoint  # noqa: E402
from lightning_ckpt.demo import DemoDataModule, DemoModel  # noqa: E402


class FailInSave(pl.Callback):
    """Makes one rank fail while it writes its shards of the save at ``step``: ``"die"`` exits abruptly,
    ``"hang"`` stalls (alive, not dead); ``"slow"``: every commit on that rank takes two seconds longer."""

    def __init__(self, rank: int, step: int, how: str) -> None:
        self.rank, self.step, self.how = rank, step, how
        self.restore: dict = {}

    def setup(self, trainer, pl_module, stage):
        if trainer.global_rank != self.rank:
            return
        import time

        from lightning_ckpt.store.local import LocalTransaction

        if self.how == "slow":  # every commit of this rank (rank 0 commits) takes two seconds longer
            real_commit = LocalTransaction.commit

            def slow_commit(tx, *a, **k):
                time.sleep(2.0)
                return real_commit(tx, *a, **k)

            self.restore["commit"] = real_commit
            LocalTransaction.commit = slow_commit
            return
        real, target = LocalTransaction.write_tensors, f"step={self.step:06d}"

        def failing(tx, *a, **k):
            if target in tx.path:
                if self.how == "die":
                    os._exit(17)
                time.sleep(600)
            return real(tx, *a, **k)

        self.restore["write_tensors"] = real
        LocalTransaction.write_tensors = failing

    def teardown(self, trainer, pl_module, stage):  # this process may run other scripts next (tests/support/shared.py)
        from lightning_ckpt.store.local import LocalTransaction

        for name, real in self.restore.items():
            setattr(LocalTransaction, name, real)
        self.restore = {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--max-steps", type=int, default=8)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--mode", default="sharded")
    ap.add_argument("--sync", action="store_true")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--die-rank", type=int)
    ap.add_argument("--die-step", type=int)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--hang-rank", type=int)
    ap.add_argument("--hang-step", type=int)
    ap.add_argument("--slow-rank", type=int)
    ap.add_argument("--if-busy", default="wait")
    ap.add_argument("--merge", action="store_true")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--out")
    ap.add_argument("--preempt", action="store_true", help="add PreemptionCheckpoint (SIGTERM)")
    ap.add_argument("--backup", help="backup_uri of the periodic callback (s3://bucket/prefix)")
    ap.add_argument("--auto-resume", action="store_true", help="resume='auto'")
    ap.add_argument("--rank-cache", help="a separate S3 read cache per rank under this folder")
    a = ap.parse_args()
    if a.rank_cache:
        os.environ["LIGHTNING_CKPT_CACHE"] = os.path.join(a.rank_cache, f"rank{os.environ.get('RANK', '0')}")
    pl.seed_everything(3, verbose=False)
    ckpt = PeriodicCheckpoint(a.dir, every_n_train_steps=a.every, async_save=not a.sync, distributed=a.mode, if_busy=a.if_busy,
                              save_timeout_s=a.timeout, merge_on_train_end=a.merge, backup_uri=a.backup,
                              resume="auto" if a.auto_resume else None)
    callbacks = [ckpt, BestMetricCheckpoint(a.dir, monitor="val_loss", top_k=1, async_save=not a.sync, distributed=a.mode,
                                            if_busy=a.if_busy,
                                            save_timeout_s=a.timeout)]
    if a.preempt:
        callbacks.append(PreemptionCheckpoint(a.dir, async_save=not a.sync, distributed=a.mode, save_timeout_s=a.timeout,
                                              if_busy=a.if_busy))
    if a.die_rank is not None:
        callbacks.append(FailInSave(a.die_rank, a.die_step, "die"))
    if a.hang_rank is not None:
        callbacks.append(FailInSave(a.hang_rank, a.hang_step, "hang"))
    if a.slow_rank is not None:
        callbacks.append(FailInSave(a.slow_rank, 0, "slow"))
    trainer = pl.Trainer(
        accelerator="cpu", strategy="ddp", devices=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        num_nodes=int(os.environ.get("GROUP_WORLD_SIZE", os.environ.get("NNODES", 1)) or 1),
        max_steps=a.max_steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, val_check_interval=a.every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
    )
    path = latest_checkpoint(a.dir) if a.resume else None
    trainer.fit(DemoModel(hidden=a.hidden), DemoDataModule(n_train=128, n_val=32, batch_size=16), ckpt_path=path)
    if a.out and trainer.global_rank == 0:
        save_file({k: v.contiguous() for k, v in trainer.lightning_module.state_dict().items()}, a.out)
        with open(a.out + ".json", "w") as f:
            json.dump({"world_size": trainer.world_size, "global_step": trainer.global_step,
                       "resumed_from": path or (str(trainer.ckpt_path) if trainer.ckpt_path else None)}, f)


if __name__ == "__main__":
    main()
