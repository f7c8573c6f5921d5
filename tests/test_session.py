"""FolderSession on its own, without a Trainer: a real folder, a real CheckpointWriter, and a minimal save context
(the training loop's side of :class:`~lightning_ckpt.session.state.SaveContext`)."""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import pytest
import torch

from lightning_ckpt import latest_checkpoint, list_checkpoints, load_checkpoint
from lightning_ckpt.folder.needed import failed_run_ids
from lightning_ckpt.format.manifest import STATE_KEY
from lightning_ckpt.policy.enums import Hook, Kind, Position
from lightning_ckpt.policy.retention import RetentionRules
from lightning_ckpt.session.options import SaveOptions
from lightning_ckpt.session.session import FolderSession, Participant
from lightning_ckpt.session.state import SaveRequest
from lightning_ckpt.store.lock import FolderBusyError


class Loop:
    """A training loop's state as the session sees it: step, epoch, metrics, and the state to save."""

    def __init__(self) -> None:
        self.step, self.epoch = 0, 0
        self.weight = torch.zeros(4)
        self.loss = 1.0
        self.noted: list[tuple] = []  # what the session reported through resume_noted
        self.inexact: list[str] = []  # reasons a resume from the next full save would not be exact

    def advance(self) -> "Loop":
        self.step += 1
        self.weight += 1
        self.loss /= 2
        return self

    def metrics(self) -> dict:
        return {"loss": self.loss}

    def hparams(self) -> Optional[dict]:
        return {"lr": 0.1}

    def dump(self, weights_only: bool) -> dict:
        ckpt: dict[str, Any] = {"state_dict": {"w": self.weight.clone()}, "global_step": self.step, "epoch": self.epoch}
        if not weights_only:
            ckpt["optimizer_states"] = [{"state": {0: {"momentum": self.weight * 0.5}}}]
        return ckpt

    def stable_keys(self) -> set[str]:
        return set()

    def any_rank(self, flag: bool) -> bool:
        return flag

    def resume_state(self, after: bool) -> dict:
        return {"position": Position.BATCH_END, "inexact": list(self.inexact)}

    def resume_noted(self, summary: Optional[dict], now: bool, speaks: bool) -> None:
        self.noted.append((self.step, summary, now, speaks))


class Recorder(Participant):
    """A participant that records what the session tells it, and protects what it is told to."""

    def __init__(self, saves: bool = False, keep: frozenset = frozenset()) -> None:
        self.saves = saves
        self.keep = set(keep)
        self.commits: list = []
        self.ended: list = []

    def protect(self) -> set[str]:
        return set(self.keep)

    def after_commit(self, result: Any) -> None:
        self.commits.append((result.step, sorted(result.tags)))

    def at_end(self, session: Any, context: Any) -> None:
        self.ended.append(context)


def open_session(folder: str, **options: Any) -> FolderSession:
    s = FolderSession(folder, SaveOptions(**{"async_save": False, **options}))
    s.open()
    return s


def save_step(s: FolderSession, loop: Loop, *tags: str, content: str = Kind.FULL) -> None:
    s.request(SaveRequest(set(tags), content))
    s.flush(loop)
    s.writer.seal()
    s.wait(raise_errors=True)


