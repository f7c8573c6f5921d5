"""Resume cells whose run dies by SIGKILL right after a commit and is relaunched (a new process), compared bit for bit
with the run that went straight through. All runs are forked from one server (fork_server.py): one import of torch,
Lightning and transformers for all of them, and the same threads for every run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from model_cells import KILL_CELLS
from resume_cells import Cell, Run, check_cell

pytestmark = pytest.mark.filterwarnings("ignore:.*set_vital.*:UserWarning")  # torchdata on torch 2.13

SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fork_server.py")


@pytest.fixture(scope="module")
def server():
    p = subprocess.Popen([sys.executable, SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         start_new_session=True)
    assert json.loads(p.stdout.readline()).get("ready"), "the fork server did not start"

    def call(**cmd) -> dict:
        p.stdin.write(json.dumps(cmd) + "\n")
        p.stdin.flush()
        return json.loads(p.stdout.readline())

    yield call
    try:
        p.stdin.write(json.dumps({"op": "quit"}) + "\n")
        p.stdin.flush()
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


def _load(path: str) -> Run:
    return Run(**torch.load(path, weights_only=False))


@pytest.mark.parametrize("cell", KILL_CELLS, ids=[c.name for c in KILL_CELLS])
def test_killed_and_relaunched(cell: Cell, server, tmp_path):
    spec = f"model_cells:{cell.name}"
    d = str(tmp_path / "ckpts")
    assert server(cell=spec, phase="ref", dir=str(tmp_path / "ref"), out=str(tmp_path / "ref.pt")) == {"exit": 0}
    kill_at = cell.stop[1]
    cut = server(cell=spec, phase="cut", dir=d, out=str(tmp_path / "cut.pt"), kill_at=kill_at)
    assert cut == {"signal": signal.SIGKILL}, cut
    assert server(cell=spec, phase="resume", dir=d, out=str(tmp_path / "res.pt")) == {"exit": 0}
    ref, res = _load(str(tmp_path / "ref.pt")), _load(str(tmp_path / "res.pt"))
    cut_run = Run(dump={}, seen=[], global_step=0)  # the killed run left only its checkpoints
    check_cell(cell, ref, cut_run, res, res.ckpt)
