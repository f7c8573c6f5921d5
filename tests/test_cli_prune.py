"""`lightning-ckpt prune`."""
from __future__ import annotations

import functools
import json
import os
import subprocess

import lightning.pytorch as pl
import pytest
import torch

from lightning_ckpt import BestMetricCheckpoint, CheckpointWriter, PeriodicCheckpoint, latest_checkpoint, list_checkpoints
from lightning_ckpt.cli import main
from lightning_ckpt.store.lock import LockFileError
from lightning_ckpt.folder.needed import hold_resume_point, release_resume_point
from lightning_ckpt.tools.prune import CheckpointProtectedError, failed_run_ids, remove_checkpoint
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
    failed_run(tmp_path)
    # a good run of its own in the same folder (another run name), started fresh, that finishes
    pc = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=2, save_on_train_end=False, run_name="good")
    trainer([pc], max_steps=4).fit(DemoModel(), data())
    good = {c.name for c in list_checkpoints(str(tmp_path)) if c.name.startswith("good-")}
    assert len(good) == 2
    assert main(["prune", str(tmp_path), "--failed"]) == 0
    # the failed run's step 2 goes; its step 4 is the newest of its line (resume="auto" of that line needs it)
    assert {c.name for c in list_checkpoints(str(tmp_path))} == good | {"step=000004"}


def test_failed_spares_a_failed_run_that_a_relaunch_resumed(tmp_path):
    """The red team's case: a crash, a resume="auto" relaunch that finishes, then prune --failed deleted every
    checkpoint of the crashed process but the folder's newest, the current best and the resume point among them."""
    model = support.scripted({2: 0.125, 4: 0.5, 6: 0.75, 8: 0.875, 10: 0.9})

    def callbacks():
        return [PeriodicCheckpoint(str(tmp_path), every_n_train_steps=2, save_on_train_end=False, resume="auto"),
                BestMetricCheckpoint(str(tmp_path), monitor="score", top_k=1)]

    with pytest.raises(RuntimeError, match="boom"):
        trainer(callbacks() + [Boom(5)], val_every=2, max_steps=10).fit(model, data())
    (note,) = os.listdir(tmp_path / ".runs")
    crashed = json.load(open(tmp_path / ".runs" / note))["run_id"]
    assert steps(tmp_path) == [2, 4]
    trainer(callbacks(), val_every=2, max_steps=10).fit(model, data())
    assert steps(tmp_path) == [2, 4, 6, 8, 10]
    rec = json.load(open(tmp_path / ".runs" / note))
    assert rec["status"] == "resumed" and rec["resumed_from"] == "step=000004"  # superseded by the relaunch
    assert main(["prune", str(tmp_path), "--failed"]) == 0
    assert steps(tmp_path) == [2, 4, 6, 8, 10]
    # a note an older release left (never superseded): the run went on in a later process, so it is not failed either
    json.dump({**rec, "status": "failed"}, open(tmp_path / ".runs" / note, "w"))
    assert crashed in failed_run_ids(str(tmp_path))
    assert main(["prune", str(tmp_path), "--failed"]) == 0
    assert steps(tmp_path) == [2, 4, 6, 8, 10]
    # and with rules: the best (2) and the newest stay whatever the rules say; the resume point (4) of a relaunch that
    # went on with the same run is an older checkpoint of that run by now (not pinned, or each relaunch of a
    # preempted run would keep one checkpoint forever)
    assert main(["prune", str(tmp_path), "--keep-last", "1"]) == 0
    assert steps(tmp_path) == [2, 10]


def test_needed_checkpoints_survive_every_deletion_path(tmp_path):
    make(tmp_path, LOSSES)
    names = [c.name for c in list_checkpoints(str(tmp_path))]
    # a branch started from step 2 (recorded in its manifest) keeps step 2 wherever it is deleted from
    w = CheckpointWriter(str(tmp_path), async_save=False)
    w.save({"state_dict": {"w": torch.zeros(8, 8)}, "global_step": 3}, step=3, epoch=0,
           meta={"resumed_from": str(tmp_path / names[1]), "run_id": "branch"})
    w.close()
    with pytest.raises(CheckpointProtectedError, match="resumed from"):
        remove_checkpoint(str(tmp_path / names[1]))
    with pytest.raises(CheckpointProtectedError, match="newest"):
        remove_checkpoint(latest_checkpoint(str(tmp_path)))
    remove_checkpoint(str(tmp_path / names[0]))  # nobody needs it
    assert main(["prune", str(tmp_path), "--keep-last", "1"]) == 0
    assert [c.name for c in list_checkpoints(str(tmp_path))] == [names[1], "step=000005"]
    remove_checkpoint(str(tmp_path / names[1]), force=True)
    assert [c.name for c in list_checkpoints(str(tmp_path))] == ["step=000005"]