def test_requests_of_one_step_are_written_once_committed_at_the_seal_and_reported_in_order(tmp_path):
    folder = str(tmp_path / "ckpts")
    s = open_session(folder, async_save=True)
    a, b = Recorder(saves=True), Recorder(saves=True)
    s.join(a, s.options)
    s.join(b, SaveOptions(async_save=True))
    loop = Loop().advance()
    assert not s.arrive(a, Hook.BATCH_END) and s.arrive(b, Hook.BATCH_END)  # the last saving one acts for both
    s.request(SaveRequest({"periodic"}))
    s.request(SaveRequest({"best"}, Kind.WEIGHTS))  # a full save of the step serves the weights request
    s.flush(loop)
    assert latest_checkpoint(folder) is None  # written, not committed: the step goes on until its boundary
    s.writer.seal()
    s.wait(raise_errors=True)
    assert [c.step for c in list_checkpoints(folder)] == [1]
    assert list_checkpoints(folder)[0].tags == ["best", "periodic"]
    assert a.commits == b.commits == [(1, ["best", "periodic"])]
    assert s.last_saved_step == 1 and [r.step for r in s.committed] == [1]
    history = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
    assert [(h["step"], h["metrics"]["loss"]) for h in history] == [(1, 0.5)]
    loaded = load_checkpoint(latest_checkpoint(folder))
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(4))
    man = list_checkpoints(folder)[0]
    assert man.manifest["kind"] == "full" and man.manifest["run_id"] == s.run_id
    assert man.manifest["resume"] == {"exact": True, "why": [], "position": "batch_end"}
    assert loaded[STATE_KEY]["kind"] == "full" and type(loaded[STATE_KEY]["kind"]) is str
    s.finish("the end")
    assert a.ended == b.ended == ["the end"]
    s.close()
    assert s.lock is None


def test_a_second_flush_of_a_saved_step_adds_nothing_and_a_later_hook_merges_its_tags(tmp_path):
    folder = str(tmp_path / "ckpts")
    s = open_session(folder)
    loop = Loop().advance()
    save_step(s, loop, "periodic")
    s.request(SaveRequest({"periodic"}))
    s.flush(loop)  # the step we saved (or resumed from): not written again
    assert s.writer.pending is None and len(list_checkpoints(folder)) == 1
    loop.advance()
    s.request(SaveRequest({"periodic"}))
    s.flush(loop)
    s.request(SaveRequest({"final"}))
    s.flush(loop, after=True)  # a later hook of the same step: its tags join the step's save
    s.writer.seal()
    s.wait(raise_errors=True)
    assert [(c.step, c.tags) for c in list_checkpoints(folder)] == [(1, ["periodic"]), (2, ["final", "periodic"])]
    s.close()


def test_the_context_hears_of_each_resume_record_and_the_session_keeps_no_warning_state(tmp_path):
    s = open_session(str(tmp_path / "ckpts"))
    loop = Loop().advance()
    loop.inexact = ["a reason"]
    save_step(s, loop, "periodic")
    loop.advance()
    s.request(SaveRequest({"preempt"}, urgent=True))
    s.flush(loop, keep=True)  # a state taken early: the caller warns only if it is the one kept
    s.requests.clear()
    assert loop.noted == [(1, {"exact": False, "why": ["a reason"], "position": "batch_end"}, True, True),
                          (2, {"exact": False, "why": ["a reason"], "position": "batch_end"}, False, True)]
    for gone in ("inexact_warned", "unwarned", "step_plan", "pending_rng", "resume_info"):
        assert not hasattr(s, gone), f"{gone} is the callbacks' (callbacks.context.FolderFit), not the session's"
    s.close()
    res = s.writer.history[0]
    assert res.step == 1


def test_retention_deletes_what_no_rule_keeps_but_never_a_protected_one(tmp_path):
    folder = str(tmp_path / "ckpts")
    s = open_session(folder)
    loop = Loop()
    save_step(s, loop.advance(), "periodic")
    first = list_checkpoints(folder)[0].name
    keeper = Recorder(keep=frozenset({first}))
    s.join(keeper)
    s.add_retention(keeper, RetentionRules(keep_last=2))
    for _ in range(4):
        save_step(s, loop.advance(), "periodic")
    s.close()  # waits for the background deletions
    steps = [c.step for c in list_checkpoints(folder)]
    assert steps == [1, 4, 5], "the two newest stay, and step 1 that a participant protects"
    assert len(s.retention_deleted) == 2 and set(s.deleted) == set(s.retention_deleted)
    assert s.leave(keeper) is False and s.retention == []  # leaving takes the participant's rules with it


