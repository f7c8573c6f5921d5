"""`lightning-ckpt prune`."""
from __future__ import annotations

import functools
import json
import os

import lightning.pytorch as pl
import pytest
import torch

from lightning_ckpt import CheckpointWriter, PeriodicCheckpoint, latest_checkpoint, list_checkpoints
from lightning_ckpt.cli import main
from lightning_ckpt.demo import DemoModel

import support
from support import data, run_python


def make(d, losses: dict):
    """One checkpoint per step, with metric ``loss``; all the same size."""
    w = CheckpointWriter(str(d), async_save=False)
    for s, loss in losses.items():
        w.save({"state_dict": {"w": torch.full((8, 8), float(s))}, "global_step": s}, step=s, epoch=0,
               tags=["periodic"], metrics={"loss": loss})
    w.close()


def steps(d):
    return [c.step for c in list_checkpoints(str(d))]


LOSSES = {1: 0.5, 2: 0.125, 3: 0.75, 4: 0.25, 5: 0.875}


def test_keep_last(tmp_path, capsys):
    make(tmp_path, LOSSES)
    assert main(["prune", str(tmp_path), "--keep-last", "2"]) == 0
    assert steps(tmp_path) == [4, 5]
    out = capsys.readouterr().out
    assert "deleted" in out and "step=000001" in out and "step=000003" in out and "kept 2 checkpoint(s)" in out
    assert not [e for e in os.listdir(tmp_path) if e.startswith((".trash-", ".partial-"))]


def test_keep_last_one_keeps_only_newest(tmp_path):
    make(tmp_path, LOSSES)
    assert main(["prune", str(tmp_path), "--keep-last", "1"]) == 0
    assert steps(tmp_path) == [5]
    assert latest_checkpoint(str(tmp_path)).endswith("step=000005")


def test_dry_run_deletes_nothing(tmp_path, capsys):
    make(tmp_path, LOSSES)
    assert main(["prune", str(tmp_path), "--keep-last", "1", "--dry-run"]) == 0
    assert steps(tmp_path) == [1, 2, 3, 4, 5]
    out = capsys.readouterr().out
    assert out.count("would delete") == 4
    assert "step=000005" not in "\n".join(l for l in out.splitlines() if "would delete" in l)


def test_keep_best_by_monitor(tmp_path):
    make(tmp_path, LOSSES)
    assert main(["prune", str(tmp_path), "--keep-best", "1", "--monitor", "loss"]) == 0
    assert steps(tmp_path) == [2, 5]  # best loss (step 2) and the newest


def test_keep_best_mode_max_with_keep_last(tmp_path):
    make(tmp_path, LOSSES)
    assert main(["prune", str(tmp_path), "--keep-best", "1", "--monitor", "loss", "--mode", "max", "--keep-last", "1"]) == 0
    assert steps(tmp_path) == [5]


def test_keep_every_n_steps(tmp_path):
    make(tmp_path, LOSSES)
    assert main(["prune", str(tmp_path), "--keep-every-n-steps", "2"]) == 0
    assert steps(tmp_path) == [2, 4, 5]


def test_max_total_bytes(tmp_path):
    make(tmp_path, LOSSES)
    size = list_checkpoints(str(tmp_path))[0].size_bytes
    assert all(c.size_bytes == size for c in list_checkpoints(str(tmp_path)))
    assert main(["prune", str(tmp_path), "--max-total-bytes", str(int(size * 2.5))]) == 0
    assert steps(tmp_path) == [4, 5]
    # smaller than one checkpoint: the newest stays all the same
    assert main(["prune", str(tmp_path), "--max-total-bytes", "1"]) == 0
    assert steps(tmp_path) == [5]


def test_no_rule_exits_2_with_a_message(tmp_path, capsys):
    make(tmp_path, LOSSES)
    assert main(["prune", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "at least one rule" in err and "--keep-last" in err
    assert steps(tmp_path) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "args, message",
    [(["--keep-last", "0"], "keep_last=0"), (["--keep-best", "2"], "monitor")],
)
def test_bad_rule_exits_2(tmp_path, capsys, args, message):
    make(tmp_path, LOSSES)
    assert main(["prune", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err
    assert steps(tmp_path) == [1, 2, 3, 4, 5]


def test_not_a_folder_exits_2(tmp_path, capsys):
    assert main(["prune", str(tmp_path / "nope"), "--keep-last", "1"]) == 2
    assert "not a folder" in capsys.readouterr().err


@pytest.mark.usefixtures("forkserver")
def test_subprocess(tmp_path):
    make(tmp_path, LOSSES)
    p = run_python(["-m", "lightning_ckpt.cli", "prune", str(tmp_path), "--keep-last", "3"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "step=000001" in p.stdout and "kept 3" in p.stdout
    assert steps(tmp_path) == [3, 4, 5]


# --------------------------------------------------------------------------- --failed


class Boom(pl.Callback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise RuntimeError("boom")


trainer = functools.partial(support.trainer, val_every=None)


def failed_run(d):
    pc = PeriodicCheckpoint(str(d), every_n_train_steps=2, save_on_train_end=False)
    with pytest.raises(RuntimeError, match="boom"):
        trainer([pc, Boom(5)], max_steps=10).fit(DemoModel(), data())
    runs = os.listdir(os.path.join(d, ".runs"))
    assert len(runs) == 1
    rec = json.load(open(os.path.join(d, ".runs", runs[0])))
    assert rec["status"] == "failed" and "boom" in rec["error"]
    assert {c.manifest["run_id"] for c in list_checkpoints(str(d))} == {rec["run_id"]}
    return rec["run_id"]


def test_failed_removes_failed_run_and_partials_but_not_newest(tmp_path, capsys):
    failed_run(tmp_path)
    assert steps(tmp_path) == [2, 4]
    partial = tmp_path / ".partial-step=000006-deadbeef"
    partial.mkdir()
    (partial / "model-rank00000.safetensors").write_bytes(b"x" * 10)
    assert main(["prune", str(tmp_path), "--failed", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would delete" in out and ".partial-step=000006" in out
    assert partial.exists() and steps(tmp_path) == [2, 4]
    assert main(["prune", str(tmp_path), "--failed"]) == 0
    assert not partial.exists()
    assert steps(tmp_path) == [4]  # the newest survives even though its run failed


def test_failed_keeps_checkpoints_of_good_runs(tmp_path):
    failed_id = failed_run(tmp_path)
    # a good run resumes from the failed one's last checkpoint and finishes
    pc = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=2, save_on_train_end=False)
    trainer([pc], max_steps=8).fit(DemoModel(), data(), ckpt_path=latest_checkpoint(str(tmp_path)))
    assert steps(tmp_path) == [2, 4, 6, 8]
    good = {c.step for c in list_checkpoints(str(tmp_path)) if c.manifest["run_id"] != failed_id}
    assert good == {6, 8}
    assert main(["prune", str(tmp_path), "--failed"]) == 0
    assert steps(tmp_path) == [6, 8]


def test_failed_combined_with_keep_last(tmp_path):
    failed_run(tmp_path)
    make(tmp_path / "other", {10: 1.0})  # an unrelated folder is untouched
    assert main(["prune", str(tmp_path), "--failed", "--keep-last", "1"]) == 0
    assert steps(tmp_path) == [4]
    assert steps(tmp_path / "other") == [10]
