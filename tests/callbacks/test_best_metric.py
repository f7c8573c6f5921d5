"""BestMetricCheckpoint with a real Trainer."""
from __future__ import annotations

import functools

import pytest
from lightning.pytorch.callbacks import Callback

from lightning_ckpt import BestMetricCheckpoint, MonitorNotFoundError, latest_checkpoint, list_checkpoints
from lightning_ckpt.demo import DemoModel

import support
from support import data

trainer = functools.partial(support.trainer, val_every=2, max_steps=12)
scripted = functools.partial(support.scripted, strict=True)  # `score` = values[global_step]; a missing step fails


class RecordVal(Callback):
    """Every value of a metric seen at the end of validation, by step."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: dict[int, float] = {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.seen[trainer.global_step] = float(trainer.callback_metrics[self.name])


def best_only(dirpath):
    return [c for c in list_checkpoints(str(dirpath)) if c.tags == ["best"]]


@pytest.mark.parametrize("top_k", [1, 3])
def test_top_k_best_by_val_loss_remain(tmp_path, top_k):
    rec = RecordVal("val_loss")
    cb = BestMetricCheckpoint(str(tmp_path), monitor="val_loss", mode="min", top_k=top_k)
    trainer([cb, rec], max_steps=16).fit(DemoModel(lr=0.05), data())
    assert len(rec.seen) == 8
    remaining = best_only(tmp_path)
    assert len(remaining) == top_k
    # the manifests carry the metric; they are exactly the top_k smallest val_loss values of the run
    got = sorted(c.metrics["val_loss"] for c in remaining)
    assert got == pytest.approx(sorted(rec.seen.values())[:top_k])
    for c in remaining:
        assert c.metrics["val_loss"] == pytest.approx(rec.seen[c.step])
    assert cb.best_model_score == pytest.approx(min(rec.seen.values()))
    assert cb.best_model_path is not None and cb.best_model_path.endswith(f"step={min(rec.seen, key=rec.seen.get):06d}")


@pytest.mark.smoke
def test_scripted_min_top2_evicts_and_deletes(tmp_path):
    values = {2: 0.5, 4: 0.25, 6: 0.375, 8: 0.125, 10: 0.75, 12: 0.3125}  # exact in float32
    cb = BestMetricCheckpoint(str(tmp_path), monitor="score", top_k=2)
    trainer([cb], max_steps=12).fit(scripted(values), data())
    assert [(c.step, c.tags) for c in list_checkpoints(str(tmp_path))] == [(4, ["best"]), (8, ["best"])]
    assert [c.metrics["score"] for c in list_checkpoints(str(tmp_path))] == [0.25, 0.125]
    assert cb.best_k == [{"step": 8, "score": 0.125}, {"step": 4, "score": 0.25}]


def test_mode_max(tmp_path):
    values = {2: 0.5, 4: 0.25, 6: 0.875, 8: 0.125, 10: 0.75, 12: 0.9375}
    cb = BestMetricCheckpoint(str(tmp_path), monitor="score", mode="max", top_k=2)
    trainer([cb], max_steps=12).fit(scripted(values), data())
    assert sorted(c.step for c in best_only(tmp_path)) == [6, 12]
    assert cb.best_model_score == 0.9375


MINUS_ONE_VALUES = {2: 0.5, 4: 0.25, 6: 0.375, 8: 0.125, 10: 0.75, 12: 0.0625}


def test_top_k_minus_one_never_evicts(tmp_path):
    cb = BestMetricCheckpoint(str(tmp_path), monitor="score", top_k=-1)
    trainer([cb], max_steps=12).fit(scripted(MINUS_ONE_VALUES), data())
    steps = [c.step for c in best_only(tmp_path)]
    # every improvement on the best so far is kept, none is evicted
    assert set(steps) >= {2, 4, 8, 12}
    assert cb.best_model_path.endswith("step=000012")


def test_top_k_minus_one_saves_only_improvements(tmp_path):
    cb = BestMetricCheckpoint(str(tmp_path), monitor="score", top_k=-1)
    trainer([cb], max_steps=12).fit(scripted(MINUS_ONE_VALUES), data())
    # "keeps every improvement": 0.375 at step 6 and 0.75 at step 10 improve on nothing and are not 'best'
    assert [c.step for c in best_only(tmp_path)] == [2, 4, 8, 12]


def test_monitor_never_logged_raises_listing_the_logged_metrics(tmp_path):
    cb = BestMetricCheckpoint(str(tmp_path), monitor="val_acc")
    with pytest.raises(MonitorNotFoundError) as ei:
        trainer([cb], max_steps=4).fit(DemoModel(), data())
    msg = str(ei.value)
    assert "val_acc" in msg and "train_loss" in msg and "val_loss" in msg
    assert isinstance(ei.value, KeyError)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"top_k": 0}, "top_k=0"), ({"top_k": -2}, "top_k=-2"), ({"mode": "avg"}, "mode='avg'"), ({"every_n_train_steps": 0}, "every_n_train_steps=0")],
)
def test_bad_settings(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        BestMetricCheckpoint(str(tmp_path), monitor="val_loss", **kwargs)


class ProbeBestK(Callback):
    def __init__(self, cb):
        self.cb = cb
        self.at_start = None

    def on_train_start(self, trainer, pl_module):
        self.at_start = [dict(d) for d in self.cb.best_k]


def test_resume_restores_best_k_and_keeps_what_the_resumed_run_needs(tmp_path):
    values = {2: 0.5, 4: 0.25, 6: 0.375, 8: 0.3125, 10: 0.875, 12: 0.125}
    cb1 = BestMetricCheckpoint(str(tmp_path), monitor="score", top_k=2)
    trainer([cb1], max_steps=6).fit(scripted(values), data())
    assert [c.step for c in list_checkpoints(str(tmp_path))] == [4, 6]
    assert cb1.best_k == [{"step": 4, "score": 0.25}, {"step": 6, "score": 0.375}]
    path = latest_checkpoint(str(tmp_path))
    assert path.endswith("step=000006")

    cb2 = BestMetricCheckpoint(str(tmp_path), monitor="score", top_k=2)
    probe = ProbeBestK(cb2)
    t = trainer([cb2, probe], max_steps=12)
    t.fit(scripted(values), data(), ckpt_path=path)
    assert t.global_step == 12
    # the bookkeeping was restored before training went on
    assert probe.at_start == [{"step": 4, "score": 0.25}, {"step": 6, "score": 0.375}]
    # 8 (0.3125) entered and pushed out 6; 12 (0.125) entered and pushed out 8; 10 (0.875) never entered
    assert cb2.best_k == [{"step": 12, "score": 0.125}, {"step": 4, "score": 0.25}]
    steps = {c.step for c in list_checkpoints(str(tmp_path))}
    assert {4, 12} <= steps  # the first run's best survives the resumed run
    assert 8 not in steps and 10 not in steps and 2 not in steps
    assert steps <= {4, 6, 12}  # 6 may stay only as the checkpoint the run resumed from
    assert cb2.best_model_path.endswith("step=000012")


def test_eviction_of_a_save_still_being_written_on_slow_storage(tmp_path, monkeypatch):
    """Storage slower than training: a best checkpoint is evicted before its own (background) commit. It must
    still be deleted once a newer one is committed."""
    import time

    from lightning_ckpt.store.local import LocalTransaction

    real = LocalTransaction.write_tensors

    def slow(*a, **k):
        time.sleep(0.1)
        return real(*a, **k)

    monkeypatch.setattr(LocalTransaction, "write_tensors", slow)
    values = {2: 0.5, 4: 0.25, 6: 0.125, 8: 0.0625}  # each one evicts the previous
    cb = BestMetricCheckpoint(str(tmp_path), monitor="score", top_k=1)
    trainer([cb], max_steps=8).fit(scripted(values), data())
    assert [c.step for c in list_checkpoints(str(tmp_path))] == [8]
