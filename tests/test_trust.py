"""Trust under concurrency and careless input: one run per folder (the lock), retention rules that never delete what
they should keep, settings refused at construction, a newer format never skipped into a fresh start, and a commit
that stays a commit when latest.json cannot be written."""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import lightning.pytorch as pl
import pytest

from lightning_ckpt import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointWriteError,
    CheckpointWriter,
    ExportOnTrainEnd,
    PeriodicCheckpoint,
    PreemptionCheckpoint,
    RetentionPolicy,
    latest_checkpoint,
    list_checkpoints,
)
from lightning_ckpt.cli import main
from lightning_ckpt.demo import DemoDataModule, DemoModel
from lightning_ckpt.format import manifest as mf
from lightning_ckpt.policy.retention import Record, RetentionRules, plan_retention
from lightning_ckpt.store import LocalStore
from lightning_ckpt.store.lock import FolderBusyError
from support import start_python

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trainer(callbacks, max_steps=6, **kw) -> pl.Trainer:
    kw.setdefault("limit_val_batches", 0)
    return pl.Trainer(max_steps=max_steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **kw)


def data() -> DemoDataModule:
    return DemoDataModule(n_train=64, n_val=32, batch_size=16)


def steps(d) -> list[int]:
    return [c.step for c in list_checkpoints(str(d))]


# ------------------------------------------------------------------------------------------------ one run per folder
HOLDER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r})
    from lightning_ckpt.store import LocalStore
    from lightning_ckpt.store.base import owner_token
    d = sys.argv[1]
    lock = LocalStore(d).lock({{"run_id": "the-first-run"}})
    partial = os.path.join(d, ".partial-step=000002~" + owner_token() + "~inflight")
    os.makedirs(partial)
    with open(os.path.join(partial, "model-rank00000.safetensors"), "wb") as f:
        f.write(b"half-written")
    print("holding", flush=True)
    time.sleep(300)
