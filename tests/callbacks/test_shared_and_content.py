"""One save per step for all callbacks on a folder; content / include; conditional and adaptive saving."""
from __future__ import annotations

import functools
import os

import pytest
import torch

import lightning_ckpt.writer.writer as writer_mod
from lightning_ckpt import (
    BestMetricCheckpoint,
    CheckpointMismatchError,
    EarlyStopAndSave,
    PeriodicCheckpoint,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    verify_checkpoint,
)
from lightning_ckpt.demo import DemoModel

import support
from support import data, scripted


trainer = functools.partial(support.trainer, val_every=None, max_steps=8)


def folders(d):
    return sorted(e for e in os.listdir(d) if not e.startswith(".") and os.path.isdir(os.path.join(d, e)))


@pytest.fixture
def save_calls(monkeypatch):
    calls = []
    real = writer_mod.CheckpointWriter.save

    def counting(self, state, *a, **k):
        calls.append((self.dirpath, k.get("step"), sorted(k.get("tags") or ())))
        return real(self, state, *a, **k)

    monkeypatch.setattr(writer_mod.CheckpointWriter, "save", counting)
    return calls


# --------------------------------------------------------------------------- one writer per folder


def test_three_callbacks_one_checkpoint_per_step(tmp_path, save_calls):
    # val every 4 steps: 4 -> 0.25 (best for both), 8 -> 0.5 (second best for top_k=2; a plateau for patience=1)
    model = scripted({4: 0.25, 8: 0.5})
    pc = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=4)
    best = BestMetricCheckpoint(str(tmp_path), monitor="score", top_k=2)
    es = EarlyStopAndSave(str(tmp_path), monitor="score", patience=1, restore_best_weights=False)
    t = trainer([pc, best, es], val_every=4, max_steps=20)
    t.fit(model, data())
    assert t.global_step == 8
    assert folders(tmp_path) == ["step=000004", "step=000008"]
    ckpts = list_checkpoints(str(tmp_path))
    assert [c.step for c in ckpts] == [4, 8]
    assert set(ckpts[0].tags) == {"periodic", "best"}
    assert set(ckpts[1].tags) >= {"periodic", "best", "early-stop"}
    assert ckpts[1].metrics["score"] == 0.5 and ckpts[0].metrics["score"] == 0.25
    # the state was written once per step
    steps_saved = [s for d, s, _ in save_calls if d == str(tmp_path)]
    assert steps_saved == [4, 8]


def test_periodic_and_best_same_step_without_early_stop(tmp_path, save_calls):
    model = scripted({2: 0.5, 4: 0.25, 6: 0.125, 8: 0.0625})
    pc = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=2)
    best = BestMetricCheckpoint(str(tmp_path), monitor="score", top_k=1)
    trainer([pc, best], val_every=2, max_steps=8).fit(model, data())
    assert folders(tmp_path) == [f"step={s:06d}" for s in (2, 4, 6, 8)]
    assert [s for _, s, _ in save_calls] == [2, 4, 6, 8]
    last = list_checkpoints(str(tmp_path))[-1]
    assert set(last.tags) == {"periodic", "best", "final"}


def test_different_dirpaths_save_independently(tmp_path, save_calls):
    a, b = tmp_path / "a", tmp_path / "b"
    pa = PeriodicCheckpoint(str(a), every_n_train_steps=2, save_on_train_end=False)
    pb = PeriodicCheckpoint(str(b), every_n_train_steps=3, save_on_train_end=False, content="weights")
    trainer([pa, pb], max_steps=6).fit(DemoModel(), data())
    assert [c.step for c in list_checkpoints(str(a))] == [2, 4, 6]
    assert [c.step for c in list_checkpoints(str(b))] == [3, 6]
    assert {c.kind for c in list_checkpoints(str(a))} == {"full"}
    assert {c.kind for c in list_checkpoints(str(b))} == {"weights"}
    assert sorted((os.path.basename(d), s) for d, s, _ in save_calls) == [("a", 2), ("a", 4), ("a", 6), ("b", 3), ("b", 6)]


