"""FSDP2-sharded state (DTensor) through the writer: each rank writes only its shards; resharding 2 -> 2 and 2 -> 1;
the merger consolidates the shards. (Lightning's FSDP strategies need a GPU; this runs fully_shard on CPU/gloo.)"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from lightning_ckpt import list_checkpoints, load_checkpoint, merge_checkpoint, verify_checkpoint

from support import TESTS
from support.shared import output, two_ranks

SCRIPT = os.path.join(TESTS, "distributed", "fsdp_script.py")
SHARDED_TENSOR_SCRIPT = os.path.join(TESTS, "distributed", "sharded_tensor_script.py")

# runs in the session's shared 2-rank launch (support.shared); each fixture's value is the run's folder
fsdp2_async = two_ranks("fsdp2_async", SCRIPT, lambda d: [d, "async"])
fsdp2_sync = two_ranks("fsdp2_sync", SCRIPT, lambda d: [d, "sync"])
fsdp1_sharded_tensors = two_ranks("fsdp1_sharded_tensors", SHARDED_TENSOR_SCRIPT, lambda d: [d])


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_fsdp2_shards_written_by_their_owners_and_resharded(fsdp2_async, fsdp2_sync, mode):
    tmp_path = {"async": fsdp2_async, "sync": fsdp2_sync}[mode]  # the script's output folder
    out = output(tmp_path, rank=0)
    assert "FSDP-OK" in out, out[-4000:]
    ckpt = list_checkpoints(str(tmp_path / "ckpts"))[-1]
    verify_checkpoint(ckpt.path)
    m = ckpt.manifest
    for key, t in m["tensors"].items():
        if key.startswith("state_dict/") and t["shape"][0] > 1:
            files = {c["file"] for c in t["chunks"]}
            assert files == {"model-rank00000.safetensors", "model-rank00001.safetensors"}, (key, files)
    full = load_file(str(tmp_path / "full.safetensors"))
    ck = load_checkpoint(ckpt.path)  # 2 -> 1: chunks reassembled
    for k, v in full.items():
        assert torch.equal(ck["state_dict"][k], v), k
    merge_checkpoint(ckpt.path, str(tmp_path / "merged.safetensors"))
    merged = load_file(str(tmp_path / "merged.safetensors"))
    assert merged.keys() == full.keys() and all(torch.equal(merged[k], full[k]) for k in full)


def test_fsdp1_sharded_tensors_written_by_their_owners(fsdp1_sharded_tensors):
    """FSDP1's sharded state dict (ShardedTensor, as FSDPStrategy(state_dict_type="sharded") produces on GPUs): each
    rank writes only its rows, sync and async (the async snapshot copies local shards only), and reloads them; one
    process reads the whole tensors back."""
    tmp_path = fsdp1_sharded_tensors  # the script's output folder
    out = output(tmp_path, rank=0)
    assert "SHARDED-TENSOR-OK" in out, out[-4000:]
    for mode in ("sync", "async"):
        path = str(tmp_path / mode / "step=000003")
        verify_checkpoint(path)
        m = list_checkpoints(str(tmp_path / mode))[-1].manifest
        chunks = m["tensors"]["state_dict/layer.weight"]["chunks"]
        assert sorted((c["file"], c["offsets"][0]) for c in chunks) == [
            ("model-rank00000.safetensors", 0), ("model-rank00001.safetensors", 4)]
        ck = load_checkpoint(path)
        want = torch.cat([torch.arange(12, dtype=torch.float32).reshape(4, 3) + 100 * r for r in (0, 1)])
        assert torch.equal(ck["state_dict"]["layer.weight"], want)
        assert ck["optimizer_states"][0]["state"]["layer.weight"]["exp_avg"].shape == (8, 5)
        merge_checkpoint(path, str(tmp_path / f"{mode}.safetensors"))
        assert torch.equal(load_file(str(tmp_path / f"{mode}.safetensors"))["layer.weight"], want)
