"""Cached preprocessing stages feeding a LightningDataModule (CPU, a few seconds).

    python examples/preprocess_pipeline.py [--cache runs/preprocess_cache] [--keep] [--steps 20]

Three stages, generate -> normalize -> split, each cached by ``lightning_ckpt.stages.StageCache``. The DataModule
runs the pipeline in ``prepare_data`` (once per machine: computes what is missing) and again in ``setup`` (every
process: loads the verified results). The script fits a tiny model twice, with a fresh DataModule each time, and
prints what each stage did: on the first run the stages are computed, on the second everything is loaded. Without
``--keep`` the cache folder is emptied first; with it, a rerun of the script loads everything. Kill the script
during the first run and run it again with ``--keep``: the stages that had finished are loaded, not recomputed.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*treespec, LeafSpec.*")
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_ckpt.extras.stages import StageCache  # noqa: E402


def build_stages(cache: StageCache):
    """The three stages of the pipeline, registered on ``cache``."""

    @cache.stage(version="1")
    def generate(n: int, dim: int, seed: int = 0) -> dict:
        """Synthetic regression data: features on very different scales, a noisy linear target."""
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(n, dim)) * np.logspace(0, 3, dim)  # scales 1 .. 1000
        w = rng.normal(size=dim)
        y = (x / np.logspace(0, 3, dim)) @ w + 0.1 * rng.normal(size=n)
        return {"x": torch.from_numpy(x).float(), "y": torch.from_numpy(y).float()}

    @cache.stage()
    def normalize(data: dict, eps: float = 1e-6) -> dict:
        """Standardize each feature; the mean and std are kept for inference."""
        mean, std = data["x"].mean(0), data["x"].std(0)
        return {"x": (data["x"] - mean) / (std + eps), "y": data["y"], "stats": {"mean": mean, "std": std}}

    @cache.stage()
    def split(data: dict, val_frac: float = 0.2, seed: int = 0) -> dict:
        """A seeded random train/validation split."""
        n = data["x"].shape[0]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        n_val = int(n * val_frac)
        val, train = perm[:n_val], perm[n_val:]
        return {"train": (data["x"][train], data["y"][train]), "val": (data["x"][val], data["y"][val])}

    return generate, normalize, split


class SyntheticDataModule(pl.LightningDataModule):
    def __init__(self, cache_dir: str, n: int = 2048, dim: int = 16, batch_size: int = 64) -> None:
        super().__init__()
        self.cache = StageCache(cache_dir)
        self.generate, self.normalize, self.split = build_stages(self.cache)
        self.n, self.dim, self.batch_size = n, dim, batch_size

    def _pipeline(self) -> dict:
        return self.split(self.normalize(self.generate(self.n, self.dim)))

    def prepare_data(self) -> None:
        self._pipeline()  # computes and caches whatever is missing (local rank 0 only)

    def setup(self, stage: str) -> None:
        self.parts = self._pipeline()  # every process: loads the verified results

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.parts["train"]), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.parts["val"]), batch_size=self.batch_size)


class TinyRegressor(pl.LightningModule):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.net = torch.nn.Linear(dim, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def run(cache_dir: str, steps: int) -> tuple[list[tuple[str, str, str]], float]:
    """Fit once with a fresh DataModule; returns (hook, stage, status) for every stage call and the val loss."""
    pl.seed_everything(0, verbose=False)
    dm = SyntheticDataModule(cache_dir)
    trainer = pl.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", devices=1,
        val_check_interval=steps, check_val_every_n_epoch=None,
    )
    trainer.fit(TinyRegressor(dm.dim), datamodule=dm)
    events = dm.cache.history
    hooks = ["prepare_data"] * 3 + ["setup"] * 3
    return [(h, e.stage, e.status) for h, e in zip(hooks, events)], float(trainer.callback_metrics["val_loss"])


def main(argv: list[str] | None = None) -> list[list[tuple[str, str, str]]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default="runs/preprocess_cache")
    p.add_argument("--keep", action="store_true", help="keep the cache from an earlier run of the script")
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args(argv)
    if not a.keep:
        shutil.rmtree(a.cache, ignore_errors=True)
    runs = []
    for i in (1, 2):
        events, val_loss = run(a.cache, a.steps)
        runs.append(events)
        print(f"run {i}: val_loss={val_loss:.4f}")
        for hook, stage, status in events:
            print(f"  {hook:<13} {stage:<10} {status}")
    return runs


if __name__ == "__main__":
    main()
