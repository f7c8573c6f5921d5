"""The Folder layer without a Trainer (lightning_ckpt/folder/): retention planned and applied once with every
protection, the run history, and the state kept across saves (folder/index.py) equal to the answer computed from
the whole listing after any sequence of commits and deletions."""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_ckpt import CheckpointWriter, list_checkpoints
from lightning_ckpt.folder import Folder
from lightning_ckpt.folder.history import HISTORY, append_history, history_line, read_history
from lightning_ckpt.folder.index import NeededIndex, RetentionIndex
from lightning_ckpt.folder.needed import hold_resume_point, needed, record_failed_run, release_resume_point
from lightning_ckpt.folder.retention import plan_deletions, records_of
from lightning_ckpt.policy.retention import RetentionRules
from lightning_ckpt.read import CheckpointInfo
from lightning_ckpt.store import LocalStore

RULE = {"monitor": "loss", "mode": "min", "top_k": 1}


# ------------------------------------------------------------------------------------------------ a real folder
def _save(w: CheckpointWriter, step: int, loss: float, *, tags=(), meta=None) -> str:
    m = {"best_rule": [RULE], "run_id": "r1", "lineage": {"run": "line-a", "parent": None}, **(meta or {})}
    return w.save({"w": torch.full((4,), float(step))}, step=step, metrics={"loss": loss}, tags=set(tags),
                  meta=m).result().name


@pytest.fixture
def folder(tmp_path):
    """Steps 1..6: 2 is the best (tagged best), 3 a branch point of a run started from it (step 5), 4 where step 6
    resumed from in another run."""
    d = str(tmp_path / "ckpts")
    w = CheckpointWriter(d, async_save=False, fsync=False)
    try:
        _save(w, 1, 5.0)
        _save(w, 2, 1.0, tags=["best"])
        _save(w, 3, 4.0)
        _save(w, 4, 3.0)
        _save(w, 5, 4.5, meta={"lineage": {"run": "line-b", "parent": os.path.join(d, "step=000003")}})
        _save(w, 6, 4.2, meta={"resumed_from": os.path.join(d, "step=000004"), "run_id": "r2",
                               "lineage": {"run": "line-c", "parent": None}})
    finally:
        w.close()
    return d


def test_plan_keeps_every_protection_and_apply_deletes_the_rest(folder):
    f = Folder(folder)
    plan = f.plan([RetentionRules(keep_last=1)], protect={"step=000001": "pinned"})
    why = plan.protected
    assert why["step=000006"] == "the folder's newest checkpoint"
    assert why["step=000002"] == "a current best by loss"
    assert why["step=000003"] == "the checkpoint the run of step=000005 started from"
    assert why["step=000004"] == "the checkpoint step=000006 resumed from"
    assert why["step=000001"] == "pinned"
    assert plan.doomed == {"step=000005": "retention rules"}
    assert f.apply(plan) == ["step=000005"]
    assert [c.name for c in list_checkpoints(folder)] == [f"step=00000{i}" for i in (1, 2, 3, 4, 6)]


def test_a_live_rule_is_left_to_its_owner_and_a_live_hold_is_kept(folder):
    f = Folder(folder)
    plan = f.plan([RetentionRules(keep_last=1)], live_rules=[RULE])
    assert "step=000002" in plan.doomed  # the live best-k callback protects its own best (its protect())
    assert hold_resume_point(folder, os.path.join(folder, "step=000001"), "live")
    try:
        held = f.plan([RetentionRules(keep_last=1)], holds=True).protected
        assert "the live run live" in held["step=000001"]
    finally:
        release_resume_point(folder, "live")
    assert "step=000001" in f.plan([RetentionRules(keep_last=1)], holds=True).doomed


def test_failed_runs_are_planned_but_never_what_a_run_needs(folder):
    record_failed_run(folder, "r1", "RuntimeError()", 0.0)
    plan = Folder(folder).plan([], holds=True, failed=True)
    # r2 resumed from step 4 (a checkpoint of r1): r1 counts as gone on with, nothing of it is failed
    assert plan.doomed == {}
    record_failed_run(folder, "r2", "RuntimeError()", 0.0)
    plan = Folder(folder).plan([], failed=True)
    assert plan.doomed == {}  # r2's only checkpoint is the newest


def test_an_unknown_monitor_deletes_nothing(folder):
    with pytest.raises(ValueError, match="none of the 6 checkpoints"):
        Folder(folder).plan([RetentionRules(keep_best=1, monitor="acc")])


def test_delete_in_the_background_then_collect(folder):
    f = Folder(folder)
    seen = []
    with cf.ThreadPoolExecutor(1) as ex:
        done = f.apply(f.plan([RetentionRules(keep_last=1)]), purge=ex, on_deleted=seen.append)
        assert done == seen == ["step=000001", "step=000005"]
        assert not {"step=000001", "step=000005"} & set(LocalStore(folder).names())  # out of the listing at once
    assert not [e for e in os.listdir(folder) if e.startswith(".trash-")]  # the bytes went in the background


