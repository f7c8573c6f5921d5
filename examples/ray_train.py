"""Ray Train with lightning_ckpt: 2 CPU workers over gloo, a worker-group restart, and Ray told of every checkpoint.

    pip install -e ".[ray]"
    python examples/ray_train.py [--dir /tmp/ray-demo] [--no-failure]

Nothing Ray-specific is added to the callbacks: inside a Ray Train worker `PeriodicCheckpoint` reports each committed
checkpoint to Ray as a small reference folder (docs/ray.md). The first attempt fails on purpose at step 10; Ray
restarts the worker group (`FailureConfig(max_failures=1)`) and `resume="auto"` resumes from the checkpoint Ray hands
the new attempt. At the end `result.checkpoint` is a reference that `load_checkpoint` loads.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def train_func(config: dict) -> None:
    import lightning.pytorch as pl
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer

    from lightning_ckpt import PeriodicCheckpoint
    from lightning_ckpt.demo import DemoDataModule, DemoModel

    class FailOnce(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            marker = os.path.join(config["dir"], "failed-once")
            if config["fail"] and trainer.global_step == 10 and not os.path.exists(marker):
                trainer.strategy.barrier()
                if trainer.is_global_zero:
                    open(marker, "w").close()
                raise RuntimeError("a simulated worker failure (Ray restarts the worker group)")

    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_steps=16, accelerator="cpu", devices="auto", strategy=RayDDPStrategy(),
        plugins=[RayLightningEnvironment()], limit_val_batches=0, logger=False, enable_progress_bar=False,
        callbacks=[PeriodicCheckpoint(os.path.join(config["dir"], "ckpts"), every_n_train_steps=4, resume="auto"),
                   FailOnce()])
    trainer = prepare_trainer(trainer)
    trainer.fit(DemoModel(), DemoDataModule())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/lightning_ckpt-ray-demo")
    ap.add_argument("--no-failure", action="store_true")
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lightning_ckpt import load_checkpoint
    from lightning_ckpt.read import read_reference

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": root, "OMP_NUM_THREADS": "1"}})
    result = TorchTrainer(
        train_func, train_loop_config={"dir": args.dir, "fail": not args.no_failure},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(name="demo", storage_path=os.path.join(args.dir, "ray"),
                             failure_config=FailureConfig(max_failures=1)),
    ).fit()
    ref = read_reference(result.checkpoint.path)
    ckpt = load_checkpoint(result.checkpoint.path)  # the checkpoint the reference names, its digest checked
    print(f"Ray's checkpoint {result.checkpoint.path}\n  names {ref['path']} (step {ref['step']}); loaded step "
          f"{ckpt['global_step']}, {sum(t.numel() for t in ckpt['state_dict'].values())} parameters")
    stored = sum(os.path.getsize(os.path.join(result.checkpoint.path, f)) for f in os.listdir(result.checkpoint.path))
    print(f"  bytes Ray stored for it: {stored}")
    print(f"  lineage: lightning-ckpt lineage {os.path.join(args.dir, 'ckpts')}")


if __name__ == "__main__":
    main()
