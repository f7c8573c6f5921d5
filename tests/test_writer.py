"""CheckpointWriter: sync and async saves, commit protocol, failures, collisions, settings."""
from __future__ import annotations

import json
import os
import random
import textwrap
import threading
import warnings

import numpy as np
import pytest
import torch

from lightning_ckpt import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CheckpointWriter,
    PeriodicCheckpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    verify_checkpoint,
)
from lightning_ckpt.writer import cleanup_partials

from support import ROOT as REPO
from support import run_python


def make_state(seed: int = 0, hidden: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "epoch": seed,
        "global_step": 10 * seed,
        "state_dict": {"net.0.weight": torch.randn(hidden, 3, generator=g), "net.0.bias": torch.randn(hidden, generator=g)},
        "optimizer_states": [
            {"state": {0: {"step": torch.tensor(float(seed)), "exp_avg": torch.randn(hidden, 3, generator=g)}},
             "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "params": [0, 1]}]}
        ],
        "loops": {"fit_loop": {"position": seed, "rng": torch.randint(0, 255, (16,), dtype=torch.uint8, generator=g)}},
        "hyper_parameters": {"hidden": hidden, "lr": float("nan")},
    }


def assert_state_equal(expected, got, path="state"):
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == expected.dtype, path
        assert torch.equal(got, expected), path
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and set(got) == set(expected), f"{path}: {set(got)} != {set(expected)}"
        for k in expected:
            assert_state_equal(expected[k], got[k], f"{path}[{k!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(got) is type(expected) and len(got) == len(expected), path
        for i, (a, b) in enumerate(zip(expected, got)):
            assert_state_equal(a, b, f"{path}[{i}]")
    elif isinstance(expected, float) and expected != expected:
        assert isinstance(got, float) and got != got, path
    else:
        assert got == expected and type(got) is type(expected), f"{path}: {got!r} != {expected!r}"


def read_latest(dirpath) -> dict:
    with open(os.path.join(dirpath, "latest.json")) as f:
        return json.load(f)


def leftovers(dirpath) -> list[str]:
    return sorted(e for e in os.listdir(dirpath) if e.startswith("."))


@pytest.fixture
def writers():
    made = []

    def make(dirpath, **kw):
        w = CheckpointWriter(str(dirpath), **kw)
        made.append(w)
        return w

    yield make
    for w in made:
        try:
            w.close()
        except CheckpointError:
            pass


# ------------------------------------------------------------------ saving and loading
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_save_commits_a_loadable_checkpoint(tmp_path, writers, async_save):
    d = tmp_path / "ckpts"
    w = writers(d, async_save=async_save)
    state = make_state(1)
    pending = w.save(state, step=5, epoch=1, tags=["periodic"], metrics={"loss": torch.tensor(0.25)})
    res = pending.result(timeout=60)
    assert w.wait() is res
    assert res.name == "step=000005" and res.step == 5 and res.bytes > 0
    ck = d / "step=000005"
    assert res.path == str(ck)
    assert sorted(os.listdir(ck)) == sorted([
        "manifest.json", "model-rank00000.safetensors", "optim-rank00000.safetensors",
        "extra-rank00000.safetensors", "state-rank00000.json",
    ])
    latest = read_latest(d)  # the hint, and the folder's index beside it (store/hint.py)
    assert set(latest) == {"name", "step", "epoch", "index"}
    assert {k: latest[k] for k in ("name", "step", "epoch")} == {"name": "step=000005", "step": 5, "epoch": 1}
    assert [e["name"] for e in latest["index"]["runs"]] == ["step=000005"]
    verify_checkpoint(str(ck))
    assert_state_equal(state, load_checkpoint(str(ck)))
    (info,) = list_checkpoints(str(d))
    assert (info.name, info.step, info.epoch, info.tags, info.metrics) == ("step=000005", 5, 1, ["periodic"], {"loss": 0.25})
    assert leftovers(d) == []


def test_model_file_is_a_plain_safetensors_file_with_parameter_names(tmp_path, writers):
    from safetensors.torch import load_file

    w = writers(tmp_path, async_save=False)
    state = make_state(2)
    w.save(state, step=1)
    model = load_file(str(tmp_path / "step=000001" / "model-rank00000.safetensors"))
    assert set(model) == {"net.0.weight", "net.0.bias"}
    assert torch.equal(model["net.0.weight"], state["state_dict"]["net.0.weight"])


def test_full_lightning_like_state_round_trips_through_disk(tmp_path, writers):
    random.seed(3)
    np.random.seed(3)
    state = make_state(3)
    state["rng"] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    state["misc"] = {"size": torch.Size([2, 3]), "dtype": torch.bfloat16, "bf16": torch.ones(3, dtype=torch.bfloat16),
                     "empty": torch.empty(0, 5), "scalar": torch.tensor(True), "arr": np.arange(4, dtype=np.uint16)}
    w = writers(tmp_path, async_save=True)
    w.save(state, step=3)
    w.wait()
    out = load_checkpoint(str(tmp_path / "step=000003"))
    assert out["rng"]["python"] == state["rng"]["python"]
    np.testing.assert_array_equal(out["rng"]["numpy"][1], state["rng"]["numpy"][1])
    assert out["rng"]["numpy"][1].dtype == np.uint32
    assert torch.equal(out["rng"]["torch"], state["rng"]["torch"])
    assert isinstance(out["misc"]["size"], torch.Size) and out["misc"]["size"] == torch.Size([2, 3])
    assert out["misc"]["dtype"] is torch.bfloat16
    for k in ("bf16", "empty", "scalar"):
        assert_state_equal(state["misc"][k], out["misc"][k], k)
    assert out["misc"]["arr"].dtype == np.uint16 and out["misc"]["arr"].tolist() == [0, 1, 2, 3]
    assert_state_equal(state["state_dict"], out["state_dict"])
    assert_state_equal(state["optimizer_states"], out["optimizer_states"])


def test_latest_json_points_at_the_newest_commit(tmp_path, writers):
    w = writers(tmp_path, async_save=True)
    for step in (1, 2, 3):
        w.save(make_state(step), step=step, epoch=0)
        w.wait()
        assert read_latest(tmp_path)["name"] == f"step={step:06d}"
    assert [c.step for c in list_checkpoints(str(tmp_path))] == [1, 2, 3]
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "step=000003")


def test_async_save_snapshots_before_returning(tmp_path, writers):
    """Training may change the tensors right after save() returns; the checkpoint keeps the values at save time."""
    w = writers(tmp_path, async_save=True)
    state = make_state(4)
    expected = {k: v.clone() for k, v in state["state_dict"].items()}
    w.save(state, step=1)
    for v in state["state_dict"].values():
        v.add_(100.0)
    w.save(state, step=2)
    for v in state["state_dict"].values():
        v.zero_()
    w.wait()
    first = load_checkpoint(str(tmp_path / "step=000001"))["state_dict"]
    second = load_checkpoint(str(tmp_path / "step=000002"))["state_dict"]
    for k in expected:
        assert torch.equal(first[k], expected[k]), k
        assert torch.equal(second[k], expected[k] + 100.0), k


def test_async_host_buffers_are_reused_across_saves(tmp_path, writers):
    w = writers(tmp_path, async_save=True)
    n_tensors = 5  # weight, bias, step, exp_avg, rng in make_state
    w.save(make_state(1), step=1)
    w.wait()
    assert w._buffers.allocations == n_tensors
    for step in (2, 3, 4):
        w.save(make_state(step), step=step)
    w.wait()
    assert w._buffers.allocations == n_tensors, "same shapes must reuse the same host buffers"
    w.save(make_state(5, hidden=6), step=5)  # three tensors change shape
    w.wait()
    assert w._buffers.allocations == n_tensors + 3
    assert_state_equal(make_state(5, hidden=6)["state_dict"], load_checkpoint(str(tmp_path / "step=000005"))["state_dict"])


def test_if_busy_skip_drops_a_save_while_one_is_in_flight(tmp_path, writers, monkeypatch):
    # hold the background writer thread at its first fsync until the test lets it go
    gate = threading.Event()
    started = threading.Event()
    real_fsync = os.fsync

    def gated_fsync(fd):
        if threading.current_thread().name.startswith("lightning_ckpt-writer") and not gate.is_set():
            started.set()
            assert gate.wait(30)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", gated_fsync)
    w = writers(tmp_path, async_save=True, if_busy="skip", fsync=True)
    try:
        assert w.save(make_state(1), step=1) is not None
        assert started.wait(30), "the background save did not start"
        assert w.busy
        assert w.save(make_state(2), step=2) is None
    finally:
        gate.set()
    w.wait()
    assert [c.step for c in list_checkpoints(str(tmp_path))] == [1]
    assert read_latest(tmp_path)["name"] == "step=000001"


# ------------------------------------------------------------------ failures in the background
def test_background_failure_is_raised_at_the_next_save(tmp_path, writers):
    w = writers(tmp_path, async_save=True)
    w.save(make_state(1), step=1)
    w.wait()
    bad = make_state(2)
    bad["extra"] = {"z": torch.zeros(3, dtype=torch.complex128)}  # no safetensors dtype for it
    w.save(bad, step=2)  # fails in the background
    with pytest.raises(CheckpointError) as ei:
        w.save(make_state(3), step=3)
    assert "complex128" in str(ei.value)
    w.wait()
    assert not (tmp_path / "step=000003").exists(), "a save must not start after an unreported failure"
    assert not (tmp_path / "step=000002").exists()
    assert read_latest(tmp_path)["name"] == "step=000001"
    assert leftovers(tmp_path) == []
    assert_state_equal(make_state(1), load_checkpoint(str(tmp_path / "step=000001")))


def test_background_failure_is_raised_at_wait_and_writer_recovers(tmp_path, writers):
    w = writers(tmp_path, async_save=True)
    w.save(make_state(1), step=1)
    w.wait()
    bad = make_state(2)
    bad["extra"] = {"z": torch.zeros(3, dtype=torch.complex128)}
    w.save(bad, step=2)
    with pytest.raises(CheckpointError, match="complex128"):
        w.wait()
    assert w.wait() is not None  # reported once, not forever
    assert [c.name for c in list_checkpoints(str(tmp_path))] == ["step=000001"]
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "step=000001")
    assert leftovers(tmp_path) == []
    w.save(make_state(4), step=4)
    w.wait()
    assert read_latest(tmp_path)["name"] == "step=000004"
    assert_state_equal(make_state(1), load_checkpoint(str(tmp_path / "step=000001")))