def test_callbacks_on_one_folder_differing_only_in_async_save_or_fsync_work(tmp_path):
    """async_save and fsync are per callback: a synchronous save is written before its hook returns, and the folder
    gets the stronger durability. Only true conflicts (two name templates) are errors."""
    p1 = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=2, async_save=True, fsync=False)
    p2 = BestMetricCheckpoint(str(tmp_path), monitor="train_loss", every_n_train_steps=2, async_save=False)
    trainer([p1, p2], max_steps=4).fit(DemoModel(), data())
    assert [c.step for c in list_checkpoints(str(tmp_path))] == [2, 4]
    for c in list_checkpoints(str(tmp_path)):
        verify_checkpoint(c.path)
    p3 = PeriodicCheckpoint(str(tmp_path / "b"), every_n_train_steps=2, name_template="s{step}")
    p4 = BestMetricCheckpoint(str(tmp_path / "b"), monitor="train_loss", name_template="best-{step}")
    with pytest.raises(ValueError, match="name_template"):
        trainer([p3, p4], max_steps=2).fit(DemoModel(), data())


# --------------------------------------------------------------------------- content


def save_one(d, **kw):
    cb = PeriodicCheckpoint(str(d), every_n_train_steps=2, save_on_train_end=False, **kw)
    model = DemoModel()
    trainer([cb], max_steps=2).fit(model, data())
    (c,) = list_checkpoints(str(d))
    return c, model


def test_content_full_has_optimizer_states(tmp_path):
    c, _ = save_one(tmp_path)
    assert c.kind == "full"
    assert "optimizer_states" in load_checkpoint(c.path)


def test_content_weights(tmp_path):
    c, model = save_one(tmp_path, content="weights")
    assert c.kind == "weights"
    ck = load_checkpoint(c.path)
    assert "optimizer_states" not in ck
    assert ck["global_step"] == 2
    sd = model.state_dict()
    assert set(ck["state_dict"]) == set(sd)
    assert all(torch.equal(ck["state_dict"][k], sd[k]) for k in sd)


def test_content_light(tmp_path):
    c, _ = save_one(tmp_path, content="light")
    assert c.kind == "light"
    assert c.manifest["tensors"] == {}
    assert "train_loss" in c.metrics
    ck = load_checkpoint(c.path)
    assert "state_dict" not in ck and "optimizer_states" not in ck
    with pytest.raises(CheckpointMismatchError):
        load_weights(c.path, DemoModel())


def test_include_makes_a_partial_checkpoint(tmp_path):
    c, model = save_one(tmp_path, include=["state_dict/net.0.*"])
    assert c.kind == "partial"
    names = set(c.manifest["tensors"])
    assert names and all("net.0." in n for n in names), names
    assert len(names) == 2  # net.0.weight and net.0.bias, nothing of the optimizer
    ck = load_checkpoint(c.path)
    assert set(ck["state_dict"]) == {"net.0.weight", "net.0.bias"}

    fresh = DemoModel()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match="strict=False"):
        load_weights(c.path, fresh, strict=True)
    res = load_weights(c.path, fresh, strict=False)
    sd = fresh.state_dict()
    assert torch.equal(sd["net.0.weight"], model.state_dict()["net.0.weight"])
    assert torch.equal(sd["net.0.bias"], model.state_dict()["net.0.bias"])
    assert torch.equal(sd["net.3.weight"], before["net.3.weight"])  # untouched
    assert "net.3.weight" in res.missing_keys


def test_exclude(tmp_path):
    c, _ = save_one(tmp_path, exclude=["optimizer_states/*"])
    assert c.kind == "partial"
    assert not any(n.startswith("optimizer_states") for n in c.manifest["tensors"])
    assert any(n.startswith("state_dict/") for n in c.manifest["tensors"])


@pytest.mark.parametrize("kw", [{"content": "weights"}, {"content": "light"}, {"include": ["state_dict/net.0.*"]}])
def test_resume_from_a_non_full_checkpoint_raises(tmp_path, kw):
    c, _ = save_one(tmp_path / "src", **kw)
    t = trainer([PeriodicCheckpoint(str(tmp_path / "dst"), every_n_train_steps=2)], max_steps=4)
    with pytest.raises(CheckpointMismatchError, match="cannot resume"):
        t.fit(DemoModel(), data(), ckpt_path=c.path)


def test_bad_content_settings(tmp_path):
    with pytest.raises(ValueError, match="content='all'"):
        PeriodicCheckpoint(str(tmp_path), content="all")
    with pytest.raises(ValueError, match="light"):
        PeriodicCheckpoint(str(tmp_path), content="light", include=["state_dict/*"])
    with pytest.raises(ValueError, match="include"):
        PeriodicCheckpoint(str(tmp_path), include="state_dict/*")


# --------------------------------------------------------------------------- conditional saving


