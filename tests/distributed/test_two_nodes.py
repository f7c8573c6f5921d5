"""Two "nodes" on one machine (`torchrun --nnodes 2`), each with its own node-local checkpoint folder.

Each node's folder must hold whole checkpoints on its own: a node (or its disk) can be lost, and either folder
resumes the run. A crash between the two folders' commits must not make the nodes resume from different steps.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lightning_ckpt import list_checkpoints, load_checkpoint, verify_checkpoint

from support.launch import ddp_two_nodes as two_nodes
from support.launch import node_folder as folder
from support.launch import ok

pytestmark = pytest.mark.usefixtures("forkserver")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("nodes")
    ok(two_nodes(base, 2, "--max-steps", "8", "--every", "4", "--hidden", "128", "--merge",
                 "--out", str(base / "final{node}.safetensors")))
    return base


def test_each_node_folder_holds_whole_checkpoints(run):
    for node in (0, 1):
        ckpts = list_checkpoints(folder(run, node))
        assert [c.step for c in ckpts] == [4, 8]
        for c in ckpts:
            verify_checkpoint(c.path)  # on its own: no file of the other node is needed
            m = c.manifest
            assert m["world_size"] == 4
            assert set(m["state_files"]) == {"0", "1", "2", "3"}  # every rank's RNG and loader position
            mine = {2 * node, 2 * node + 1}
            per_rank: dict[int, int] = {}
            for name, f in m["files"].items():
                if name.startswith(("model-", "optim-")):
                    per_rank[f["rank"]] = per_rank.get(f["rank"], 0) + f["size"]
            assert set(per_rank) == mine, per_rank  # this node's ranks wrote this folder
            total = sum(per_rank.values())
            for b in per_rank.values():  # the replicated state is split across the node's ranks
                assert 0.3 * total <= b <= 0.7 * total, per_rank
    a = load_checkpoint(list_checkpoints(folder(run, 0))[-1].path, rank=3)
    b = load_checkpoint(list_checkpoints(folder(run, 1))[-1].path, rank=3)
    assert a["global_step"] == b["global_step"] == 8
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k])
    for k, v in a["optimizer_states"][0]["state"].items():
        assert torch.equal(v["exp_avg"], b["optimizer_states"][0]["state"][k]["exp_avg"])
    assert a["lightning_ckpt"]["rng"]["torch"].equal(b["lightning_ckpt"]["rng"]["torch"])  # rank 3's own, in both
    for node in (0, 1):  # the own tensors (RNG) of each rank of both nodes are in each folder
        keys = list_checkpoints(folder(run, node))[-1].manifest["tensors"]
        assert all(any(k.startswith(f"rank{r:05d}/") for k in keys) for r in range(4))
        assert "rng" in load_checkpoint(list_checkpoints(folder(run, node))[-1].path, rank=2 - 2 * node)["lightning_ckpt"]


def test_merge_on_rank0_equals_the_trained_model(run):
    merged = load_file(os.path.join(folder(run, 0), "merged", "model.safetensors"))
    final = load_file(str(run / "final0.safetensors"))
    assert merged.keys() == final.keys()
    for k in final:
        assert torch.equal(merged[k], final[k])


def test_crash_between_the_folders_commits_resumes_both_nodes_from_the_same_step(run, tmp_path):
    base = tmp_path / "crash"
    for node in (0, 1):
        shutil.copytree(folder(run, node), str(base / f"node{node}" / "ckpts"))
    # node 1 died after node 0 committed step 8 but before it committed its own copy
    shutil.rmtree(os.path.join(folder(base, 1), "step=000008"))
    ok(two_nodes(base, 1, "--max-steps", "12", "--every", "4", "--hidden", "128", "--auto-resume",
                 "--out", str(base / "w{node}.safetensors")))
    info = json.load(open(str(base / "w0.safetensors.json")))
    assert info["world_size"] == 2 and info["global_step"] == 12
    assert info["resumed_from"].endswith("step=000004")  # the newest checkpoint both folders hold
    names = [[c.name for c in list_checkpoints(folder(base, n))] for n in (0, 1)]
    # step 8 again: node 0 still holds the old step 8, so both folders name the new one alike
    assert names[0] == ["step=000004", "step=000008", "step=000008-v2", "step=000012"]
    assert names[1] == ["step=000004", "step=000008-v2", "step=000012"]
    for n in (0, 1):
        m = list_checkpoints(folder(base, n))[-1].manifest
        assert m["world_size"] == 2 and set(m["state_files"]) == {"0", "1"}


def test_rank_of_one_node_dying_in_a_save_commits_no_folder(tmp_path):
    res = two_nodes(tmp_path, 1, "--max-steps", "8", "--every", "4", "--die-rank", "1", "--die-step", "8",
                    "--timeout", "20", "--sync")
    assert all(r.returncode != 0 for r in res)
    for node in (0, 1):
        assert [c.step for c in list_checkpoints(folder(tmp_path, node))] == [4]
    # node 0 wrote its whole part of step 8 and removed it when it learned node 1 had failed (node 1's partial folder
    # is its dead rank's and is removed when the run is relaunched)
    assert not [e for e in os.listdir(folder(tmp_path, 0)) if e.startswith(".partial")]


def test_a_node_with_an_empty_folder_stops_auto_resume_instead_of_starting_over(run, tmp_path):
    """Node 1 was replaced by a machine with an empty disk: resume='auto' must not silently start a fresh run while
    node 0 holds the checkpoints; it says how to go on."""
    base = tmp_path / "replaced"
    shutil.copytree(folder(run, 0), str(base / "node0" / "ckpts"))
    res = two_nodes(base, 1, "--max-steps", "12", "--every", "4", "--auto-resume")
    assert all(r.returncode != 0 for r in res)
    err = res[0].stderr + res[1].stderr
    assert "hold no checkpoint in common" in err and "copy a checkpoint folder" in err, err[-3000:]
    assert [c.step for c in list_checkpoints(folder(base, 0))] == [4, 8]  # nothing deleted or added