def test_unwritable_target_after_first_save_is_a_write_error(tmp_path, writers):
    d = tmp_path / "ckpts"
    w = writers(d, async_save=True)
    w.save(make_state(1), step=1)
    w.wait()
    moved = tmp_path / "moved"
    os.rename(d, moved)
    d.write_bytes(b"now a file")  # the target folder can no longer be written
    w.save(make_state(2), step=2)
    with pytest.raises(CheckpointWriteError) as ei:
        w.wait()
    assert str(d) in str(ei.value)
    os.unlink(d)
    os.rename(moved, d)
    assert [c.name for c in list_checkpoints(str(d))] == ["step=000001"]
    verify_checkpoint(str(d / "step=000001"))
    assert_state_equal(make_state(1), load_checkpoint(str(d / "step=000001")))


def test_sync_failure_is_raised_by_save_and_leaves_nothing(tmp_path, writers):
    w = writers(tmp_path, async_save=False)
    w.save(make_state(1), step=1)
    bad = make_state(2)
    bad["extra"] = {"z": torch.zeros(3, dtype=torch.complex128)}
    with pytest.raises(CheckpointError, match="complex128"):
        w.save(bad, step=2)
    assert [c.name for c in list_checkpoints(str(tmp_path))] == ["step=000001"]
    assert read_latest(tmp_path)["name"] == "step=000001"
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------ crashes
def test_interrupted_save_is_never_listed_and_is_cleaned_up(tmp_path, writers):
    w = writers(tmp_path, async_save=False)
    w.save(make_state(1), step=1)
    # a crash after the files (even the manifest) were written but before the rename: copy a full checkpoint
    partial = tmp_path / ".partial-step=000002-deadbeef"
    partial.mkdir()
    for f in (tmp_path / "step=000001").iterdir():
        (partial / f.name).write_bytes(f.read_bytes())
    trash = tmp_path / ".trash-step=000000-cafe0000"
    trash.mkdir()
    assert [c.name for c in list_checkpoints(str(tmp_path))] == ["step=000001"]
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "step=000001")
    removed = cleanup_partials(str(tmp_path))
    assert sorted(removed) == sorted([str(partial), str(trash)])
    assert not partial.exists() and not trash.exists()
    verify_checkpoint(str(tmp_path / "step=000001"))