def test_only_on_improvement(tmp_path):
    ts = {1: 0.5, 2: 0.75, 3: 0.25, 4: 0.375, 5: 0.125, 6: 0.125, 7: 0.5, 8: 0.0625}
    cb = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=1, monitor="tscore", only_on_improvement=True, save_on_train_end=False)
    trainer([cb], max_steps=8).fit(scripted(train_script=ts), data())
    ckpts = list_checkpoints(str(tmp_path))
    assert [c.step for c in ckpts] == [1, 3, 5, 8]
    assert [c.metrics["tscore"] for c in ckpts] == [0.5, 0.25, 0.125, 0.0625]


def test_only_on_improvement_with_train_loss(tmp_path):
    cb = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=1, monitor="train_loss", only_on_improvement=True, save_on_train_end=False)
    trainer([cb], max_steps=12).fit(DemoModel(lr=0.05), data())
    losses = [c.metrics["train_loss"] for c in list_checkpoints(str(tmp_path))]
    assert len(losses) >= 1
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # every save improved on all earlier ones


def test_only_on_improvement_mode_max(tmp_path):
    ts = {1: 0.5, 2: 0.75, 3: 0.25, 4: 0.875, 5: 0.125, 6: 0.875, 7: 0.9375, 8: 0.0625}
    cb = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=1, monitor="tscore", mode="max", only_on_improvement=True, save_on_train_end=False)
    trainer([cb], max_steps=8).fit(scripted(train_script=ts), data())
    assert [c.step for c in list_checkpoints(str(tmp_path))] == [1, 2, 4, 7]


def test_on_change(tmp_path):
    ts = {1: 1.0, 2: 1.25, 3: 1.75, 4: 2.0, 5: 0.5, 6: 0.625, 7: 1.0, 8: 1.25}
    cb = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=1, monitor="tscore", on_change=0.5, save_on_train_end=False)
    trainer([cb], max_steps=8).fit(scripted(train_script=ts), data())
    assert [c.step for c in list_checkpoints(str(tmp_path))] == [1, 3, 5, 7]


def test_conditional_settings_raise(tmp_path):
    with pytest.raises(ValueError, match="mutually exclusive"):
        PeriodicCheckpoint(str(tmp_path), monitor="x", only_on_improvement=True, on_change=0.5)
    with pytest.raises(ValueError, match="monitor"):
        PeriodicCheckpoint(str(tmp_path), on_change=0.5)
    with pytest.raises(ValueError, match="monitor"):
        PeriodicCheckpoint(str(tmp_path), only_on_improvement=True)
    with pytest.raises(ValueError, match="on_change=0"):
        PeriodicCheckpoint(str(tmp_path), monitor="x", on_change=0)


# --------------------------------------------------------------------------- every="auto"


def test_every_auto_picks_an_interval(tmp_path, save_calls):
    cb = PeriodicCheckpoint(str(tmp_path), every="auto", max_overhead=0.5, save_on_train_end=False)
    t = trainer([cb], max_steps=24)
    t.fit(scripted(sleep_s=0.02), data())
    assert isinstance(cb.interval_steps, int) and cb.interval_steps >= 1
    saved = [c.step for c in list_checkpoints(str(tmp_path))]
    assert saved and saved[0] == cb.adaptive.warmup_steps  # nothing measured before the first save
    assert len(saved) < t.global_step
    assert cb.adaptive.step_s is not None and cb.adaptive.step_s >= 0.015
    assert cb.adaptive.stall_s is not None and cb.adaptive.stall_s > 0
    # the interval respects the measured overhead budget
    assert cb.interval_steps >= cb.adaptive.stall_s / (0.5 * cb.adaptive.step_s) - 1e-6 or cb.interval_steps == 1


def test_every_auto_with_another_trigger_raises(tmp_path):
    with pytest.raises(ValueError, match="every='auto' and every_n_train_steps"):
        PeriodicCheckpoint(str(tmp_path), every="auto", every_n_train_steps=5)
    with pytest.raises(ValueError, match="every='sometimes'"):
        PeriodicCheckpoint(str(tmp_path), every="sometimes")
    with pytest.raises(ValueError, match="max_overhead"):
        PeriodicCheckpoint(str(tmp_path), every="auto", max_overhead=2.0)
    with pytest.raises(ValueError, match="mtbf_s"):
        PeriodicCheckpoint(str(tmp_path), every_n_train_steps=5, mtbf_s=100.0)
