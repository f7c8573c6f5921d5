"""EarlyStopAndSave with a real Trainer."""
from __future__ import annotations

import functools
import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_ckpt import EarlyStopAndSave, PeriodicCheckpoint, latest_checkpoint, list_checkpoints, load_checkpoint
from lightning_ckpt.demo import DemoModel

import support
from support import data, scripted


trainer = functools.partial(support.trainer, val_every=2, max_steps=40)


def tagged(dirpath, tag):
    return [c for c in list_checkpoints(str(dirpath)) if tag in c.tags]


PLATEAU = {2: 0.5, 4: 0.25, 6: 0.375, 8: 0.3125, 10: 0.125}  # exact in float32; best at 4, then 2 bad checks


def test_stops_on_plateau_after_patience_checks(tmp_path):
    es = EarlyStopAndSave(str(tmp_path), monitor="score", patience=2, restore_best_weights=False)
    t = trainer([es], max_steps=40)
    t.fit(scripted(PLATEAU), data())
    assert t.global_step == 8 < 40
    assert es.stopped_step == 8 and "did not improve" in es.stop_reason
    assert es.best_score == 0.25 and es.best_step == 4
    best = tagged(tmp_path, "best")
    assert [c.step for c in best] == [4]
    assert best[0].metrics["score"] == 0.25
    stop = tagged(tmp_path, "early-stop")
    assert [c.step for c in stop] == [8]
    # the early-stop checkpoint holds the full training state at the stop
    ck = load_checkpoint(stop[0].path)
    assert ck["global_step"] == 8 and "optimizer_states" in ck
    # the first best (step 2) was replaced by the better one
    assert [c.step for c in list_checkpoints(str(tmp_path))] == [4, 8]


def test_plateau_with_real_val_loss_stops_early(tmp_path):
    # lr=0: the weights never change, so val_loss is the same at every check: best at the first, then a plateau
    es = EarlyStopAndSave(str(tmp_path), monitor="val_loss", patience=2, restore_best_weights=False)
    t = trainer([es], max_steps=40)
    t.fit(DemoModel(lr=0.0), data())
    assert t.global_step == 6
    assert [c.step for c in tagged(tmp_path, "early-stop")] == [6]
    best = tagged(tmp_path, "best")
    assert [c.step for c in best] == [2] and best[0].metrics["val_loss"] == pytest.approx(es.best_score)


def test_restore_best_weights(tmp_path):
    es = EarlyStopAndSave(str(tmp_path), monitor="score", patience=2, restore_best_weights=True)
    model = scripted(PLATEAU, lr=0.05)
    trainer([es], max_steps=40).fit(model, data())
    # the best-scoring checkpoint tagged 'best' (a stale earlier best, if any, scores worse)
    best = min(tagged(tmp_path, "best"), key=lambda c: c.metrics["score"])
    assert best.step == es.best_step == 4
    best_sd = load_checkpoint(best.path)["state_dict"]
    stop_sd = load_checkpoint(tagged(tmp_path, "early-stop")[0].path)["state_dict"]
    now = model.state_dict()
    assert set(now) == set(best_sd)
    assert all(torch.equal(now[k], best_sd[k]) for k in now)
    assert any(not torch.equal(now[k], stop_sd[k]) for k in now)


def test_without_restore_model_keeps_last_weights(tmp_path):
    es = EarlyStopAndSave(str(tmp_path), monitor="score", patience=2, restore_best_weights=False)
    model = scripted(PLATEAU, lr=0.05)
    trainer([es], max_steps=40).fit(model, data())
    stop_sd = load_checkpoint(tagged(tmp_path, "early-stop")[0].path)["state_dict"]
    now = model.state_dict()
    assert all(torch.equal(now[k], stop_sd[k]) for k in now)


def test_stopping_threshold_stops_at_once(tmp_path):
    es = EarlyStopAndSave(str(tmp_path), monitor="score", patience=10, stopping_threshold=0.3, restore_best_weights=False)
    t = trainer([es])
    t.fit(scripted({2: 0.5, 4: 0.25, 6: 0.125}), data())
    assert t.global_step == 4
    assert "stopping_threshold" in es.stop_reason
    ck = list_checkpoints(str(tmp_path))[-1]
    assert ck.step == 4 and set(ck.tags) >= {"best", "early-stop"}


def test_divergence_threshold_stops_at_once(tmp_path):
    es = EarlyStopAndSave(str(tmp_path), monitor="score", patience=10, divergence_threshold=1.0, restore_best_weights=False)
    t = trainer([es])
    t.fit(scripted({2: 0.5, 4: 0.75, 6: 2.0, 8: 0.25}), data())
    assert t.global_step == 6
    assert "divergence_threshold" in es.stop_reason
    assert [c.step for c in tagged(tmp_path, "early-stop")] == [6]
    assert [c.step for c in tagged(tmp_path, "best")] == [2]


