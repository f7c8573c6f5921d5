"""PreemptionCheckpoint: a signal mid-step gives a committed `preempt` checkpoint of that step, a clean exit, and an
exact resume."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from lightning_ckpt import PreemptionCheckpoint, latest_checkpoint, list_checkpoints, verify_checkpoint

import support.launch
from support import TESTS, run_python

pytestmark = pytest.mark.usefixtures("forkserver")

SCRIPT = os.path.join(TESTS, "train_script.py")
DDP = os.path.join(TESTS, "distributed", "ddp_script.py")


def _run(*args: str) -> subprocess.CompletedProcess:
    return run_python([SCRIPT, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_signal_saves_the_step_exits_cleanly_and_resumes_exactly(tmp_path, sig):
    straight = _run("--dir", str(tmp_path / "a"), "--max-steps", "30", "--every", "7", "--out", str(tmp_path / "a.st"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    d = str(tmp_path / "ckpts")
    p = _run("--dir", d, "--max-steps", "30", "--every", "7", "--preempt-at", "10", "--signal", sig)
    assert p.returncode == 0, p.stderr[-3000:]  # a clean exit, not a crash
    ckpts = list_checkpoints(d)
    assert [(c.step, c.tags) for c in ckpts] == [(7, ["periodic"]), (10, ["preempt"])]
    verify_checkpoint(ckpts[-1].path)
    r = _run("--dir", d, "--max-steps", "30", "--every", "7", "--resume", "--out", str(tmp_path / "b.st"))
    assert r.returncode == 0 and "step=000010" in r.stdout, r.stderr[-2000:]
    a, b = load_file(str(tmp_path / "a.st")), load_file(str(tmp_path / "b.st"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_signal_name():
    with pytest.raises(ValueError, match="SIGNOPE"):
        PreemptionCheckpoint("x", signals=["SIGNOPE"])
    with pytest.raises(ValueError, match="signals is empty"):
        PreemptionCheckpoint("x", signals=[])


@pytest.mark.distributed
def test_sigterm_under_torchrun_all_ranks_save_the_same_step(tmp_path):
    """SIGTERM to the torchrun agent (as a scheduler sends it): it forwards the signal to every rank; the ranks agree
    on one step, commit a `preempt` checkpoint of it together and exit promptly."""
    d = str(tmp_path / "ckpts")
    p = support.launch.start(2, DDP, "--dir", d, "--max-steps", "100000", "--every", "20", "--preempt",
                               stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        while not (os.path.isdir(d) and any(e.startswith("step=") for e in os.listdir(d))):
            assert time.monotonic() - t0 < 120 and p.poll() is None, "training did not start"
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        t1 = time.monotonic()
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert time.monotonic() - t1 < 60, "the ranks did not stop promptly"
    assert out.count("preemption signal received") == 2, out[-3000:]
    ckpts = list_checkpoints(d)
    (pre,) = [c for c in ckpts if "preempt" in c.tags]
    assert pre.manifest["world_size"] == 2 and set(pre.manifest["state_files"]) == {"0", "1"}
    verify_checkpoint(pre.path)
    # nothing after the preempted step: the run stopped there (validation at that step may add a `best` save of it)
    assert max(c.step for c in ckpts) == pre.step
    assert list_checkpoints(d)[-1].step == pre.step and latest_checkpoint(d) is not None