@pytest.mark.usefixtures("forkserver")
def test_process_killed_at_the_commit_point_leaves_previous_checkpoint_intact(tmp_path):
    d = tmp_path / "ckpts"
    script = textwrap.dedent(
        f"""
        import os, torch
        from lightning_ckpt import CheckpointWriter
        w = CheckpointWriter({str(d)!r}, async_save=False)
        w.save({{"state_dict": {{"w": torch.ones(3)}}, "global_step": 1}}, step=1)
        real_rename = os.rename
        def crash(src, dst):
            os._exit(17)  # the process dies right before the commit rename
        os.rename = crash
        w.save({{"state_dict": {{"w": torch.zeros(3)}}, "global_step": 2}}, step=2)
        """
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = run_python(["-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr
    partials = [e for e in os.listdir(d) if e.startswith(".partial-")]
    assert len(partials) == 1 and os.path.isfile(d / partials[0] / "manifest.json")
    assert [c.name for c in list_checkpoints(str(d))] == ["step=000001"]
    assert latest_checkpoint(str(d)) == str(d / "step=000001")
    assert read_latest(d)["name"] == "step=000001"
    with pytest.raises(CheckpointNotFoundError):
        load_checkpoint(str(d / "step=000002"))
    assert torch.equal(load_checkpoint(str(d / "step=000001"))["state_dict"]["w"], torch.ones(3))
    cleanup_partials(str(d))
    assert not any(e.startswith(".partial-") for e in os.listdir(d))


# ------------------------------------------------------------------ names
def test_name_collisions_get_a_version_suffix(tmp_path, writers):
    w = writers(tmp_path, async_save=True)
    for i in range(3):
        w.save(make_state(i), step=5)
        w.wait()
    names = [c.name for c in list_checkpoints(str(tmp_path))]
    assert names == ["step=000005", "step=000005-v2", "step=000005-v3"]
    assert read_latest(tmp_path)["name"] == "step=000005-v3"
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "step=000005-v3")
    for i, name in enumerate(names):
        assert_state_equal(make_state(i), load_checkpoint(str(tmp_path / name)))
    # a second writer (a restarted run) does not overwrite either
    w2 = writers(tmp_path, async_save=False)
    w2.save(make_state(9), step=5)
    assert read_latest(tmp_path)["name"] == "step=000005-v4"
    assert_state_equal(make_state(0), load_checkpoint(str(tmp_path / "step=000005")))


def test_name_template_with_epoch(tmp_path, writers):
    w = writers(tmp_path, async_save=False, name_template="epoch={epoch:02d}-step={step}")
    res = w.save(make_state(1), step=7, epoch=3).result()
    assert res.name == "epoch=03-step=7"
    assert (tmp_path / "epoch=03-step=7" / "manifest.json").is_file()


@pytest.mark.parametrize(
    "kwargs,setting",
    [
        ({"name_template": "checkpoint"}, "name_template"),
        ({"name_template": "run/{step}"}, "name_template"),
        ({"name_template": "{step}/x"}, "name_template"),
        ({"name_template": ".hidden-{step}"}, "name_template"),
        ({"name_template": "step={step}-{}"}, "name_template"),
        ({"name_template": "step={step}-{0}"}, "name_template"),
        ({"name_template": "step={step"}, "name_template"),
        ({"name_template": ""}, "name_template"),
        ({"if_busy": "x"}, "if_busy"),
        ({"if_busy": None}, "if_busy"),
    ],
)
@pytest.mark.parametrize("cls", ["CheckpointWriter", "PeriodicCheckpoint"])
def test_invalid_settings_raise_value_error_naming_the_setting(tmp_path, kwargs, setting, cls):
    make = CheckpointWriter if cls == "CheckpointWriter" else PeriodicCheckpoint
    with pytest.raises(ValueError) as ei:
        obj = make(str(tmp_path / "ckpts"), **kwargs)
        if hasattr(obj, "close"):
            obj.close()
    msg = str(ei.value)
    assert setting in msg
    assert repr(kwargs[setting]) in msg, f"the message should show the bad value: {msg}"
    assert not (tmp_path / "ckpts").exists()


def test_dirpath_that_is_a_file_is_a_write_error_naming_it(tmp_path, writers):
    f = tmp_path / "afile"
    f.write_text("x")
    w = writers(f, async_save=False)
    with pytest.raises(CheckpointWriteError) as ei:
        w.prepare_dir()
    assert str(f) in str(ei.value)
    with pytest.raises(CheckpointWriteError) as ei:
        w.save(make_state(1), step=1)
    assert str(f) in str(ei.value)
    assert f.read_text() == "x"


def test_unsupported_values_warn_at_save_and_load_as_strings(tmp_path, writers):
    class Opaque:
        def __repr__(self):
            return "Opaque()"

    w = writers(tmp_path, async_save=False)
    state = make_state(1)
    state["callbacks"] = {"MyCallback": {"thing": Opaque()}}
    with pytest.warns(UserWarning, match="callbacks/MyCallback/thing"):
        w.save(state, step=1)
    out = load_checkpoint(str(tmp_path / "step=000001"))
    assert out["callbacks"] == {"MyCallback": {"thing": "Opaque()"}}


def test_close_waits_for_the_in_flight_save(tmp_path):
    w = CheckpointWriter(str(tmp_path), async_save=True)
    w.save(make_state(1), step=1)
    w.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "step=000001")
