"""PreemptionCheckpoint and Lightning's SLURM auto-requeue: on the requeue signal (SIGUSR1) a `preempt` checkpoint is
committed at the next step boundary, then rank 0 runs `scontrol requeue <job id>`, training stops cleanly, no
pickled hpc_ckpt is written, and the relaunched ("requeued") job resumes exactly.

Real processes and a real Trainer under SLURM variables; `scontrol` is a fake on PATH that logs its arguments and
which committed checkpoints existed when it was called.
"""
from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lightning_ckpt import PreemptionCheckpoint, list_checkpoints, verify_checkpoint
from lightning_ckpt.callbacks.preemption import requeue_slurm_job, slurm_job_id

from support import TESTS, free_port, start_python

pytestmark = pytest.mark.usefixtures("forkserver")

SCRIPT = os.path.join(TESTS, "slurm_script.py")

# logs one JSON line per call: its arguments and the committed checkpoints (step, tags) found in $CKPT_DIR, read
# from their manifest.json files (a folder is committed once renamed from .partial-*, with its manifest inside)
FAKE_SCONTROL = """#!{python}
import json, os, sys
d = os.environ["FAKE_SCONTROL_CKPT_DIR"]
committed = []
for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
    m = os.path.join(d, name, "manifest.json")
    if not name.startswith(".") and os.path.isfile(m):
        with open(m) as f:
            man = json.load(f)
        committed.append([man["step"], sorted(man["tags"])])
with open(os.environ["FAKE_SCONTROL_LOG"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "committed": committed}}) + "\\n")
"""


