"""Two DDP ranks (gloo, torchrun) saving straight into an s3:// dirpath and into a backup location, then relaunched
with resume="auto": the run continues from S3, and each rank downloads only the files it reads. A real S3 server
(SeaweedFS on loopback) started by the test."""
from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import load_file

from lightning_ckpt import list_checkpoints, load_checkpoint

from support import torchrun
from support.launch import DDP_SCRIPT as SCRIPT
from support.launch import ddp_two_nodes as two_nodes
from support.launch import node_folder as folder
from support.launch import ok

pytestmark = pytest.mark.usefixtures("forkserver")

BUCKET = "ddp"  # the s3 fixture's bucket for this module


def _cached(root):
    return {f for _, _, files in os.walk(root) for f in files if not f.startswith(".")}


def test_two_ranks_save_to_s3_and_resume_from_it_fetching_only_their_files(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_CKPT_STAGING", str(tmp_path / "staging"))
    uri = "s3://ddp/run"
    torchrun(2, SCRIPT, "--dir", uri, "--max-steps", "8", "--every", "4", "--auto-resume",
             "--rank-cache", str(tmp_path / "c1"))
    assert [c.step for c in list_checkpoints(uri)] == [4, 8]
    m = list_checkpoints(uri)[-1].manifest
    assert m["world_size"] == 2 and set(m["state_files"]) == {"0", "1"}

    out = str(tmp_path / "w.safetensors")
    torchrun(2, SCRIPT, "--dir", uri, "--max-steps", "12", "--every", "4", "--auto-resume",
             "--rank-cache", str(tmp_path / "c2"), "--out", out)
    info = json.load(open(out + ".json"))
    assert info["resumed_from"] == f"{uri}/step=000008" and info["global_step"] == 12
    assert [c.step for c in list_checkpoints(uri)] == [4, 8, 12]
    # rank 1 read the model and optimizer shards of both ranks, but not rank 0's own state and RNG files
    rank1 = _cached(str(tmp_path / "c2" / "rank1"))
    assert "state-rank00001.json" in rank1 and "state-rank00000.json" not in rank1, rank1
    assert {f for f in rank1 if f.startswith(("model-", "optim-"))} == {
        f for f in m["files"] if f.startswith(("model-", "optim-"))}
    final = load_checkpoint(f"{uri}/step=000012")
    trained = load_file(out)
    for k, v in trained.items():
        assert (final["state_dict"][k] == v).all()


def test_two_ranks_back_up_local_saves_and_resume_on_a_fresh_machine(s3, tmp_path):
    d = str(tmp_path / "ckpts")
    torchrun(2, SCRIPT, "--dir", d, "--max-steps", "8", "--every", "4", "--backup", "s3://ddp/backup")
    assert [c.step for c in list_checkpoints("s3://ddp/backup")] == [4, 8]
    fresh = str(tmp_path / "fresh")  # another machine: nothing local
    out = str(tmp_path / "w.safetensors")
    torchrun(2, SCRIPT, "--dir", fresh, "--max-steps", "12", "--every", "4", "--backup", "s3://ddp/backup",
             "--auto-resume", "--out", out)
    info = json.load(open(out + ".json"))
    assert info["resumed_from"] == os.path.join(fresh, "step=000008") and info["global_step"] == 12
    assert [c.step for c in list_checkpoints("s3://ddp/backup")] == [4, 8, 12]


def test_two_nodes_with_node_local_folders_back_up_and_resume_on_fresh_nodes_from_s3(s3, tmp_path):
    """--nnodes 2, each node with its own local folder and backups on: rank 0 uploads its node's folder, which holds
    the whole checkpoint (every rank's own state included). Relaunched on two fresh nodes (empty folders), both nodes
    resume from S3."""
    uri = "s3://ddp/nodes-backup"
    ok(two_nodes(tmp_path / "a", 1, "--max-steps", "8", "--every", "4", "--backup", uri))
    assert [c.step for c in list_checkpoints(uri)] == [4, 8]
    m = list_checkpoints(uri)[-1].manifest
    assert m["world_size"] == 2 and set(m["state_files"]) == {"0", "1"}
    ok(two_nodes(tmp_path / "fresh", 1, "--max-steps", "12", "--every", "4", "--backup", uri, "--auto-resume",
                 "--out", str(tmp_path / "w{node}.safetensors")))
    info = json.load(open(str(tmp_path / "w0.safetensors.json")))  # written by rank 0
    assert info["resumed_from"] == f"{uri}/step=000008" and info["global_step"] == 12
    for node in (0, 1):  # node 1 resumed at step 8 too: the save of step 12 is committed in its folder
        assert [c.step for c in list_checkpoints(folder(tmp_path / "fresh", node))] == [12]
    assert [c.step for c in list_checkpoints(uri)] == [4, 8, 12]


def test_two_nodes_save_to_an_s3_dirpath_with_node_local_staging(s3, tmp_path):
    """An s3:// dirpath on two nodes, each staging on its own disk: only rank 0's node stages (and uploads) each
    checkpoint, with the other node's rank state handed over; nothing is left staged on either node."""
    uri = "s3://ddp/nodes-direct"
    ok(two_nodes(tmp_path, 1, "--max-steps", "8", "--every", "4", "--auto-resume", dirpath=uri,
                 node_env={"LIGHTNING_CKPT_STAGING": str(tmp_path / "staging{node}")}))
    assert [c.step for c in list_checkpoints(uri)] == [4, 8]
    m = list_checkpoints(uri)[-1].manifest
    assert m["world_size"] == 2 and set(m["state_files"]) == {"0", "1"}
    assert {f["rank"] for n, f in m["files"].items() if n.startswith("model-")} == {0}
    assert load_checkpoint(f"{uri}/step=000008", rank=1)["global_step"] == 8
    for node in (0, 1):
        staged = [e for _, dirs, files in os.walk(str(tmp_path / f"staging{node}")) for e in dirs + files
                  if e.startswith("step=")]
        assert not staged, (node, staged)
