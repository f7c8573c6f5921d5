"""The Trainer, data and scripted-metric model the in-process tests train with."""
from __future__ import annotations

import time
from typing import Iterable

import lightning.pytorch as pl

from lightning_ckpt.demo import DemoDataModule, DemoModel


def trainer(callbacks: Iterable = (), *, val_every: int | str | None = "lightning", **kw) -> pl.Trainer:
    """A quiet Trainer (no logger, progress bar or model summary) with ``callbacks``.

    ``val_every``: ``N`` validates every N training steps (no sanity check); ``None`` never validates
    (``limit_val_batches=0``); ``"lightning"`` keeps Lightning's defaults (each epoch, after a sanity check).
    Every other keyword goes to ``Trainer`` (``max_steps``, ``logger``, ...). Test modules with their own defaults
    bind them with ``functools.partial``.
    """
    if val_every is None:
        kw.setdefault("limit_val_batches", 0)
    elif val_every != "lightning":
        kw.update(val_check_interval=val_every, check_val_every_n_epoch=None)
        kw.setdefault("num_sanity_val_steps", 0)
    kw.setdefault("logger", False)
    return pl.Trainer(callbacks=list(callbacks), enable_progress_bar=False, enable_model_summary=False, **kw)


def fit(callbacks: Iterable = (), *, model: pl.LightningModule | None = None, datamodule=None, ckpt_path=None,
        **trainer_kw) -> pl.Trainer:
    """Trains ``model`` (a fresh ``DemoModel`` by default) on ``datamodule`` (:func:`data` by default) with a
    :func:`trainer` built from ``callbacks`` and ``trainer_kw``; returns the Trainer."""
    t = trainer(callbacks, **trainer_kw)
    t.fit(DemoModel() if model is None else model, data() if datamodule is None else datamodule, ckpt_path=ckpt_path)
    return t


def data(**kw) -> DemoDataModule:
    """The demo data: 64 training samples in batches of 16 (4 batches per epoch), 32 validation samples."""
    kw.setdefault("n_train", 64)
    kw.setdefault("n_val", 32)
    kw.setdefault("batch_size", 16)
    return DemoDataModule(**kw)


class Scripted(DemoModel):
    """Logs ``score`` at validation and ``tscore`` in ``training_step`` from tables indexed by the step they belong
    to: ``script[trainer.global_step]`` at validation (1.0 for a step not in the table, or a ``KeyError`` with
    ``strict``), and ``train_script[s]`` when step ``s`` ends. ``sleep_s``: each training step sleeps that long."""

    script: dict = {}
    train_script: dict = {}
    sleep_s: float = 0.0
    strict: bool = False

    def training_step(self, batch, batch_idx):
        if self.sleep_s:
            time.sleep(self.sleep_s)
        loss = super().training_step(batch, batch_idx)
        if self.train_script:
            self.log("tscore", float(self.train_script[self.trainer.global_step + 1]))
        return loss

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        step = self.trainer.global_step
        self.log("score", float(self.script[step] if self.strict else self.script.get(step, 1.0)))


def scripted(script: dict | None = None, train_script: dict | None = None, sleep_s: float = 0.0, strict: bool = False,
             **model_kw) -> Scripted:
    m = Scripted(**model_kw)
    m.script = dict(script or {})
    m.train_script = dict(train_script or {})
    m.sleep_s = sleep_s
    m.strict = strict
    return m