# ------------------------------------------------------------------------------------------------ history
def test_history_appends_and_reads_back(tmp_path):
    d = str(tmp_path)
    store = LocalStore(d)
    assert read_history(store) == (None, 0)
    append_history(d, history_line(3, "step=000003", ["best"], {"loss": 0.5}, when=1.0))
    append_history(d, history_line(4, "step=000004", [], {"loss": 0.4}, when=2.0))
    with open(os.path.join(d, HISTORY), "a") as f:
        f.write("not json\n")
    lines, bad = read_history(store)
    assert [(x["step"], x["name"], x["metrics"]["loss"]) for x in lines] == [(3, "step=000003", 0.5),
                                                                          (4, "step=000004", 0.4)]
    assert bad == 1
    with pytest.raises(ValueError):
        append_history(d, history_line(5, "x", [], {"loss": float("nan")}))


def test_history_is_never_written_through_a_link(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("")
    (tmp_path / "run").mkdir()
    os.symlink(target, tmp_path / "run" / HISTORY)
    with pytest.raises(OSError):
        append_history(str(tmp_path / "run"), history_line(1, "a", [], {}))
    assert target.read_text() == ""


# ------------------------------------------------------------------------------------------------ kept state
def _info(i: int, line: int, best: bool, loss: float, ref: int | None, kind: str, rules: bool) -> CheckpointInfo:
    lineage = {"run": f"run-{line}", "run_name": f"n{line}" if line else None, "parent": None}
    m = {"run_id": f"p{line}", "lineage": lineage, "best_rule": [RULE] if rules else []}
    if ref is not None:
        if kind == "resumed":
            m["resumed_from"] = f"/x/step={ref:06d}"
        else:
            lineage["parent"] = f"/x/step={ref:06d}"
    name = f"step={i:06d}"
    return CheckpointInfo(name, f"/x/{name}", i, 0, ["best"] if best else [], {"loss": loss}, 100, "full",
                          1000.0 + i, m)


ops = st.lists(st.tuples(st.booleans(), st.integers(0, 2), st.booleans(), st.floats(0, 10, allow_nan=False),
                         st.one_of(st.none(), st.integers(1, 40)), st.sampled_from(["resumed", "parent"]),
                         st.booleans(), st.integers(0, 1000)), min_size=1, max_size=40)
rule_sets = st.builds(RetentionRules, keep_last=st.one_of(st.none(), st.integers(1, 4)),
                      keep_best=st.one_of(st.none(), st.integers(1, 3)),
                      keep_every_n_steps=st.one_of(st.none(), st.integers(2, 5)),
                      keep_tags=st.one_of(st.none(), st.just(("best",))), monitor=st.just("loss"),
                      mode=st.sampled_from(["min", "max"])).filter(lambda r: r.has_keep_rule)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, rule_sets, st.sampled_from([False, True]))
def test_the_kept_state_equals_the_whole_computation_after_commits_and_deletions(steps, rules, copy):
    idx, ret = NeededIndex(copy), RetentionIndex(rules)
    listing: list = []
    for i, (commit, line, best, loss, ref, kind, has_rules, pick) in enumerate(steps, 1):
        if commit or not listing:
            listing = listing + [_info(i, line, best, loss, ref, kind, has_rules)]
        else:
            listing = [c for j, c in enumerate(listing) if j != pick % len(listing)]
        if pick % 7 == 0:  # the listing read afresh: new objects, the same values
            listing = [dataclasses.replace(c) for c in listing]
        if pick % 5 == 0 and listing:  # one checkpoint replaced under its name (other metrics and tags)
            k = pick % len(listing)
            old = listing[k]
            listing[k] = dataclasses.replace(old, tags=[] if old.tags else ["best"], metrics={"loss": loss + 1.0})
        assert idx.needed(listing, [RULE] if pick % 3 == 0 else ()) == needed(listing, [RULE] if pick % 3 == 0 else (),
                                                                               copy=copy)
        protected = {c.name for c in listing[:: 3]}
        want = set(plan_deletions(records_of(listing), [rules], protected)) if listing else set()
        assert ret.doomed(listing, protected) == want


def test_a_save_costs_the_change_not_the_folder():
    """After the first call, one commit and one deletion update the kept state without going over the listing."""
    listing = [_info(i, 0, i % 50 == 0, float(i), None, "parent", True) for i in range(1, 2001)]
    idx = NeededIndex()
    idx.needed(listing)
    calls = []
    real_add = idx.add
    idx.add = lambda c: (calls.append(c.name), real_add(c))  # type: ignore[method-assign]
    listing = listing[1:] + [_info(2001, 0, False, 1.0, None, "parent", True)]
    assert idx.needed(listing) == needed(listing)
    assert calls == ["step=002001"] and idx.rebuilds == 1