""")


@pytest.fixture
def first_run(tmp_path, forkserver):
    """Another process that holds the folder's lock and is writing a save (its partial folder): a fork-server child
    (``support.start_python``), a process of its own without the seconds of a cold interpreter's imports."""
    d = tmp_path / "run"
    d.mkdir()
    proc = start_python(["-c", HOLDER.format(repo=REPO), str(d)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    partial = next(p for p in d.iterdir() if p.name.startswith(".partial-"))
    yield d, proc, partial
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_second_run_is_refused_while_a_first_writes_and_resumes_once_it_died(first_run):
    d, proc, partial = first_run
    with pytest.raises(FolderBusyError) as ei:
        trainer([PeriodicCheckpoint(str(d), every_n_train_steps=2)]).fit(DemoModel(), data())
    msg = str(ei.value)
    assert str(proc.pid) in msg and "the-first-run" in msg and "another dirpath" in msg
    assert partial.is_dir() and (partial / "model-rank00000.safetensors").read_bytes() == b"half-written"
    assert steps(d) == []
    proc.send_signal(signal.SIGKILL)  # the first run crashes: its lock goes with it (nothing stale to clear by hand)
    proc.wait()
    trainer([PeriodicCheckpoint(str(d), every_n_train_steps=2)]).fit(DemoModel(), data())
    assert steps(d) == [2, 4, 6]
    assert not partial.exists()  # the dead run's debris is cleaned up by the run that now holds the folder
    assert LocalStore(str(d)).lock_holder() is None  # released when fit ended


def test_prune_never_deletes_beside_a_running_run_and_failed_removes_only_dead_writers_debris(first_run, capsys):
    d, proc, partial = first_run
    w = CheckpointWriter(str(d), async_save=False)  # (in this test the writer alone: no session, no lock)
    for s in (1, 2, 3):
        w.save({"w": __import__("torch").ones(2) * s}, step=s)
    w.close()
    assert main(["prune", str(d), "--keep-last", "1"]) == 2
    assert "nothing deleted" in capsys.readouterr().err and steps(d) == [1, 2, 3]
    assert main(["prune", str(d), "--failed", "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["partials"] == [] and report["left_alone"] == [str(partial)]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert main(["prune", str(d), "--failed", "--keep-last", "1"]) == 0
    assert not partial.exists() and steps(d) == [3]


def test_a_filesystem_without_locks_is_refused_unless_opted_out(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(CheckpointWriteError, match="LIGHTNING_CKPT_LOCK=0"):
        trainer([PeriodicCheckpoint(str(tmp_path), every_n_train_steps=2)]).fit(DemoModel(), data())
    assert steps(tmp_path) == []
    monkeypatch.setenv("LIGHTNING_CKPT_LOCK", "0")
    trainer([PeriodicCheckpoint(str(tmp_path), every_n_train_steps=2)]).fit(DemoModel(), data())
    assert steps(tmp_path) == [2, 4, 6]


# ------------------------------------------------------------------------------------------------ retention
def _records(n=6):
    return [Record(f"s{i}", i, 10, {"val_loss": 1.0 / (i + 1)}, ("preempt",) if i == 2 else ("periodic",), float(i))
            for i in range(1, n + 1)]


def test_keep_tags_given_as_one_string_is_one_tag():
    rules = RetentionRules(keep_last=1, keep_tags="preempt")
    assert rules.keep_tags == ("preempt",)
    keep = dict(zip((r.name for r in _records()), plan_retention(_records(), rules)))
    assert keep["s2"] and keep["s6"] and not keep["s1"] and not keep["s3"]
    assert RetentionPolicy("x", keep_tags="preempt").rules.keep_tags == ("preempt",)


def test_ranking_by_a_metric_no_checkpoint_recorded_deletes_nothing(tmp_path, capsys, caplog):
    pc = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=1, save_on_train_end=False)
    with caplog.at_level(logging.WARNING, logger="lightning_ckpt"):
        trainer([pc, RetentionPolicy(str(tmp_path), keep_best=1, monitor="val_los")], max_steps=4).fit(DemoModel(), data())
    assert steps(tmp_path) == [1, 2, 3, 4]
    assert any("val_los" in r.getMessage() and "train_loss" in r.getMessage() for r in caplog.records)
    assert main(["prune", str(tmp_path), "--keep-best", "1", "--monitor", "val_los"]) == 2
    err = capsys.readouterr().err
    assert "val_los" in err and "train_loss" in err and "nothing was deleted" in err
    assert steps(tmp_path) == [1, 2, 3, 4]


def test_two_retention_policies_on_one_folder_keep_what_either_keeps(tmp_path):
    pc = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=2, save_on_train_end=False)
    keep_last = RetentionPolicy(str(tmp_path), keep_last=1)
    milestones = RetentionPolicy(str(tmp_path), keep_every_n_steps=4)
    trainer([pc, keep_last, milestones], max_steps=10).fit(DemoModel(), data())
    assert steps(tmp_path) == [4, 8, 10]


# ------------------------------------------------------------------------------------------------ bad settings
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("make, setting", [
    (lambda d: PeriodicCheckpoint(d, every="auto", mtbf_s=NAN), "mtbf_s"),
    (lambda d: PeriodicCheckpoint(d, every="auto", mtbf_s=INF), "mtbf_s"),
    (lambda d: PeriodicCheckpoint(d, monitor="m", on_change=NAN), "on_change"),
    (lambda d: PeriodicCheckpoint(d, monitor="m", on_change=INF), "on_change"),
    (lambda d: PeriodicCheckpoint(d, save_timeout_s=INF), "save_timeout_s"),
    (lambda d: PeriodicCheckpoint(d, save_timeout_s=NAN), "save_timeout_s"),
    (lambda d: PeriodicCheckpoint(d, backup_uri=[{"uri": "s3://b/p", "max_retry_s": NAN}]), "max_retry_s"),
    (lambda d: PeriodicCheckpoint(d, backup_uri=[{"uri": "s3://b/p", "required": "yes"}]), "required"),
    (lambda d: PeriodicCheckpoint(d, backup_uri="s3://"), "bucket"),
    (lambda d: PeriodicCheckpoint("s3://"), "bucket"),
    (lambda d: ExportOnTrainEnd(d, dtype="int8"), "dtype"),
    (lambda d: PreemptionCheckpoint(d, signals=["SIGKILL"]), "SIGKILL"),
    (lambda d: PreemptionCheckpoint(d, signals=["SIGSTOP"]), "SIGSTOP"),
    (lambda d: PreemptionCheckpoint(d, signals=[99999]), "99999"),
    (lambda d: PeriodicCheckpoint(d, filename="x", name_template="y-{step}"), "filename"),
    (lambda d: PeriodicCheckpoint(d, save_top_k=3), "top_k"),
    (lambda d: PeriodicCheckpoint(d, asycn_save=False), "async_save"),
])
def test_bad_settings_are_refused_when_the_callback_is_built(tmp_path, make, setting):
    with pytest.raises(ValueError, match=setting):
        make(str(tmp_path))


# ------------------------------------------------------------------------------------------------ format, latest.json
def test_a_folder_of_a_newer_release_stops_auto_resume_instead_of_starting_fresh(tmp_path):
    trainer([PeriodicCheckpoint(str(tmp_path), every_n_train_steps=2)], max_steps=2).fit(DemoModel(), data())
    (ckpt,) = list_checkpoints(str(tmp_path))
    m = dict(ckpt.manifest, format_version=mf.FORMAT_VERSION + 1)
    with open(os.path.join(ckpt.path, "manifest.json"), "wb") as f:
        f.write(mf.dumps(m))
    with pytest.raises(CheckpointError, match="(?i)upgrade"):
        trainer([PeriodicCheckpoint(str(tmp_path), every_n_train_steps=2, resume="auto")], max_steps=4).fit(
            DemoModel(), data())
    with pytest.raises(CheckpointFormatError):
        latest_checkpoint(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert steps(tmp_path) == []  # nothing was trained next to it


def test_latest_checkpoint_of_a_folder_that_does_not_exist_warns(tmp_path):
    with pytest.warns(UserWarning, match="does not exist"):
        assert latest_checkpoint(str(tmp_path / "typo")) is None


def test_a_commit_stays_a_commit_when_latest_json_cannot_be_written(tmp_path, monkeypatch, caplog):
    real = LocalStore.publish_latest

    def broken(store, doc):
        if doc["step"] >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(store, doc)

    monkeypatch.setattr(LocalStore, "publish_latest", broken)
    pc = PeriodicCheckpoint(str(tmp_path), every_n_train_steps=2, save_on_train_end=False)
    with caplog.at_level(logging.ERROR, logger="lightning_ckpt"):
        trainer([pc, RetentionPolicy(str(tmp_path), keep_last=1)], max_steps=6).fit(DemoModel(), data())
    assert steps(tmp_path) == [6]  # committed, and retention ran after each commit
    assert any("latest.json" in r.getMessage() for r in caplog.records)
    assert latest_checkpoint(str(tmp_path)).endswith("step=000006")  # found by listing, not from latest.json


def test_time_bound_of_a_fifo_planted_as_a_checkpoint_file(tmp_path):
    """A FIFO in place of a member never blocks a reader (the whole resume would hang)."""
    trainer([PeriodicCheckpoint(str(tmp_path), every_n_train_steps=2)], max_steps=4).fit(DemoModel(), data())
    victim = os.path.join(str(tmp_path), "step=000004", "state-rank00000.json")
    os.unlink(victim)
    os.mkfifo(victim)
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match="not a regular file"):
        assert latest_checkpoint(str(tmp_path)).endswith("step=000002")
    assert time.monotonic() - t0 < 30 and not math.isnan(t0)
