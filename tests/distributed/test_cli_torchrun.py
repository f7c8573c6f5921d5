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


def test_ddp_yaml_on_two_nodes_with_node_local_folders(tmp_path):
    """examples/ddp_torchrun.sh two-nodes: each node runs in its own working directory, so the YAML's relative
    dirpath is a folder of its own; each folder ends up with every checkpoint whole."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_two_nodes import free_port

    port = free_port()
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
               os.path.join(ROOT, "examples", "cli.py"), "fit", "--config", os.path.join(ROOT, "configs", "ddp.yaml"),
               "--trainer.devices", "1", "--trainer.num_nodes", "2", "--trainer.max_steps", "40"]
        procs.append(subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-4000:]
    folders = [str(tmp_path / f"node{n}" / "runs" / "ddp") for n in (0, 1)]
    for d in folders:
        ckpts = list_checkpoints(d)
        assert [c.step for c in ckpts] == [20, 40]
        assert all(c.manifest["world_size"] == 2 and set(c.manifest["state_files"]) == {"0", "1"} for c in ckpts)
    a, b = (load_checkpoint(latest_checkpoint(d))["state_dict"] for d in folders)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    merged = load_file(os.path.join(folders[0], "merged", "model.safetensors"))  # rank 0 merges its node's folder
    assert all(torch.equal(merged[k], a[k]) for k in a)
