"""Lightning's ModelParallelStrategy (FSDP2, ``fully_shard``) on CPU/gloo under torchrun, saving with PeriodicCheckpoint.

    torchrun --standalone --nproc_per_node 2 tests/distributed/model_parallel_script.py --dir D --max-steps N

Writes ``--out`` (rank 0): the trained model's full state dict (gathered once, at the end, for the test only) and a
JSON with the step, the world size, the resumed checkpoint, the parameters as restored (gathered at the first
training batch) and the optimizer's step counts.
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
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lightning_ckpt import PeriodicCheckpoint  # noqa: E402
from lightning_ckpt.demo import DemoDataModule  # noqa: E402


class Sharded(pl.LightningModule):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 4))

    def configure_model(self) -> None:
        if not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return  # FSDPStrategy wraps the Linear layers itself (auto_wrap_policy)
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def full_state(module) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class Record(pl.Callback):
    """The parameters as restored, before the first step runs (a collective: every rank calls it)."""

    def __init__(self) -> None:
        self.restored: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.restored is None:
            self.restored = {k: v.clone() for k, v in full_state(trainer.strategy.model).items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--sync", action="store_true")
    ap.add_argument("--resume", help="ckpt_path")
    ap.add_argument("--out", required=True)
    ap.add_argument("--strategy", choices=["model_parallel", "fsdp"], default="model_parallel",
                    help="fsdp: FSDPStrategy(state_dict_type='sharded'), which needs GPUs (benchmarks/gpu_checks.py)")
    ap.add_argument("--accelerator", default="cpu")
    a = ap.parse_args()
    pl.seed_everything(7, verbose=False)
    n = int(os.environ.get("WORLD_SIZE", "1"))
    a.dir = a.dir.replace("{rank}", os.environ.get("RANK", "0"))  # a folder per rank: as on separate nodes
    record = Record()
    if a.strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = FSDPStrategy(state_dict_type="sharded", auto_wrap_policy={nn.Linear})
    else:
        strategy = ModelParallelStrategy(data_parallel_size=n, tensor_parallel_size=1)
    trainer = pl.Trainer(
        accelerator=a.accelerator, devices=n, strategy=strategy,
        max_steps=a.max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[PeriodicCheckpoint(a.dir, every_n_train_steps=a.every, async_save=not a.sync), record],
    )
    trainer.fit(Sharded(), DemoDataModule(n_train=128, n_val=16, batch_size=8), ckpt_path=a.resume)
    final = full_state(trainer.strategy.model)
    opt = trainer.optimizers[0]
    steps = sorted({int(s["step"]) for s in opt.state.values()})
    lrs = [g["lr"] for g in opt.param_groups]
    if trainer.global_rank == 0:
        save_file({k: v.contiguous() for k, v in final.items()}, a.out)
        save_file({k: v.contiguous() for k, v in (record.restored or {}).items()}, a.out + ".restored")
        with open(a.out + ".json", "w") as f:
            json.dump({"world_size": trainer.world_size, "global_step": trainer.global_step, "opt_steps": steps,
                       "lrs": lrs}, f)


if __name__ == "__main__":
    main()
    # Tear the default process group down before the interpreter exits: with ModelParallelStrategy on gloo, a rank
    # left to exit with it alive aborted ("terminate called without an active exception") in about 1 run in 7 on a
    # loaded machine (not seen once it is destroyed here; root cause not found).
    import gc

    import torch.distributed as dist

    gc.collect()
    if dist.is_initialized() and not os.environ.get("LC_TEST_SHARED_LAUNCH"):  # a shared launch destroys it at its end
        dist.destroy_process_group()
