"""Lightning's ModelParallelStrategy (FSDP2) in a real Trainer on CPU/gloo, 2 ranks under torchrun: each rank writes
only its own shards (nothing gathered on the save path); the checkpoint resumes at another world size (2 -> 1 and
1 -> 2, model, optimizer and scheduler) through the strategy's own load path; the merged file equals the trained
model. (FSDPStrategy, FSDP1, needs a GPU in torch itself; see README.)"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from lightning_ckpt import list_checkpoints, merge_checkpoint, verify_checkpoint

from support import TESTS, torchrun
from support.shared import two_ranks

pytestmark = pytest.mark.usefixtures("forkserver")

SCRIPT = os.path.join(TESTS, "distributed", "model_parallel_script.py")


# runs in the session's shared 2-rank launch (support.shared); the fixture's value is the run's folder
model_parallel_two = two_ranks("model_parallel_two", SCRIPT, lambda d: [
    "--dir", d / "ckpts", "--max-steps", "4", "--every", "2", "--out", d / "a.safetensors"])


def test_each_rank_writes_only_its_own_shards(model_parallel_two):
    ckpts = list_checkpoints(str(model_parallel_two / "ckpts"))
    assert [c.step for c in ckpts] == [2, 4]
    verify_checkpoint(ckpts[-1].path)
    m = ckpts[-1].manifest
    assert m["world_size"] == 2
    sharded = [(k, t) for k, t in m["tensors"].items()
               if k.startswith(("state_dict/", "optimizer_states/")) and len(t["shape"]) and t["shape"][0] > 1]
    assert sharded
    for key, t in sharded:  # every parameter and Adam moment: half in each rank's file, at its own offset
        group = "model" if key.startswith("state_dict/") else "optim"
        assert sorted((c["file"], c["offsets"][0]) for c in t["chunks"]) == [
            (f"{group}-rank00000.safetensors", 0), (f"{group}-rank00001.safetensors", t["shape"][0] // 2)], key


def test_merged_file_equals_the_trained_model(model_parallel_two, tmp_path):
    merge_checkpoint(list_checkpoints(str(model_parallel_two / "ckpts"))[-1].path, str(tmp_path / "merged.safetensors"))
    merged = load_file(str(tmp_path / "merged.safetensors"))
    trained = load_file(str(model_parallel_two / "a.safetensors"))
    assert merged.keys() == trained.keys()
    for k in trained:
        assert torch.equal(merged[k], trained[k]), k


def test_resume_two_ranks_on_one_and_one_on_two(model_parallel_two, tmp_path):
    one = tmp_path / "one"
    torchrun(1, SCRIPT, "--dir", str(one), "--max-steps", "6", "--every", "2", "--sync",
             "--resume", str(model_parallel_two / "ckpts" / "step=000004"), "--out", str(tmp_path / "b.safetensors"))
    restored = load_file(str(tmp_path / "b.safetensors.restored"))
    trained = load_file(str(model_parallel_two / "a.safetensors"))
    assert restored.keys() == trained.keys()
    for k in trained:  # 2 -> 1: the shards of both ranks reassembled, exactly
        assert torch.equal(restored[k], trained[k]), k
    info = json.load(open(str(tmp_path / "b.safetensors.json")))
    assert info["world_size"] == 1 and info["global_step"] == 6
    assert info["opt_steps"] == [6]  # AdamW's state came along: 4 restored + 2 new steps
    assert info["lrs"] == [pytest.approx(0.01 * 0.5 ** 2)]  # StepLR(3, 0.5) per step, restored at step 4
    assert [c.step for c in list_checkpoints(str(one))] == [6]

    torchrun(2, SCRIPT, "--dir", str(tmp_path / "again"), "--max-steps", "8", "--every", "2",
             "--resume", str(one / "step=000006"), "--out", str(tmp_path / "c.safetensors"))
    restored, trained = load_file(str(tmp_path / "c.safetensors.restored")), load_file(str(tmp_path / "b.safetensors"))
    for k in trained:  # 1 -> 2: each rank read its half
        assert torch.equal(restored[k], trained[k]), k
    info = json.load(open(str(tmp_path / "c.safetensors.json")))
    assert info["world_size"] == 2 and info["global_step"] == 8 and info["opt_steps"] == [8]


def test_node_local_folders_refuse_sharded_state_with_a_clear_error(tmp_path):
    """A folder per node cannot hold a whole checkpoint of FSDP-sharded state: the save fails on every rank with an
    error that says what to use instead, and nothing is committed."""
    p = torchrun(2, SCRIPT, "--dir", str(tmp_path / "node{rank}"), "--max-steps", "2", "--every", "2",
                 "--out", str(tmp_path / "x"), ok=False)
    assert p.returncode != 0
    assert "local to each node" in p.stderr and "shared filesystem" in p.stderr, p.stderr[-3000:]
    for r in (0, 1):
        assert list_checkpoints(str(tmp_path / f"node{r}")) == []
