"""PeriodicCheckpoint with a real Trainer."""
from __future__ import annotations

import errno
import functools
import logging
import os

import lightning.pytorch as pl
import pytest
import torch

from lightning_ckpt import (
    CheckpointWriteError,
    LightningCkptIO,
    PeriodicCheckpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    verify_checkpoint,
)
from lightning_ckpt.demo import DemoModel
from lightning_ckpt.store.local import LocalTransaction

import support
from support import data

trainer = functools.partial(support.trainer, max_steps=10)  # Lightning's validation: each epoch (4 batches)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"every_n_train_steps": 5, "every_n_epochs": 1}, "every_n_train_steps and every_n_epochs"),
        ({"every_n_train_steps": 0}, "every_n_train_steps=0"),
        ({"every_n_epochs": -1}, "every_n_epochs=-1"),
        ({"every_n_seconds": "soon"}, "every_n_seconds='soon'"),
        ({"every_n_train_steps": 2.5}, "every_n_train_steps=2.5"),
        ({"name_template": "ckpt"}, "name_template"),
        ({"name_template": "a/{step}"}, "name_template"),
        ({"if_busy": "drop"}, "if_busy"),
    ],
)
def test_bad_settings_raise_valueerror_naming_the_setting(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        PeriodicCheckpoint(str(tmp_path), **kwargs)


@pytest.mark.smoke
def test_every_n_train_steps_and_final(tmp_path):
    cb = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=3)
    trainer([cb], max_steps=10).fit(DemoModel(), data())
    ckpts = list_checkpoints(str(tmp_path))
    assert [(c.step, c.tags) for c in ckpts] == [(3, ["periodic"]), (6, ["periodic"]), (9, ["periodic"]), (10, ["final"])]
    assert latest_checkpoint(str(tmp_path)).endswith("step=000010")
    m = ckpts[0].manifest
    assert "train_loss" in m["metrics"] and isinstance(m["metrics"]["train_loss"], float)
    assert m["hparams"]["hidden"] == 64
    assert m["run"]["versions"]["torch"] == torch.__version__ and m["run"]["host"]
    assert m["timings"]["bytes"] == ckpts[0].size_bytes and m["timings"]["write_s"] > 0


def test_no_final_duplicate_when_last_step_was_saved(tmp_path):
    cb = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=5)
    trainer([cb], max_steps=10).fit(DemoModel(), data())
    assert [c.step for c in list_checkpoints(str(tmp_path))] == [5, 10]


def test_default_is_every_epoch(tmp_path):
    cb = PeriodicCheckpoint(str(tmp_path), save_on_train_end=False)
    assert cb.trigger.every_n_epochs == 1
    trainer([cb], max_steps=-1, max_epochs=3).fit(DemoModel(), data())
    assert [c.step for c in list_checkpoints(str(tmp_path))] == [4, 8, 12]
    assert [c.epoch for c in list_checkpoints(str(tmp_path))] == [0, 1, 2]


def test_every_n_seconds(tmp_path):
    cb = PeriodicCheckpoint(str(tmp_path), every_n_seconds=1e-9, save_on_train_end=False)
    trainer([cb], max_steps=4).fit(DemoModel(), data())
    assert [c.step for c in list_checkpoints(str(tmp_path))] == [1, 2, 3, 4]


@pytest.mark.smoke
def test_sync_save_and_plain_trainer_resume(tmp_path):
    cb = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=4, async_save=False)
    trainer([cb], max_steps=8).fit(DemoModel(), data())
    path = latest_checkpoint(str(tmp_path))
    ck = load_checkpoint(path)
    assert ck["global_step"] == 8 and set(ck) >= {"state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks", "epoch"}
    # a Trainer with our callback resumes with no plugin argument
    cb2 = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=4)
    t = trainer([cb2], max_steps=12)
    t.fit(DemoModel(), data(), ckpt_path=path)
    assert t.global_step == 12
    # without our callbacks, the CheckpointIO plugin reads our folders (here for validate)
    t3 = trainer([], plugins=[LightningCkptIO()], max_steps=1)
    m = DemoModel()
    t3.validate(m, data(), ckpt_path=latest_checkpoint(str(tmp_path)), verbose=False)
    assert torch.equal(m.state_dict()["net.0.weight"], load_checkpoint(latest_checkpoint(str(tmp_path)))["state_dict"]["net.0.weight"])


def test_async_host_buffers_are_reused(tmp_path):
    cb = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=1)
    trainer([cb], max_steps=6).fit(DemoModel(), data())
    assert len(list_checkpoints(str(tmp_path))) == 6
    # teardown closed the writer; what it allocated is recorded on the instance
    assert cb._last_buffer_allocations == cb._last_buffer_tensors


def test_background_failure_is_raised_and_earlier_checkpoints_survive(tmp_path, monkeypatch, caplog):
    real = LocalTransaction.write_tensors
    calls = {"n": 0}

    def flaky(tx, *a, **k):
        if "step=000004" in tx.path:
            raise OSError(errno.ENOSPC, "No space left on device")
        calls["n"] += 1
        return real(tx, *a, **k)

    monkeypatch.setattr(LocalTransaction, "write_tensors", flaky)
    cb = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=2, async_save=True, save_on_train_end=False)
    with caplog.at_level(logging.ERROR, logger="lightning_ckpt"), pytest.raises(CheckpointWriteError, match="No space left"):
        trainer([cb], max_steps=8).fit(DemoModel(), data())
    assert any("failed" in r.getMessage() for r in caplog.records)  # logged when it happened
    steps = [c.step for c in list_checkpoints(str(tmp_path))]
    assert steps == [2]  # raised at the next save (step 6), nothing after it was written
    verify_checkpoint(latest_checkpoint(str(tmp_path)))
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".partial-")]


def test_training_exception_keeps_inflight_save(tmp_path):
    class Boom(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 5:
                raise RuntimeError("boom")

    cb = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=5)
    with pytest.raises(RuntimeError, match="boom"):
        trainer([cb, Boom()], max_steps=10).fit(DemoModel(), data())
    assert [c.step for c in list_checkpoints(str(tmp_path))] == [5]
    verify_checkpoint(latest_checkpoint(str(tmp_path)))
