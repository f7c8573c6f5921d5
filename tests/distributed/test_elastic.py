"""torchrun elastic restarts and a relaunch at another world size, with real torchrun agents (tests/support/launch.py).

One job (``elastic_run``), against an uninterrupted 2-rank run of the same script (``elastic_reference``):
  - torchrun ``--max-restarts 1``, 2 ranks; attempt 0: rank 1 kills itself with SIGKILL right after step 4's commit;
    torchrun stops rank 0 and restarts both; attempt 1 resumes from step 4 (``resume="auto"``) and rank 1 is killed
    again after step 8's commit; no restart is left, so the launch fails;
  - the same command relaunched with one process resumes from step 8 at world size 1 and finishes at step 12.

What "exact" means here: after a restart at the same world size, every tensor of the model and of the optimizer
state in the next checkpoint is bitwise equal to the uninterrupted run's. Under a world-size change the training
computation itself may change (a DistributedSampler splits the data by world size), so what is defined is the
restore: the state the one-process attempt starts training from is bitwise the 2-rank checkpoint's (every
parameter and buffer, every Adam moment and step). The demo loader is not a ``DataLoader`` (no sampler is
injected): every rank trains on the same batches, so one rank computes what two did, and its final weights and
optimizer state are bitwise equal to the uninterrupted 2-rank run's as well; that is checked too.

torchrun runs with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: without it torch (2.4 and later) hands the restarted
ranks the failed attempt's process-group addresses (see ``lightning_ckpt/writer/elastic.py``).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from lightning_ckpt import list_checkpoints, load_checkpoint, verify_checkpoint
from lightning_ckpt.writer import elastic

from support import TESTS, torchrun
from support.shared import two_ranks

pytestmark = pytest.mark.usefixtures("forkserver")

SCRIPT = os.path.join(TESTS, "distributed", "elastic_script.py")
ARGS = ["--max-steps", "12", "--every", "4"]
FRESH_STORE = {elastic.FIX.split("=")[0]: "1"}

elastic_reference = two_ranks("elastic_reference", SCRIPT, lambda d: ["--dir", d / "ckpts", *ARGS,
                                                                      "--out", d / "w.safetensors"])


def debris(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith((".partial-", ".tmp-", ".trash-")))


@pytest.fixture(scope="module")
def elastic_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("elastic")
    ckpts = str(d / "ckpts")
    two = torchrun(2, SCRIPT, "--dir", ckpts, *ARGS, "--kill", "0:1:4", "--kill", "1:1:8",
                   "--out", str(d / "two.safetensors"), ok=False, env=dict(os.environ, **FRESH_STORE),
                   torchrun_args=["--max-restarts", "1"])
    after_two = {"steps": [c.step for c in list_checkpoints(ckpts)], "debris": debris(ckpts)}
    one = torchrun(1, SCRIPT, "--dir", ckpts, *ARGS, "--out", str(d / "one.safetensors"))
    return d, two, after_two, one


def flat(ck: dict) -> dict[str, object]:
    """The model's tensors and every optimizer state entry of a loaded checkpoint, under the names the script's
    ``training_state`` uses (``model/<key>``, ``optim<i>/<param id>/<name>``)."""
    out: dict[str, object] = {f"model/{k}": v for k, v in ck["state_dict"].items()}
    for i, osd in enumerate(ck["optimizer_states"]):
        for pid, st in osd["state"].items():
            for name, v in st.items():
                out[f"optim{i}/{pid}/{name}"] = v
    return out


def assert_bitwise_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(torch.as_tensor(got[k]), torch.as_tensor(want[k])), k


def checkpoint(folder, step: int) -> dict:
    (c,) = [c for c in list_checkpoints(str(folder)) if c.step == step]
    return load_checkpoint(c.path)


def test_torchrun_restart_after_a_kill_resumes_exactly(elastic_run, elastic_reference):
    d, two, after_two, _ = elastic_run
    assert two.returncode != 0  # attempt 1's rank was killed too, with no restart left
    assert after_two["steps"] == [4, 8], (after_two, two.stderr[-3000:])
    # attempt 1 started from step 4's checkpoint, bitwise
    restored = load_file(str(d / "two.safetensors.restored-1"))
    assert_bitwise_equal(restored, flat(checkpoint(d / "ckpts", 4)))
    # and its step-8 checkpoint is the uninterrupted run's, bitwise (model and optimizer state)
    ours, ref = checkpoint(d / "ckpts", 8), checkpoint(elastic_reference / "ckpts", 8)
    assert_bitwise_equal(flat(ours), flat(ref))
    assert ours["global_step"] == ref["global_step"] == 8
    step8 = [c for c in list_checkpoints(str(d / "ckpts")) if c.step == 8][0].manifest
    assert step8["world_size"] == 2 and step8["resumed_from"].endswith("step=000004")


def test_relaunch_with_one_process_resumes_the_two_rank_run(elastic_run, elastic_reference):
    d, _, _, one = elastic_run
    info = json.load(open(d / "one.safetensors.json"))
    assert info["world_size"] == 1 and info["global_step"] == 12 and info["resumed_from"].endswith("step=000008")
    # the state the one-process attempt starts from is the 2-rank checkpoint of step 8, bitwise
    assert_bitwise_equal(load_file(str(d / "one.safetensors.restored-0")), flat(checkpoint(d / "ckpts", 8)))
    # every rank trained on the same batches, so one rank goes on exactly as two did
    assert_bitwise_equal(load_file(str(d / "one.safetensors")), load_file(str(elastic_reference / "w.safetensors")))
    assert_bitwise_equal(flat(checkpoint(d / "ckpts", 12)), flat(checkpoint(elastic_reference / "ckpts", 12)))
    m = list_checkpoints(str(d / "ckpts"))[-1].manifest
    assert m["world_size"] == 1 and m["step"] == 12


def test_killed_attempts_leave_no_partial_and_every_checkpoint_verifies(elastic_run):
    d, _, after_two, _ = elastic_run
    assert after_two["debris"] == []  # nothing left by the killed ranks, before any relaunch cleaned up
    ckpts = str(d / "ckpts")
    assert [c.step for c in list_checkpoints(ckpts)] == [4, 8, 12]
    assert debris(ckpts) == []
    for c in list_checkpoints(ckpts):
        verify_checkpoint(c.path)


def test_restart_store_warning_only_where_a_restart_would_share_the_store():
    shared = {"TORCHELASTIC_MAX_RESTARTS": "1", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    message = elastic.restart_store_problem(shared)
    assert message is not None and elastic.FIX in message and "135712" in message
    assert elastic.restart_store_problem(dict(shared, TORCHELASTIC_USE_AGENT_STORE="False")) is None
    assert elastic.restart_store_problem(dict(shared, TORCHELASTIC_MAX_RESTARTS="0")) is None
    assert elastic.restart_store_problem({}) is None