def test_a_run_that_ends_in_an_exception_is_noted_as_failed_only_once_it_committed(tmp_path):
    folder = str(tmp_path / "ckpts")
    s = open_session(folder)
    s.record_failure(RuntimeError("before any save"))
    assert failed_run_ids(folder) == set()
    save_step(s, Loop().advance(), "periodic")
    s.record_failure(SystemExit(0))  # a stop that was asked for, not a failure
    assert failed_run_ids(folder) == set()
    s.record_failure(RuntimeError("boom"))
    assert failed_run_ids(folder) == {s.run_id}
    s.close()


def test_a_second_session_cannot_open_the_folder_while_the_first_holds_it(tmp_path):
    folder = str(tmp_path / "ckpts")
    s = open_session(folder)
    with pytest.raises(FolderBusyError):
        open_session(folder)
    s.close()
    open_session(folder).close()  # released at close


def test_callbacks_on_one_folder_must_agree_on_its_writer_settings(tmp_path):
    s = open_session(str(tmp_path / "ckpts"), on_save_error="stop")
    with pytest.raises(ValueError, match="dedup: True vs False"):
        s.join(Recorder(saves=True), SaveOptions(async_save=False, dedup=False))
    with pytest.raises(ValueError, match="on_save_error"):
        s.join(Recorder(saves=True), SaveOptions(on_save_error="continue"))
    assert s.participants == []
    s.join(Recorder(saves=True), SaveOptions(fsync=True))  # the stronger durability wins
    assert s.writer.fsync and s.store.fsync
    s.close()


def test_the_fits_lightning_side_warns_of_an_inexact_resume_once_and_of_an_early_state_only_if_kept(tmp_path):
    from lightning_ckpt.callbacks.context import FolderFit
    from lightning_ckpt.session.state import InexactResumeWarning

    s = open_session(str(tmp_path / "ckpts"))
    fit = FolderFit(s)
    assert fit.once("train_start") and not fit.once("train_start")  # the first callback to get there acts
    inexact = {"exact": False, "why": ["a reason"], "position": "batch_end"}
    with pytest.warns(InexactResumeWarning, match="step 3 will not reproduce"):
        fit.resume_noted(3, inexact, now=True, speaks=True)
    fit.resume_noted(4, inexact, now=True, speaks=True)  # the same reason: said once per fit
    fit.resume_noted(5, {**inexact, "why": ["another"]}, now=False, speaks=True)  # taken early: not yet
    fit.resume_noted(5, {**inexact, "why": ["a third"]}, now=False, speaks=False)  # not rank 0: never
    assert fit.unwarned is None and fit.inexact_warned == {"a reason"}
    fit.resume_noted(6, {**inexact, "why": ["another"]}, now=False, speaks=True)
    with pytest.warns(InexactResumeWarning, match="step 6 will not reproduce this run exactly: another"):
        fit.warn_kept()  # the fit ended with that state: say it now
    assert fit.unwarned is None
    s.close()


def test_a_fit_that_fails_before_lightning_restores_leaves_nothing_hooked_into_the_trainer(tmp_path):
    from support import data, trainer

    from lightning_ckpt import PeriodicCheckpoint
    from lightning_ckpt.demo import DemoModel

    class FailsToConfigure(DemoModel):
        def configure_model(self) -> None:  # Lightning calls it after the callbacks' setup, before it restores
            raise RuntimeError("configure_model failed")

    folder = str(tmp_path / "ckpts")
    t = trainer([PeriodicCheckpoint(folder, every_n_train_steps=2)], max_steps=2, val_every=None)
    with pytest.raises(RuntimeError, match="configure_model failed"):
        t.fit(FailsToConfigure(), data())
    # Lightning runs no teardown after an exception: closing the folder's session undid the resume interception
    connector = t._checkpoint_connector
    assert getattr(connector.resume_start, "__func__", None) is type(connector).resume_start, "Lightning's own again"
    t.fit(DemoModel(), data())  # the same Trainer again
    assert [c.step for c in list_checkpoints(folder)] == [2]
