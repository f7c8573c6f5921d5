"""Two DDP ranks (gloo, torchrun) saving straight into an s3:// dirpath and into a backup location, then relaunched
with resume="auto": the run continues from S3, and each rank downloads only the files it reads. A real S3 server
(SeaweedFS on loopback) started by the test."""
from __future__ import annotations

import json
import os
import sys

import pytest
from safetensors.torch import load_file

from lightning_ckpt import list_checkpoints, load_checkpoint

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from seaweed import s3_server  # noqa: E402
from test_ddp import torchrun  # noqa: E402


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_server(str(tmp_path_factory.mktemp("weed-ddp")), "ddp") as server:
        yield server


def _cached(root):
    return {f for _, _, files in os.walk(root) for f in files if not f.startswith(".")}


def test_two_ranks_save_to_s3_and_resume_from_it_fetching_only_their_files(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_CKPT_STAGING", str(tmp_path / "staging"))
    uri = "s3://ddp/run"
    torchrun(2, "--dir", uri, "--max-steps", "8", "--every", "4", "--auto-resume", "--rank-cache", str(tmp_path / "c1"))
    assert [c.step for c in list_checkpoints(uri)] == [4, 8]
    m = list_checkpoints(uri)[-1].manifest
    assert m["world_size"] == 2 and set(m["state_files"]) == {"0", "1"}

    out = str(tmp_path / "w.safetensors")
    torchrun(2, "--dir", uri, "--max-steps", "12", "--every", "4", "--auto-resume", "--rank-cache", str(tmp_path / "c2"),
             "--out", out)
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
    torchrun(2, "--dir", d, "--max-steps", "8", "--every", "4", "--backup", "s3://ddp/backup")
    assert [c.step for c in list_checkpoints("s3://ddp/backup")] == [4, 8]
    fresh = str(tmp_path / "fresh")  # another machine: nothing local
    out = str(tmp_path / "w.safetensors")
    torchrun(2, "--dir", fresh, "--max-steps", "12", "--every", "4", "--backup", "s3://ddp/backup", "--auto-resume",
             "--out", out)
    info = json.load(open(out + ".json"))
    assert info["resumed_from"] == os.path.join(fresh, "step=000008") and info["global_step"] == 12
    assert [c.step for c in list_checkpoints("s3://ddp/backup")] == [4, 8, 12]