def test_divergence_threshold_mode_max(tmp_path):
    es = EarlyStopAndSave(str(tmp_path), monitor="score", mode="max", patience=10, divergence_threshold=0.1, restore_best_weights=False)
    t = trainer([es])
    t.fit(scripted({2: 0.5, 4: 0.75, 6: 0.0625, 8: 0.875}), data())
    assert t.global_step == 6
    assert es.best_score == 0.75


def test_nan_stops_at_once(tmp_path):
    es = EarlyStopAndSave(str(tmp_path), monitor="score", patience=10, restore_best_weights=False)
    t = trainer([es])
    t.fit(scripted({2: 0.5, 4: 0.25, 6: float("nan"), 8: 0.125}), data())
    assert t.global_step == 6
    assert "not finite" in es.stop_reason
    assert es.best_score == 0.25
    assert [c.step for c in tagged(tmp_path, "early-stop")] == [6]


def test_nan_ignored_without_check_finite(tmp_path):
    es = EarlyStopAndSave(str(tmp_path), monitor="score", patience=10, check_finite=False, restore_best_weights=False)
    t = trainer([es], max_steps=10)
    t.fit(scripted({2: 0.5, 4: 0.25, 6: float("nan"), 8: 0.125, 10: 0.25}), data())
    assert t.global_step == 10 and es.stopped_step is None
    assert es.best_score == 0.125


@pytest.mark.parametrize(
    "mode, stop, div",
    [("min", 0.5, 0.4), ("min", 0.5, 0.5), ("max", 0.9, 0.95), ("max", 0.9, 0.9)],
)
def test_overlapping_thresholds_raise(tmp_path, mode, stop, div):
    with pytest.raises(ValueError, match="overlap"):
        EarlyStopAndSave(str(tmp_path), monitor="score", mode=mode, stopping_threshold=stop, divergence_threshold=div)


def test_consistent_thresholds_are_fine(tmp_path):
    EarlyStopAndSave(str(tmp_path), monitor="score", mode="min", stopping_threshold=0.1, divergence_threshold=5.0)
    EarlyStopAndSave(str(tmp_path), monitor="score", mode="max", stopping_threshold=0.9, divergence_threshold=0.1)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"patience": 0}, "patience=0"), ({"stopping_threshold": math.inf}, "stopping_threshold=inf"),
     ({"divergence_threshold": "big"}, "divergence_threshold='big'"), ({"mode": "up"}, "mode='up'")],
)
def test_bad_settings(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        EarlyStopAndSave(str(tmp_path), monitor="score", **kwargs)


class Probe(Callback):
    def __init__(self, es):
        self.es = es
        self.at_start = None

    def on_train_start(self, trainer, pl_module):
        self.at_start = (self.es.wait_count, self.es.best_score, self.es.best_step)


def test_resume_keeps_wait_count_and_best_score(tmp_path):
    values = {2: 0.5, 4: 0.25, 6: 0.375, 8: 0.3125, 10: 0.4375, 12: 0.375, 14: 0.5}
    es1 = EarlyStopAndSave(str(tmp_path), monitor="score", patience=3, restore_best_weights=False)
    pc1 = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=6)
    trainer([es1, pc1], max_steps=6).fit(scripted(values), data())
    assert (es1.wait_count, es1.best_score, es1.best_step) == (1, 0.25, 4)
    path = latest_checkpoint(str(tmp_path))
    assert path.endswith("step=000006")

    es2 = EarlyStopAndSave(str(tmp_path), monitor="score", patience=3, restore_best_weights=True)
    pc2 = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=6)
    probe = Probe(es2)
    model = scripted(values)
    t = trainer([es2, pc2, probe], max_steps=40)
    t.fit(model, data(), ckpt_path=path)
    assert probe.at_start == (1, 0.25, 4)
    # two more bad checks (8, 10) complete the patience of 3 begun before the resume
    assert t.global_step == 10
    assert es2.best_step == 4 and es2.best_score == 0.25
    # the best checkpoint of the first run is the one restored, and it is still there
    best = tagged(tmp_path, "best")
    assert [c.step for c in best] == [4]
    best_sd = load_checkpoint(best[0].path)["state_dict"]
    assert all(torch.equal(v, best_sd[k]) for k, v in model.state_dict().items())


def test_previous_best_deleted_on_slow_storage(tmp_path, monkeypatch):
    """Storage slower than training: a new best arrives before the previous best is committed. The previous one
    must still be deleted once the new one is committed."""
    import time

    from lightning_ckpt.store.local import LocalTransaction

    real = LocalTransaction.write_tensors

    def slow(*a, **k):
        time.sleep(0.1)
        return real(*a, **k)

    monkeypatch.setattr(LocalTransaction, "write_tensors", slow)
    es = EarlyStopAndSave(str(tmp_path), monitor="score", patience=5, restore_best_weights=False)
    trainer([es], max_steps=8).fit(scripted({2: 0.5, 4: 0.25, 6: 0.125, 8: 0.0625}), data())
    assert [(c.step, c.tags) for c in list_checkpoints(str(tmp_path))] == [(8, ["best"])]
