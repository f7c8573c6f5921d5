"""Multi-rank saves with real process groups: 2 and 3 CPU processes (gloo) started by torchrun."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch
from lightning.pytorch import seed_everything
from safetensors.torch import load_file

from lightning_ckpt import (
    PeriodicCheckpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    merge_checkpoint,
    verify_checkpoint,
)
from lightning_ckpt.demo import DemoModel

from support import TESTS, data, torchrun, trainer
from support.shared import two_ranks

pytestmark = pytest.mark.usefixtures("forkserver")

SCRIPT = os.path.join(TESTS, "distributed", "ddp_script.py")


def rank_bytes(path: str) -> dict[int, int]:
    m = list_checkpoints(os.path.dirname(path))[-1].manifest
    out: dict[int, int] = {}
    for name, f in m["files"].items():
        if name.startswith(("model-", "optim-")):
            out[f["rank"]] = out.get(f["rank"], 0) + f["size"]
    return out


# runs in the session's shared 2-rank launch (support.shared); each fixture's value is the run's folder
ddp2 = two_ranks("ddp2", SCRIPT, lambda d: ["--dir", d / "ckpts", "--max-steps", "8", "--every", "4", "--hidden", "128",
                                            "--out", d / "final.safetensors", "--merge"])
ddp_rank0_mode = two_ranks("ddp_rank0_mode", SCRIPT, lambda d: ["--dir", d, "--max-steps", "4", "--every", "4",
                                                           "--mode", "rank0"])
ddp_if_busy_skip = two_ranks("ddp_if_busy_skip", SCRIPT, lambda d: [
    "--dir", d / "ckpts", "--max-steps", "8", "--every", "1", "--if-busy", "skip", "--slow-rank", "0",
    "--timeout", "30"])


def _one_process_checkpoint(d) -> None:
    seed_everything(3, verbose=False)
    cb = PeriodicCheckpoint(str(d / "ckpts"), every_n_train_steps=4)
    t = trainer([cb], val_every=None, max_steps=4, num_sanity_val_steps=0)
    t.fit(DemoModel(), data(n_train=128))


ddp_one_to_two = two_ranks("ddp_one_to_two", SCRIPT, lambda d: [
    "--dir", d / "ckpts", "--max-steps", "8", "--every", "4", "--resume", "--out", d / "w.safetensors"],
    prepare=_one_process_checkpoint)


def test_sharded_ddp_save_splits_replicated_state_across_ranks(ddp2):
    ckpts = list_checkpoints(str(ddp2 / "ckpts"))
    assert [c.step for c in ckpts] == [4, 8]
    latest = ckpts[-1]
    verify_checkpoint(latest.path)
    m = latest.manifest
    assert m["world_size"] == 2 and m["mode"] == "sharded"
    assert set(m["state_files"]) == {"0", "1"}  # each rank's own RNG and loader state
    per_rank = rank_bytes(latest.path)
    total = sum(per_rank.values())
    assert set(per_rank) == {0, 1}
    for r, b in per_rank.items():  # replicated state written once in total, about half by each rank
        assert 0.3 * total <= b <= 0.7 * total, per_rank
    # every model/optimizer tensor is stored exactly once
    for key, t in m["tensors"].items():
        if key.startswith(("state_dict/", "optimizer_states/")):
            assert len(t["chunks"]) == 1


def test_checkpoint_of_two_ranks_loads_in_one_process(ddp2):
    final = load_file(str(ddp2 / "final.safetensors"))
    ck = load_checkpoint(latest_checkpoint(str(ddp2 / "ckpts")))
    assert ck["global_step"] == 8
    for k, v in final.items():
        assert torch.equal(v, ck["state_dict"][k])
    # each rank's own non-tensor state and tensors (RNG, loader position) are kept apart, not deduplicated
    m = list_checkpoints(str(ddp2 / "ckpts"))[-1].manifest
    assert any(k.startswith("rank00000/") for k in m["tensors"]) and any(k.startswith("rank00001/") for k in m["tensors"])
    ck1 = load_checkpoint(latest_checkpoint(str(ddp2 / "ckpts")), rank=1)
    assert ck1["global_step"] == 8 and "rng" in ck1["lightning_ckpt"]


def test_resume_two_ranks_in_one_process(ddp2, tmp_path):
    """Resharding 2 -> 1: a plain single-process Trainer resumes the 2-rank checkpoint (model and optimizer)."""
    src = latest_checkpoint(str(ddp2 / "ckpts"))
    model = DemoModel(hidden=128)
    cb = PeriodicCheckpoint(str(tmp_path / "one"), every_n_train_steps=100)
    t = trainer([cb], val_every=None, max_steps=10, num_sanity_val_steps=0)
    t.fit(model, data(n_train=128), ckpt_path=src)
    assert t.global_step == 10
    opt_state = t.optimizers[0].state_dict()["state"]
    assert opt_state and all(int(s["step"]) == 10 for s in opt_state.values())


def test_merge_on_train_end_equals_the_trained_model(ddp2):
    merged = load_file(str(ddp2 / "ckpts" / "merged" / "model.safetensors"))
    final = load_file(str(ddp2 / "final.safetensors"))
    assert merged.keys() == final.keys()
    for k in final:
        assert torch.equal(merged[k], final[k])
    model = DemoModel(hidden=128)
    model.load_state_dict(merged)  # clean names, strict


def test_resume_one_process_checkpoint_with_two_ranks(ddp_one_to_two):
    """Resharding 1 -> 2: a single-process Trainer saved step 4 (``_one_process_checkpoint``), two ranks resume."""
    d = str(ddp_one_to_two / "ckpts")
    info = json.load(open(str(ddp_one_to_two / "w.safetensors.json")))
    assert info["world_size"] == 2 and info["global_step"] == 8 and info["resumed_from"].endswith("step=000004")
    m = list_checkpoints(d)[-1].manifest
    assert m["world_size"] == 2 and m["resumed_from"].endswith("step=000004")


def test_three_ranks_sync_and_rank0_mode(tmp_path, ddp_rank0_mode):
    d3 = str(tmp_path / "three")
    torchrun(3, SCRIPT, "--dir", d3, "--max-steps", "4", "--every", "4", "--sync")
    per_rank = rank_bytes(latest_checkpoint(d3))
    assert set(per_rank) == {0, 1, 2}
    d0 = str(ddp_rank0_mode)  # 2 ranks, --mode rank0
    m = list_checkpoints(d0)[-1].manifest
    assert {f["rank"] for f in m["files"].values()} == {0} and m["mode"] == "rank0"
    verify_checkpoint(latest_checkpoint(d0))
    ck = load_checkpoint(latest_checkpoint(d0), rank=1)  # a rank without its own state file reads rank 0's
    assert ck["global_step"] == 4


def test_rank_killed_during_a_save_leaves_no_commit_and_no_hang(tmp_path):
    d = str(tmp_path / "ckpts")
    t0 = time.monotonic()
    p = torchrun(2, SCRIPT, "--dir", d, "--max-steps", "12", "--every", "4", "--die-rank", "1", "--die-step", "8",
                 "--timeout", "20", ok=False)
    assert p.returncode != 0
    assert time.monotonic() - t0 < 120
    steps = [c.step for c in list_checkpoints(d)]
    assert steps == [4], steps  # the save at step 8 was never committed, nothing after it either
    verify_checkpoint(latest_checkpoint(d))
    merge_checkpoint(latest_checkpoint(d), str(tmp_path / "m" / "model.safetensors"))


def test_stuck_rank_fails_the_save_on_the_others_within_the_timeout(tmp_path):
    """A rank that stalls (alive) in a save: the others get a clear error after save_timeout_s, not a hang."""
    d = str(tmp_path / "ckpts")
    t0 = time.monotonic()
    p = torchrun(2, SCRIPT, "--dir", d, "--max-steps", "12", "--every", "4", "--hang-rank", "1", "--hang-step", "8",
                 "--timeout", "3", "--sync", ok=False, timeout=200)
    elapsed = time.monotonic() - t0
    assert p.returncode != 0
    assert elapsed < 120, elapsed
    assert "CheckpointWriteError" in p.stderr and "save_timeout_s" in p.stderr, p.stderr[-3000:]
    assert [c.step for c in list_checkpoints(d)] == [4]


def test_if_busy_skip_skips_the_same_saves_on_every_rank(ddp_if_busy_skip):
    """if_busy="skip" with rank 0's commits two seconds slower than rank 1's part: rank 1 is done while rank 0 is still
    busy. The ranks must agree to skip (a save is a collective); otherwise one rank saves alone and the run hangs or
    fails. Saving every step: some saves are skipped, the run finishes, and every checkpoint verifies."""
    d = str(ddp_if_busy_skip / "ckpts")
    steps = [c.step for c in list_checkpoints(d)]
    assert 1 <= len(steps) < 8 and steps[-1] == 8, steps  # skipped some; the final save is never skipped
    for c in list_checkpoints(d):
        verify_checkpoint(c.path)
        assert c.manifest["world_size"] == 2
