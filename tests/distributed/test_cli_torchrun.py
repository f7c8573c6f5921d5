"""configs/ddp.yaml through LightningCLI under torchrun, as examples/ddp_torchrun.sh runs it."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from lightning_ckpt import latest_checkpoint, list_checkpoints, load_checkpoint

from support import ROOT
from support.launch import nodes
from support.shared import two_ranks

pytestmark = pytest.mark.usefixtures("forkserver")

CLI = os.path.join(ROOT, "examples", "cli.py")
DDP_YAML = os.path.join(ROOT, "configs", "ddp.yaml")

# runs in the session's shared 2-rank launch (support.shared), in its own folder (the YAML's dirpath is relative)
cli_ddp_yaml = two_ranks("cli_ddp_yaml", CLI, lambda d: ["fit", "--config", DDP_YAML, "--trainer.devices", "2",
                                                    "--trainer.max_steps", "40"], cwd=True)


def test_ddp_yaml_under_torchrun(cli_ddp_yaml):
    d = str(cli_ddp_yaml / "runs" / "ddp")
    ckpts = list_checkpoints(d)
    assert [c.step for c in ckpts] == [20, 40]
    assert all(c.manifest["world_size"] == 2 for c in ckpts)
    merged = load_file(os.path.join(d, "merged", "model.safetensors"))
    sd = load_checkpoint(latest_checkpoint(d))["state_dict"]
    assert merged.keys() == sd.keys() and all(torch.equal(merged[k], sd[k]) for k in sd)


def test_ddp_yaml_on_two_nodes_with_node_local_folders(tmp_path):
    """examples/ddp_torchrun.sh two-nodes: each node runs in its own working directory, so the YAML's relative
    dirpath is a folder of its own; each folder ends up with every checkpoint whole."""
    for node in (0, 1):
        (tmp_path / f"node{node}").mkdir()
    results = nodes(2, 1, CLI, lambda node: ["fit", "--config", DDP_YAML, "--trainer.devices", "1",
                                             "--trainer.num_nodes", "2", "--trainer.max_steps", "40"],
                    cwd=lambda node: str(tmp_path / f"node{node}"))
    for p in results:
        assert p.returncode == 0, p.stderr[-4000:]
    folders = [str(tmp_path / f"node{n}" / "runs" / "ddp") for n in (0, 1)]
    for d in folders:
        ckpts = list_checkpoints(d)
        assert [c.step for c in ckpts] == [20, 40]
        assert all(c.manifest["world_size"] == 2 and set(c.manifest["state_files"]) == {"0", "1"} for c in ckpts)
    a, b = (load_checkpoint(latest_checkpoint(d))["state_dict"] for d in folders)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    merged = load_file(os.path.join(folders[0], "merged", "model.safetensors"))  # rank 0 merges its node's folder
    assert all(torch.equal(merged[k], a[k]) for k in a)
