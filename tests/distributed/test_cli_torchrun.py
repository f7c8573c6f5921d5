"""configs/ddp.yaml through LightningCLI under torchrun, as examples/ddp_torchrun.sh runs it."""
from __future__ import annotations

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from lightning_ckpt import latest_checkpoint, list_checkpoints, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_ddp_yaml_under_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "examples", "cli.py"), "fit", "--config", os.path.join(ROOT, "configs", "ddp.yaml"),
           "--trainer.devices", "2", "--trainer.max_steps", "40"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-4000:]
    d = str(tmp_path / "runs" / "ddp")
    ckpts = list_checkpoints(d)
    assert [c.step for c in ckpts] == [20, 40]
    assert all(c.manifest["world_size"] == 2 for c in ckpts)
    merged = load_file(os.path.join(d, "merged", "model.safetensors"))
    sd = load_checkpoint(latest_checkpoint(d))["state_dict"]
    assert merged.keys() == sd.keys() and all(torch.equal(merged[k], sd[k]) for k in sd)
