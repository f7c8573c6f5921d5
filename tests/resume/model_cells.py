"""Cells of the resume matrix that train models and callbacks nobody here wrote, tiny and on CPU: a Hugging Face
GPT-2 (dropout, tied input/output embeddings), a Hugging Face ResNet (BatchNorm buffers) fed with augmentation drawn
from the global RNG, a torchmetrics metric held by the module, ReduceLROnPlateau (per epoch and per step), manual
optimization with two optimizers and two schedulers, and Lightning's StochasticWeightAveraging and
EMAWeightAveraging callbacks. See resume_cells.py for how a cell runs and what is compared."""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import lightning.pytorch as pl
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_ckpt import PeriodicCheckpoint
from resume_cells import BATCH, N_TRAIN, Cell, Net, fingerprint, tensors

logging.getLogger("transformers").setLevel(logging.ERROR)


def periodic(**kw):
    kw.setdefault("async_save", False)
    return lambda d, phase: [PeriodicCheckpoint(d, **kw)]


EVERY3 = periodic(every_n_train_steps=3)
EPOCHS = periodic(every_n_epochs=1)
MID, BOUNDARY = ("crash", 4), ("crash", 11)


# ------------------------------------------------------------------------------------------------ Hugging Face models
class HF(pl.LightningModule):
    """Trains a Hugging Face model; records every batch it trains on."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "gpt2":
            from transformers import GPT2Config, GPT2LMHeadModel

            cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                             eos_token_id=0, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, loss_type="ForCausalLM")
            self.model = GPT2LMHeadModel(cfg)
        else:
            from transformers import ResNetConfig, ResNetForImageClassification

            cfg = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                               layer_type="basic", num_labels=4, loss_type="ForImageClassification")
            self.model = ResNetForImageClassification(cfg)
        self.seen: list = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.seen.append((int(self.trainer.global_step), int(self.current_epoch), int(batch_idx), fingerprint(x)))
        if self.kind == "gpt2":
            return self.model(input_ids=x, labels=x).loss
        return self.model(pixel_values=x, labels=y).loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        out = self.model(input_ids=x, labels=x) if self.kind == "gpt2" else self.model(pixel_values=x, labels=y)
        self.log("val_loss", out.loss)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return [opt], [{"scheduler": torch.optim.lr_scheduler.StepLR(opt, 4, 0.9), "interval": "step"}]


def tokens(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 64, (n, 16), generator=g)
    return TensorDataset(x, x)


class AugmentedImages(Dataset):
    """Images with random flips and noise drawn from the global torch RNG in ``__getitem__`` (as torchvision
    transforms do)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.y = torch.randint(0, 4, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.x[i]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        return img + 0.1 * torch.randn_like(img), self.y[i]


def gpt2_cell(name: str, callbacks, stop, **kw) -> Cell:
    return Cell(name, callbacks, stop, model=lambda: HF("gpt2"), trainer={"max_steps": 14},
                make_train=lambda: StatefulDataLoader(tokens(N_TRAIN, 1), batch_size=BATCH, shuffle=True),
                make_val=lambda: StatefulDataLoader(tokens(8, 2), batch_size=4), ref="gpt2", **kw)


def resnet_cell(name: str, callbacks, stop, **kw) -> Cell:
    return Cell(name, callbacks, stop, model=lambda: HF("resnet"), trainer={"max_steps": 14},
                make_train=lambda: StatefulDataLoader(AugmentedImages(N_TRAIN, 1), batch_size=BATCH, shuffle=True),
                make_val=lambda: StatefulDataLoader(AugmentedImages(8, 2), batch_size=4), ref="resnet", **kw)


# ------------------------------------------------------------------------------------------------ manual optimization
class TwoOptimizers(pl.LightningModule):
    """Manual optimization: two networks, two optimizers, a per-step and a per-epoch scheduler stepped by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.Linear(16, 1))
        self.b = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.Linear(16, 1))
        self.seen: list = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.seen.append((int(self.trainer.global_step), int(self.current_epoch), int(batch_idx), fingerprint(x)))
        opt_a, opt_b = self.optimizers()
        sched_a, _ = self.lr_schedulers()
        for net, opt in ((self.a, opt_a), (self.b, opt_b)):
            loss = nn.functional.mse_loss(net(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        sched_a.step()

    def on_train_epoch_end(self) -> None:
        self.lr_schedulers()[1].step()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.a(x) + self.b(x), y))

    def configure_optimizers(self) -> Any:
        opt_a = torch.optim.Adam(self.a.parameters(), lr=0.02)
        opt_b = torch.optim.SGD(self.b.parameters(), lr=0.05, momentum=0.9)
        return [opt_a, opt_b], [torch.optim.lr_scheduler.StepLR(opt_a, 3, 0.8),
                                torch.optim.lr_scheduler.ExponentialLR(opt_b, 0.7)]


def swa(phase: str) -> list:
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    return [StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=2, annealing_epochs=2)]


def ema(phase: str) -> list:
    from lightning.pytorch.callbacks import EMAWeightAveraging

    return [EMAWeightAveraging(decay=0.8)]


# the step-interval plateau scheduler steps every 2nd batch: a save at batch 4 is followed by one
PLATEAU_STEP = {"max_steps": 25}

CELLS = [
    gpt2_cell("GPT-2 (dropout, tied embeddings), mid-epoch", EVERY3, MID),
    gpt2_cell("GPT-2 (dropout, tied embeddings), epoch end", EPOCHS, BOUNDARY),
    resnet_cell("ResNet with global-RNG augmentation, mid-epoch", EVERY3, MID),
    resnet_cell("ResNet with global-RNG augmentation, epoch end", EPOCHS, BOUNDARY),
    Cell("torchmetrics metric in the module, mid-epoch", EVERY3, MID, model=lambda: Net(metric=True), ref="metric"),
    Cell("torchmetrics metric in the module, epoch end", EPOCHS, BOUNDARY, model=lambda: Net(metric=True),
         ref="metric"),
    Cell("ReduceLROnPlateau per epoch, mid-epoch", EVERY3, MID, model=lambda: Net(sched="plateau"), ref="plateau"),
    Cell("ReduceLROnPlateau per epoch, epoch end", EPOCHS, BOUNDARY, model=lambda: Net(sched="plateau"),
         ref="plateau"),
    Cell("ReduceLROnPlateau per step, after the batch", periodic(every_n_train_steps=4), ("crash", 5),
         model=lambda: Net(sched="plateau_step"), ref="plateau_step"),
    Cell("ReduceLROnPlateau per step, after a validation", periodic(every_n_train_steps=4), ("crash", 5),
         model=lambda: Net(sched="plateau_step"), trainer={"max_steps": 25, "val_check_interval": 4},
         ref="plateau_step_val4"),
    Cell("manual optimization, two optimizers and schedulers, mid-epoch", periodic(every_n_train_steps=6),
         ("crash", 8), model=TwoOptimizers, trainer={"max_steps": 50}, ref="manual"),
    Cell("manual optimization, two optimizers and schedulers, epoch end", EPOCHS, ("crash", 22),
         model=TwoOptimizers, trainer={"max_steps": 50}, ref="manual"),
    Cell("StochasticWeightAveraging, epoch end", EPOCHS, ("crash", 21), model=lambda: Net(sched="epoch"),
         extra=swa, trainer={"max_epochs": 4}, ref="swa"),
    Cell("StochasticWeightAveraging, mid-epoch", periodic(every_n_train_steps=3), ("crash", 25),
         model=lambda: Net(sched="epoch"), extra=swa, trainer={"max_epochs": 4}, ref="swa",
         expect="StochasticWeightAveraging sets up its SWALR scheduler", differs=True),
    Cell("EMAWeightAveraging, mid-epoch", EVERY3, MID, extra=ema, ref="ema"),
    Cell("EMAWeightAveraging, epoch end", EPOCHS, BOUNDARY, extra=ema, ref="ema"),
    Cell("EMAWeightAveraging, end of fit by max_steps", EVERY3, ("fit", {"max_steps": 7}), extra=ema, ref="ema"),
]

# run by test_kill.py through fork_server.py: the cut run dies by SIGKILL right after a commit
KILL_CELLS = [
    Cell("kill -9 right after a commit, mid-epoch, async save", periodic(every_n_train_steps=3, async_save=True),
         ("kill", 4)),
    gpt2_cell("GPT-2 killed after an epoch-end save", EPOCHS, ("kill", 11)),
    resnet_cell("ResNet with global-RNG augmentation killed mid-epoch", EVERY3, ("kill", 4)),
]
