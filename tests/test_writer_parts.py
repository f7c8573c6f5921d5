"""The writer's parts on their own (``writer/topology.py``, ``writer/pending.py``): the ``Topology`` two real ranks
get (a shared torchrun launch, ``support.shared.two_ranks``), and a ``PendingSave``'s seal, abandon and add on real
saves into a folder."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from lightning_ckpt import list_checkpoints
from lightning_ckpt.writer import CheckpointWriter, Topology
from lightning_ckpt.writer.pending import Abandoned

from support.shared import two_ranks

TESTS = os.path.dirname(os.path.abspath(__file__))
writer_topology = two_ranks("writer_topology", os.path.join(TESTS, "distributed", "topology_script.py"),
                         lambda d: ["--dir", d])


def state(v: float = 1.0) -> dict:
    return {"state_dict": {"w": torch.full((4,), v), "b": torch.zeros(2)}, "step": 3}


def test_a_lone_topology_leads_its_folder_and_is_frozen():
    t = Topology()
    assert (t.rank, t.world_size, t.folder_ranks, t.leader, t.is_leader, t.folder_written) == (0, 1, (0,), 0, True, True)
    assert t.agree("boom") == "boom" and t.agree(None) is None  # alone: nothing to gather
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.rank = 1  # type: ignore[misc]
    staging = dataclasses.replace(Topology(rank=1, world_size=2, folder_ranks=(0, 1)), every_folder=False)
    assert staging.with_folders((1,), None).folder_written is False  # node-local, only rank 0's folder written
    assert staging.with_folders((1,), None).is_leader  # ... though it leads its own folder


def test_two_ranks_get_one_folder_then_a_folder_each(writer_topology):
    got = [json.loads((writer_topology / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, g in enumerate(got):
        assert g["joined"] == g["shared"] == {
            "rank": r, "world_size": 2, "folder_ranks": [0, 1], "node_local": False, "every_folder": True,
            "leader": 0, "is_leader": r == 0, "folder_written": True, "has_group": True, "has_folder_group": False}
        assert g["agree"] == "rank 1 failed"  # every rank learns the first error
        assert g["broadcast"] == "from rank 0" and g["gather"] == [0, 10] and g["same_writer_id"]
        assert g["own"] == {
            "rank": r, "world_size": 2, "folder_ranks": [r], "node_local": True, "every_folder": True,
            "leader": r, "is_leader": True, "folder_written": True, "has_group": True, "has_folder_group": True}
        assert g["own_dedup"] is False  # a folder per node holds a whole copy: no content store
        assert g["staging"]["node_local"] and g["staging"]["folder_written"] == (r == 0)
        assert not g["closed"]["has_group"] and not g["closed"]["has_folder_group"]  # its own groups destroyed


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_pending_save_takes_tags_until_sealed_then_commits_them(tmp_path, async_save):
    w = CheckpointWriter(str(tmp_path), async_save=async_save, auto_seal=False, fsync=False)
    try:
        p = w.save(state(), step=3, tags=["periodic"], metrics={"loss": 1.0})
        assert not p.sealed and not p.abandoned and p.name == "step=000003" and p.inline is (not async_save)
        assert p.add(["best"], {"acc": 0.5}) and w.merge(3, ["final"], kind="weights")
        assert list_checkpoints(str(tmp_path)) == []  # written, not committed before the seal
        finished_here = p.seal()
        assert finished_here is (not async_save)  # inline: committed in the sealing thread
        assert p.seal() is False  # once
        res = p.result(timeout=60)
        assert res.tags == ["best", "final", "periodic"] and res.metrics == {"loss": 1.0, "acc": 0.5}
        assert p.add(["late"], None) is False  # its commit has begun: nothing merged
        assert [c.name for c in list_checkpoints(str(tmp_path))] == ["step=000003"]
        assert w.wait() is res and w.pending is None
    finally:
        w.close()


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_an_abandoned_save_commits_nothing_and_a_sealed_one_cannot_be_abandoned(tmp_path, async_save):
    w = CheckpointWriter(str(tmp_path), async_save=async_save, auto_seal=False, fsync=False)
    try:
        p = w.save(state(), step=1)
        assert p.abandon() is (not async_save) and p.abandoned and p.sealed
        p.wait()
        assert isinstance(p.error(), Abandoned)
        assert w.wait() is None and list_checkpoints(str(tmp_path)) == []
        assert [e for e in os.listdir(tmp_path) if not e.startswith(".")] == []  # its partial folder is gone
        q = w.save(state(2.0), step=2)
        q.seal()
        assert q.abandon() is False and not q.abandoned  # sealed: it commits
        assert w.wait().name == "step=000002"
    finally:
        w.close()


def test_buffer_stats_count_the_reused_host_buffers(tmp_path):
    w = CheckpointWriter(str(tmp_path), async_save=True, fsync=False, dedup=False)
    try:
        for step in (1, 2):
            w.save(state(float(step)), step=step)
            w.wait()
        stats = w.buffer_stats()
        assert stats.allocations == stats.tensors == 2  # the second save reused the first one's buffers
    finally:
        w.close()
