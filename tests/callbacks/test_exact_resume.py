"""Exact resume: N steps straight equal N/2 steps + a kill -9 + resume + N/2 steps, bit for bit, on CPU.

The model has dropout (global torch RNG), the loader shuffles and the checkpoints fall in the middle of an epoch,
with validation in between, so weights, optimizer, LR scheduler, loop counters, RNG and loader position must all be
restored for the weights to match.
"""
from __future__ import annotations

import os
import signal
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from lightning_ckpt import latest_checkpoint, list_checkpoints, verify_checkpoint

from support import TESTS, run_python

pytestmark = [pytest.mark.usefixtures("forkserver"), pytest.mark.slow]

SCRIPT = os.path.join(TESTS, "train_script.py")
N = 30  # 13 batches per epoch: the runs cross two epoch boundaries


def _run(*args: str, expect_kill: bool = False) -> subprocess.CompletedProcess:
    p = run_python([SCRIPT, *args], capture_output=True, text=True, timeout=300)
    if expect_kill:
        assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    else:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[str, torch.Tensor]:
    d = tmp_path_factory.mktemp("straight")
    _run("--dir", str(d / "ckpts"), "--max-steps", str(N), "--every", "7", "--out", str(d / "w.safetensors"))
    return load_file(str(d / "w.safetensors"))


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max().item()}"


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
def test_killed_after_save_resumes_bitwise(tmp_path, straight, sync):
    ckpts = str(tmp_path / "ckpts")
    extra = ["--sync"] if sync else []
    _run("--dir", ckpts, "--max-steps", str(N), "--every", "7", "--kill-at", "14", *extra, expect_kill=True)
    latest = latest_checkpoint(ckpts)
    assert latest is not None and latest.endswith("step=000014")
    verify_checkpoint(latest)
    p = _run("--dir", ckpts, "--max-steps", str(N), "--every", "7", "--resume", "--out", str(tmp_path / "w.safetensors"), *extra)
    assert "step=000014" in p.stdout
    _assert_bitwise_equal(straight, load_file(str(tmp_path / "w.safetensors")))
    steps = [c.step for c in list_checkpoints(ckpts)]
    assert steps == [7, 14, 21, 28, 30]


def test_killed_during_async_write_leaves_previous_or_complete(tmp_path, straight):
    """kill -9 right after an async save started: the newest checkpoint is either the previous one or complete;
    the interrupted one is never listed, its partial folder is removed on the next start, and resume is exact."""
    ckpts = str(tmp_path / "ckpts")
    _run("--dir", ckpts, "--max-steps", str(N), "--every", "7", "--kill-at", "21", "--kill-inflight", expect_kill=True)
    latest = latest_checkpoint(ckpts)
    assert latest is not None and (latest.endswith("step=000014") or latest.endswith("step=000021"))
    for c in list_checkpoints(ckpts):
        verify_checkpoint(c.path)
    _run("--dir", ckpts, "--max-steps", str(N), "--every", "7", "--resume", "--out", str(tmp_path / "w.safetensors"))
    assert not [e for e in os.listdir(ckpts) if e.startswith(".partial-")]
    _assert_bitwise_equal(straight, load_file(str(tmp_path / "w.safetensors")))
