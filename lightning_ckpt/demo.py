"""A small model, synthetic data and a resumable shuffling loader, used by the examples, the YAML recipes, the
tests and the benchmarks. Runs on CPU in seconds. Not part of the stable API."""
from __future__ import annotations

from typing import Any, Iterator, Optional

import lightning.pytorch as pl
import torch
from torch import nn


class ResumableLoader:
    """Shuffles a tensor dataset with its own generator (the global RNG is never touched) and can resume in the
    middle of an epoch: Lightning stores ``state_dict()`` in its checkpoints and calls ``load_state_dict`` on resume.

    Args:
        tensors: tensors with the same first dimension; each batch is a tuple of slices of them.
        batch_size: samples per batch (the last batch of an epoch may be smaller).
        shuffle: draw a new permutation every epoch from ``seed`` and the epoch number.
        seed: base seed of the permutation.
    """

    def __init__(self, *tensors: torch.Tensor, batch_size: int = 32, shuffle: bool = True, seed: int = 0) -> None:
        if not tensors or any(t.shape[0] != tensors[0].shape[0] for t in tensors):
            raise ValueError("ResumableLoader needs tensors with the same first dimension")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is invalid; it must be a positive integer")
        self.tensors = tensors
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.position = 0  # batches already yielded in self.epoch

    def __len__(self) -> int:
        n = self.tensors[0].shape[0]
        return (n + self.batch_size - 1) // self.batch_size

    def _order(self) -> torch.Tensor:
        n = self.tensors[0].shape[0]
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(n, generator=g)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0
        order = self._order()
        while self.position < len(self):
            idx = order[self.position * self.batch_size : (self.position + 1) * self.batch_size]
            self.position += 1
            yield tuple(t[idx] for t in self.tensors)
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


def synthetic_regression(n: int = 512, in_features: int = 16, out_features: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    w = torch.randn(in_features, out_features, generator=g)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(n, out_features, generator=g)
    return x, y


class DemoModel(pl.LightningModule):
    """An MLP with dropout, Adam and a step LR schedule.

    Args:
        in_features: input width.
        hidden: hidden width (the parameter count grows with its square).
        out_features: output width.
        layers: number of hidden layers.
        dropout: dropout probability (uses the global torch RNG, which checkpoints restore).
        lr: Adam learning rate.
        frozen_layers: the first this many hidden layers are frozen (``requires_grad=False``), as in a fine-tune of a
            pretrained backbone: deduplicated checkpoints write them once.
    """

    def __init__(self, in_features: int = 16, hidden: int = 64, out_features: int = 4, layers: int = 2,
                 dropout: float = 0.1, lr: float = 1e-2, frozen_layers: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        mods: list[nn.Module] = []
        width = in_features
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        mods.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*mods)
        if not 0 <= frozen_layers <= layers:
            raise ValueError(f"frozen_layers={frozen_layers} must be between 0 and layers={layers}")
        for i in range(frozen_layers):
            self.net[3 * i].requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), prog_bar=True)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class DemoDataModule(pl.LightningDataModule):
    """Synthetic regression data served by :class:`ResumableLoader`.

    Args:
        n_train: training samples.
        n_val: validation samples.
        batch_size: samples per batch.
        in_features: input width (must match the model).
        out_features: target width (must match the model).
        seed: seed of the data and of the shuffling.
    """

    def __init__(self, n_train: int = 512, n_val: int = 128, batch_size: int = 32, in_features: int = 16, out_features: int = 4, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._train: Optional[ResumableLoader] = None

    def setup(self, stage: str) -> None:
        x, y = synthetic_regression(self.hparams.n_train + self.hparams.n_val, self.hparams.in_features, self.hparams.out_features, self.hparams.seed)
        n = self.hparams.n_train
        self.train_xy = (x[:n], y[:n])
        self.val_xy = (x[n:], y[n:])

    def train_dataloader(self) -> ResumableLoader:
        self._train = ResumableLoader(*self.train_xy, batch_size=self.hparams.batch_size, shuffle=True, seed=self.hparams.seed)
        return self._train

    def val_dataloader(self) -> ResumableLoader:
        return ResumableLoader(*self.val_xy, batch_size=self.hparams.batch_size, shuffle=False)