@pytest.fixture
def fake_scontrol(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "scontrol"
    exe.write_text(FAKE_SCONTROL.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(bindir)


def _slurm_env(bindir: str, ckpt_dir: str, log: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        PATH=bindir + os.pathsep + env.get("PATH", ""),
        OMP_NUM_THREADS="1",  # two runs share the 2 cores; the same in every run so results are comparable
        SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="1", SLURM_JOB_NAME="train", SLURM_JOB_ID="4242",
        SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NODELIST="localhost",
        FAKE_SCONTROL_CKPT_DIR=ckpt_dir, FAKE_SCONTROL_LOG=log,
    )
    env.update(extra)
    return env


def _start(args: list, env: dict):
    return start_python([SCRIPT, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, out, err


def _calls(log: str) -> list[dict]:
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [json.loads(line) for line in f]


def _hpc_files(root) -> list:
    return sorted(str(p) for p in root.rglob("hpc_ckpt_*"))


@pytest.mark.slow
def test_requeue_signal_commits_preempt_then_requeues_and_the_requeued_job_resumes_exactly(tmp_path, fake_scontrol):
    d, log = str(tmp_path / "ckpts"), str(tmp_path / "scontrol.log")
    cmd = ["--dir", d, "--root", str(tmp_path / "root"), "--max-steps", "30", "--every", "7", "--signal-at", "10",
           "--out", str(tmp_path / "b.st")]
    env = _slurm_env(fake_scontrol, d, log)
    # the uninterrupted reference run (same job environment, no signal) runs next to the preempted one
    ref = _start(["--dir", str(tmp_path / "a"), "--root", str(tmp_path / "root_a"), "--max-steps", "30", "--every", "7",
                  "--out", str(tmp_path / "a.st")], _slurm_env(fake_scontrol, str(tmp_path / "a"), str(tmp_path / "ref.log")))
    rc, out, err = _finish(_start(cmd, env))
    assert rc == 0, err[-3000:]  # a clean stop, not a crash
    assert "preempted_step=10 requeued=True" in out, out + err[-3000:]
    assert "SLURM job is requeued once it is committed" in err and "requeuing SLURM job 4242" in err, err[-3000:]
    # scontrol ran once, with Lightning's arguments, after the preempt checkpoint of step 10 was committed
    assert _calls(log) == [{"argv": ["requeue", "4242"], "committed": [[7, ["periodic"]], [10, ["preempt"]]]}]
    assert _hpc_files(tmp_path) == []  # Lightning's in-handler pickled save did not run
    ckpts = list_checkpoints(d)
    assert [(c.step, c.tags) for c in ckpts] == [(7, ["periodic"]), (10, ["preempt"])]
    verify_checkpoint(ckpts[-1].path)

    # the requeued job: the very same command and environment; it resumes from the preempt checkpoint
    rc, out, err = _finish(_start(cmd, env))
    assert rc == 0, err[-3000:]
    assert f"resumed_from={ckpts[-1].path} global_step=30 preempted_step=None requeued=None" in out, out + err[-3000:]
    assert len(_calls(log)) == 1 and _hpc_files(tmp_path) == []
    rc, out, err = _finish(ref)
    assert rc == 0 and "resumed_from=None global_step=30" in out, err[-3000:]
    assert _calls(str(tmp_path / "ref.log")) == []
    a, b = load_file(str(tmp_path / "a.st")), load_file(str(tmp_path / "b.st"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_array_job_requeue_id_and_slurm_requeue_false_keeps_lightnings_handler(tmp_path, fake_scontrol):
    # ours, in an array job: `scontrol requeue <array job id>_<task id>`
    d1, log1 = str(tmp_path / "c1"), str(tmp_path / "s1.log")
    ours = _start(["--dir", d1, "--root", str(tmp_path / "r1"), "--max-steps", "6", "--every", "100", "--signal-at", "3"],
                  _slurm_env(fake_scontrol, d1, log1, SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID="3"))
    # slurm_requeue=False: Lightning's own handler saves hpc_ckpt_1.ckpt inside the signal handler and requeues at
    # once; it does not stop training, and PreemptionCheckpoint (signals: SIGTERM only) does nothing
    d2, log2 = str(tmp_path / "c2"), str(tmp_path / "s2.log")
    theirs = _start(["--dir", d2, "--root", str(tmp_path / "r2"), "--max-steps", "6", "--every", "100", "--signal-at",
                     "3", "--lightning-requeue"], _slurm_env(fake_scontrol, d2, log2))
    rc, out, err = _finish(ours)
    assert rc == 0 and "global_step=3 preempted_step=3 requeued=True" in out, out + err[-3000:]
    assert _calls(log1) == [{"argv": ["requeue", "77_3"], "committed": [[3, ["preempt"]]]}]
    assert [(c.step, c.tags) for c in list_checkpoints(d1)] == [(3, ["preempt"])]
    assert _hpc_files(tmp_path / "r1") == []

    rc, out, err = _finish(theirs)
    assert rc == 0 and "global_step=6 preempted_step=None requeued=None" in out, out + err[-3000:]
    assert _calls(log2) == [{"argv": ["requeue", "4242"], "committed": []}]
    assert _hpc_files(tmp_path) == [str(tmp_path / "r2" / "hpc_ckpt_1.ckpt")]
    assert [(c.step, c.tags) for c in list_checkpoints(d2)] == [(6, ["final"])]


@pytest.mark.distributed
def test_two_ranks_the_signal_on_rank_1_only_both_save_the_step_and_rank_0_requeues_after_the_commit(tmp_path, fake_scontrol):
    """Two SLURM tasks (DDP on CPU, one process each, as srun starts them); only rank 1 gets SIGUSR1. Both ranks
    agree on the step, write their shares of one `preempt` checkpoint and stop cleanly; rank 0, which never got the
    signal, requeues once, after the commit."""
    d, log = str(tmp_path / "ckpts"), str(tmp_path / "scontrol.log")
    port = str(free_port())
    procs = [
        _start(["--dir", d, "--root", str(tmp_path / "root"), "--max-steps", "8", "--every", "100", "--signal-at", "3",
                "--signal-rank", "1", "--devices", "2"],
               _slurm_env(fake_scontrol, d, log, SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_PROCID=str(r),
                          SLURM_LOCALID=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
        for r in (0, 1)
    ]
    results = [_finish(p) for p in procs]
    for r, (rc, out, err) in enumerate(results):
        assert rc == 0, f"rank {r}: " + out + err[-3000:]
        assert f"rank={r} resumed_from=None global_step=3 preempted_step=3" in out, out + err[-3000:]
    assert "requeued=True" in results[0][1] and "requeued=None" in results[1][1]
    assert _calls(log) == [{"argv": ["requeue", "4242"], "committed": [[3, ["preempt"]]]}]
    (c,) = list_checkpoints(d)
    assert c.manifest["world_size"] == 2 and set(c.manifest["state_files"]) == {"0", "1"}
    verify_checkpoint(c.path)
    assert _hpc_files(tmp_path) == []


def test_requeue_helper_job_ids_and_missing_scontrol(tmp_path, monkeypatch, caplog):
    for k in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    assert slurm_job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert slurm_job_id() == "4242"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job_id() == "77_3"
    # no scontrol on PATH: the direct call raises FileNotFoundError, the shell fallback fails; logged, not raised
    monkeypatch.setenv("PATH", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="lightning_ckpt"):
        assert requeue_slurm_job() is False
    assert "requeuing SLURM job 77_3 failed with error code 127" in caplog.text
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3; rm -rf x")  # never reaches a shell
    assert requeue_slurm_job() is False
    with pytest.raises(ValueError, match="slurm_requeue"):
        PreemptionCheckpoint("x", slurm_requeue="yes")  # type: ignore[arg-type]
