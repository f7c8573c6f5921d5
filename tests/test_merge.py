"""The rank-0 / offline merger: one consolidated safetensors file, streaming, verified."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from lightning_ckpt import CheckpointCorruptError, CheckpointWriter, merge_checkpoint
from lightning_ckpt.cli import main
from lightning_ckpt.tools.merge import clean_name, verify_merged


def _ckpt(tmp_path, n_layers=8, width=64):
    torch.manual_seed(0)
    sd = {f"module.layers.{i}.weight": torch.randn(width, width) for i in range(n_layers)}
    sd.update({f"module.layers.{i}.bias": torch.randn(width) for i in range(n_layers)})
    sd["_orig_mod.head.step"] = torch.tensor(3, dtype=torch.int64)
    opt = {"state": {0: {"exp_avg": torch.randn(width, width)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    w = CheckpointWriter(str(tmp_path / "ckpts"), async_save=False)
    res = w.save({"state_dict": sd, "optimizer_states": [opt], "global_step": 7}, step=7)
    w.close()
    return res.result().path, sd


@pytest.mark.parametrize("ahead_from", [None, 1024, 0])
def test_merge_writes_clean_names_and_equal_tensors(tmp_path, monkeypatch, ahead_from):
    """(``ahead_from``: the size from which the reader thread reads the next tensor ahead; by default 1 MiB, so none
    of these; 1024: the weights ahead and the biases inline, interleaved; 0: all of them ahead.)"""
    if ahead_from is not None:
        monkeypatch.setattr("lightning_ckpt.tools.merge._AHEAD_FROM", ahead_from)
    path, sd = _ckpt(tmp_path)
    res = merge_checkpoint(path, str(tmp_path / "out" / "model.safetensors"))
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(merged) == {clean_name(k) for k in sd} and "layers.0.weight" in merged and "head.step" in merged
    for k, v in sd.items():
        assert torch.equal(merged[clean_name(k)], v)
    assert not any(k.startswith("optimizer") or "exp_avg" in k for k in merged)  # weights only
    verify_merged(str(tmp_path / "out" / "model.safetensors"))
    # streaming: at most two tensors are held (one written, the next being read), not the model
    assert res.peak_buffer_bytes <= 2 * 64 * 64 * 4 and res.bytes > 4 * res.peak_buffer_bytes


def test_merge_dtype_and_sharded_output_with_index(tmp_path):
    path, sd = _ckpt(tmp_path)
    out = tmp_path / "out" / "model.safetensors"
    res = merge_checkpoint(path, str(out), dtype="bf16", max_shard_bytes=20_000)
    assert len(res.files) > 1 and res.index_path
    index = json.load(open(res.index_path))
    merged = {}
    for f in res.files:
        merged.update(load_file(f))
    assert set(index["weight_map"]) == set(merged)
    assert merged["layers.1.weight"].dtype == torch.bfloat16 and merged["head.step"].dtype == torch.int64
    assert torch.equal(merged["layers.1.weight"], sd["module.layers.1.weight"].to(torch.bfloat16))
    assert index["metadata"]["total_size"] == res.bytes
    verify_merged(str(out))


def test_merge_refuses_corrupt_input(tmp_path):
    path, _ = _ckpt(tmp_path)
    f = os.path.join(path, "model-rank00000.safetensors")
    data = bytearray(open(f, "rb").read())
    data[-5] ^= 1
    open(f, "wb").write(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="checksum"):
        merge_checkpoint(path, str(tmp_path / "bad.safetensors"))


def test_merge_cli(tmp_path, capsys):
    path, sd = _ckpt(tmp_path)
    out = str(tmp_path / "cli" / "model.safetensors")
    assert main(["merge", path, out, "--dtype", "fp16", "--quiet"]) == 0
    assert "tensors" in capsys.readouterr().out
    assert load_file(out)["layers.0.weight"].dtype == torch.float16
    assert main(["merge", path, out, "--dtype", "int3"]) == 2
    assert "dtype" in capsys.readouterr().err