@pytest.mark.parametrize("kind", ["dir", "link"])
def test_a_lock_of_the_wrong_type_is_a_clear_error(tmp_path, capsys, kind):
    d = tmp_path / "run"
    make(d, LOSSES)
    if kind == "dir":
        (d / ".lock").mkdir()
    else:
        (tmp_path / "elsewhere").write_text("x")
        os.symlink(tmp_path / "elsewhere", d / ".lock")
    for argv in (["prune", str(d), "--keep-last", "1"], ["prune", str(d), "--failed", "--dry-run"]):
        assert main(argv) != 0
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and ".lock" in err and "Remove it" in err, err
    assert steps(d) == [1, 2, 3, 4, 5]
    with pytest.raises(LockFileError, match="Remove it"):
        trainer([PeriodicCheckpoint(str(d), every_n_train_steps=2, resume="auto")], max_steps=2).fit(DemoModel(), data())
    assert (tmp_path / "elsewhere").read_text() == "x" if kind == "link" else (d / ".lock").is_dir()


def test_runs_notes_of_the_wrong_type_stop_prune_failed_before_it_deletes(tmp_path, capsys):
    failed_run(tmp_path)
    (tmp_path / ".partial-step=000008~nobody.1~x").mkdir()
    (tmp_path / "x.json").write_text("{}")
    os.symlink(tmp_path / "x.json", tmp_path / ".runs" / "planted.json")
    assert main(["prune", str(tmp_path), "--failed"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "planted.json" in err and "Remove it" in err
    assert steps(tmp_path) == [2, 4] and (tmp_path / ".partial-step=000008~nobody.1~x").exists()  # nothing deleted


@pytest.mark.usefixtures("forkserver")
def test_with_locks_disabled_prune_failed_leaves_a_live_writers_save(tmp_path, monkeypatch):
    """LIGHTNING_CKPT_LOCK=0 disables waiting, not safety: a save in progress of a live writer is not debris."""
    monkeypatch.setenv("LIGHTNING_CKPT_LOCK", "0")
    failed_run(tmp_path)
    script = ("import sys, torch\n"
              "from lightning_ckpt import CheckpointWriter\n"
              "w = CheckpointWriter(sys.argv[1], async_save=True, auto_seal=False)\n"
              "p = w.save({'state_dict': {'w': torch.ones(4)}}, step=7, sync=True)\n"
              "print('written', flush=True)\n"
              "sys.stdin.readline()\n"
              "w.seal()\n"
              "print(p.result().name, flush=True)\n"
              "w.close()\n")
    child = support.start_python(["-c", script, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "written"
        (partial,) = [e for e in os.listdir(tmp_path) if e.startswith(".partial-")]
        assert main(["prune", str(tmp_path), "--failed"]) == 0
        assert os.path.isdir(tmp_path / partial)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "step=000007"
        assert child.wait(60) == 0
    finally:
        if child.poll() is None:
            child.kill()
    assert steps(tmp_path) == [4, 7]


def test_failed_combined_with_keep_last(tmp_path):
    failed_run(tmp_path)
    make(tmp_path / "other", {10: 1.0})  # an unrelated folder is untouched
    assert main(["prune", str(tmp_path), "--failed", "--keep-last", "1"]) == 0
    assert steps(tmp_path) == [4]
    assert steps(tmp_path / "other") == [10]


def test_a_live_runs_resume_point_is_kept_before_its_first_save(tmp_path, monkeypatch):
    """With locks disabled, a deletion in another process sees what a live run resumed from before any manifest
    records it (the run's session notes it as running; this test's process stands for that run)."""
    monkeypatch.setenv("LIGHTNING_CKPT_LOCK", "0")
    make(tmp_path, LOSSES)
    assert hold_resume_point(str(tmp_path), str(tmp_path / "step=000002"), "live")
    assert main(["prune", str(tmp_path), "--keep-last", "1"]) == 0
    assert steps(tmp_path) == [2, 5]
    with pytest.raises(CheckpointProtectedError, match="live run"):
        remove_checkpoint(str(tmp_path / "step=000002"))
    release_resume_point(str(tmp_path), "live")  # the run ended
    assert main(["prune", str(tmp_path), "--keep-last", "1"]) == 0
    assert steps(tmp_path) == [5]
