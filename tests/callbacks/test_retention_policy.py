"""RetentionPolicy with saving callbacks on the same folder and a real Trainer."""
from __future__ import annotations

import functools
import logging

import pytest

from lightning_ckpt import BestMetricCheckpoint, PeriodicCheckpoint, RetentionPolicy, latest_checkpoint, list_checkpoints
from lightning_ckpt.demo import DemoModel

import support
from support import data, scripted


trainer = functools.partial(support.trainer, val_every=None, max_steps=10)


def steps(d):
    return [c.step for c in list_checkpoints(str(d))]


def test_keep_last_two(tmp_path):
    pc = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=2, save_on_train_end=False)
    rp = RetentionPolicy(str(tmp_path), keep_last=2)
    trainer([pc, rp], max_steps=10).fit(DemoModel(), data())
    assert steps(tmp_path) == [8, 10]
    assert sorted(rp.deleted) == ["step=000002", "step=000004", "step=000006"]
    assert latest_checkpoint(str(tmp_path)).endswith("step=000010")


def test_keep_last_with_milestones(tmp_path):
    pc = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=2, save_on_train_end=False)
    rp = RetentionPolicy(str(tmp_path), keep_last=1, keep_every_n_steps=4)
    trainer([pc, rp], max_steps=10).fit(DemoModel(), data())
    assert steps(tmp_path) == [4, 8, 10]


def test_max_total_bytes(tmp_path):
    # measure one checkpoint first
    probe = tmp_path / "probe"
    trainer([PeriodicCheckpoint(str(probe), every_n_train_steps=1, save_on_train_end=False)], max_steps=1).fit(DemoModel(), data())
    size = list_checkpoints(str(probe))[0].size_bytes
    d = tmp_path / "run"
    pc = PeriodicCheckpoint(str(d), every_n_train_steps=2, save_on_train_end=False)
    rp = RetentionPolicy(str(d), max_total_bytes=int(size * 2.5))
    trainer([pc, rp], max_steps=10).fit(DemoModel(), data())
    assert steps(d) == [8, 10]
    assert sum(c.size_bytes for c in list_checkpoints(str(d))) <= size * 2.5


def test_best_k_of_best_metric_checkpoint_is_protected(tmp_path):
    # val every 2 steps; 'score' best at step 2 and 4 (top_k=2); keep_last=1 would delete them
    model = scripted({2: 0.125, 4: 0.25, 6: 0.5, 8: 0.75, 10: 0.875})
    pc = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=2, save_on_train_end=False)
    best = BestMetricCheckpoint(str(tmp_path), monitor="score", top_k=2)
    rp = RetentionPolicy(str(tmp_path), keep_last=1)
    trainer([pc, best, rp], val_every=2, max_steps=10).fit(model, data())
    assert steps(tmp_path) == [2, 4, 10]
    assert {c.step for c in list_checkpoints(str(tmp_path)) if "best" in c.tags} == {2, 4}


def test_checkpoint_resumed_from_is_kept(tmp_path):
    pc = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=2, save_on_train_end=False)
    trainer([pc], max_steps=4).fit(DemoModel(), data())
    assert steps(tmp_path) == [2, 4]
    resume = latest_checkpoint(str(tmp_path))
    pc2 = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=2, save_on_train_end=False)
    rp = RetentionPolicy(str(tmp_path), keep_last=1)
    t = trainer([pc2, rp], max_steps=10)
    t.fit(DemoModel(), data(), ckpt_path=resume)
    assert t.global_step == 10
    assert steps(tmp_path) == [4, 10]  # 4: resumed from; 10: newest; 2, 6, 8: deleted


def test_dry_run_deletes_nothing_and_logs(tmp_path, caplog):
    pc = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=2, save_on_train_end=False)
    rp = RetentionPolicy(str(tmp_path), keep_last=1, dry_run=True)
    with caplog.at_level(logging.INFO, logger="lightning_ckpt"):
        trainer([pc, rp], max_steps=8).fit(DemoModel(), data())
    assert steps(tmp_path) == [2, 4, 6, 8]
    assert rp.deleted == []
    assert any("would delete" in r.getMessage() for r in caplog.records)


def test_without_saving_callback_on_its_folder_raises_at_fit_start(tmp_path):
    pc = PeriodicCheckpoint(str(tmp_path / "a"), every_n_train_steps=2)
    rp = RetentionPolicy(str(tmp_path / "b"), keep_last=1)
    with pytest.raises(ValueError, match="no saving callback"):
        trainer([pc, rp], max_steps=2).fit(DemoModel(), data())
    with pytest.raises(ValueError, match="no saving callback"):
        trainer([RetentionPolicy(str(tmp_path / "c"), keep_last=1)], max_steps=2).fit(DemoModel(), data())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "at least one rule"),
        ({"mode": "max"}, "at least one rule"),
        ({"keep_last": 0}, "keep_last=0"),
        ({"keep_best": 1}, "monitor"),
        ({"keep_last": 1, "mode": "x"}, "mode='x'"),
    ],
)
def test_bad_settings(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        RetentionPolicy(str(tmp_path), **kwargs)
