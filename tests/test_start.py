"""Where a fit starts (``lightning_ckpt.session.start``), decided without a Trainer: each input -> its decision, a
corrupt newest checkpoint -> the previous one, ``"best"`` with no best, node-local folders and a non-zero rank through
fake gather/broadcast functions, and an S3 location that is down -> ``StorageUnavailableError`` (never a fresh start,
never an older checkpoint)."""
from __future__ import annotations

import os
import socket

import pytest
import torch

from lightning_ckpt import CheckpointWriter
from lightning_ckpt.errors import CheckpointError, CheckpointNotFoundError, FolderNotEmptyError, StorageUnavailableError
from lightning_ckpt.format.manifest import DIGEST
from lightning_ckpt.read import read_checkpoint_manifest
from lightning_ckpt.session import start
from lightning_ckpt.session.resume import resume_path
from lightning_ckpt.session.start import Ask, Place, Start

RULE = [{"monitor": "loss", "mode": "min", "top_k": 2}]


def _write(folder, steps, *, best=(), run_name=None, run="r1"):
    """Small checkpoints at ``steps`` (loss = step / 10; ``best``: the steps tagged best). Returns their paths."""
    w = CheckpointWriter(str(folder), async_save=False)
    try:
        return [w.save({"state_dict": {"w": torch.full((4,), float(s))}}, step=s, metrics={"loss": s / 10},
                       tags=["best"] if s in best else [],
                       meta={"lineage": {"run": run, "run_name": run_name}, "best_rule": RULE}).result().path
                for s in steps]
    finally:
        w.close()


def _corrupt(path):
    f = os.path.join(path, "model-rank00000.safetensors")
    data = bytearray(open(f, "rb").read())
    data[-3] ^= 0xFF  # a tensor byte: the size stays, the CRC32C does not
    open(f, "wb").write(bytes(data))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("start") / "ckpts"
    return str(d), _write(d, [2, 4], best=[2])


def test_each_input_decides_where_the_fit_starts(folder, tmp_path):
    d, (two, four) = folder
    place = Place(d)
    assert start.decide(Ask(ckpt_path="/some/where"), place) == Start("/some/where", start.GIVEN)
    got = start.decide(Ask(auto=True), place)
    assert (got.path, got.reason, got.branch, got.pulled_from) == (four, start.AUTO, False, None)
    assert got.message == f"lightning_ckpt: resume='auto': resuming from {four}"
    # a branch point by name, by path; a missing one says which option named it
    for name in ("step=000002", two):
        got = start.decide(Ask(resume_from=name), place)
        assert (got.path, got.reason, got.branch) == (two, start.BRANCH, True)
        assert got.message == f"lightning_ckpt: starting run (main) from {two} (resume_from)"
    with pytest.raises(CheckpointNotFoundError, match=r"resume_from='step=000009'"):
        start.decide(Ask(resume_from="step=000009"), place)
    # a fresh start into the run's own folder is refused; allowed with allow_existing, or for another run
    with pytest.raises(FolderNotEmptyError, match=r"already holds 2 checkpoint\(s\) \(newest: step=000004, step 4\)"):
        start.decide(Ask(), place)
    assert start.decide(Ask(allow_existing=True), place) == Start()
    assert start.decide(Ask(), Place(d, run_name="other")) == Start()
    # resume="auto" with nothing anywhere: fresh, and says so
    empty = str(tmp_path / "empty")
    got = start.decide(Ask(auto=True), Place(empty))
    assert (got.path, got.reason) == (None, start.FRESH) and "no checkpoint in" in got.message
    assert not os.path.exists(empty)  # deciding creates nothing


def test_ray_reference_wins_over_the_folder_and_another_runs_is_a_branch(folder, tmp_path):
    d, (two, four) = folder
    m = read_checkpoint_manifest(two)
    ref = {"path": two, "name": "step=000002", "step": 2, DIGEST: m[DIGEST], "folder": d, "run_name": None,
           "lineage_run": "r1"}
    # this run's: the newest commit of the same lineage run after it (Ray was not told of step 4)
    got = start.decide(Ask(auto=True, ray=lambda: ref), Place(d))
    assert (got.path, got.reason, got.branch) == (four, start.RAY, False) and "resuming from" in got.message
    # another run's (a PBT clone): a branch of exactly that checkpoint
    got = start.decide(Ask(auto=True, ray=lambda: dict(ref, run_name="trial-b")), Place(d))
    assert (got.path, got.reason, got.branch) == (two, start.RAY, True) and "branching from" in got.message
    # Ray hands nothing: the folder decides
    assert start.decide(Ask(auto=True, ray=lambda: None), Place(d)).path == four
    # a symbolic link to the folder is the same folder
    link = str(tmp_path / "link")
    os.symlink(d, link)
    assert start.decide(Ask(auto=True, ray=lambda: dict(ref, folder=link)), Place(d)).branch is False


def test_a_corrupt_newest_checkpoint_gives_the_previous_one(tmp_path):
    d = tmp_path / "ckpts"
    two, four = _write(d, [2, 4])
    _corrupt(four)
    with pytest.warns(UserWarning):  # latest_checkpoint says which one it skipped
        assert start.decide(Ask(auto=True), Place(str(d))).path == two
    warned: list[str] = []
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint"):
        assert start.newest([Place(str(d))], warn=warned.append) == Start(two, start.LAST)
    assert not warned  # a checkpoint was found: nothing to warn about


def test_last_takes_the_newest_among_folders_and_warns_when_there_is_none(folder, tmp_path):
    d, (_, four) = folder
    other = tmp_path / "other"
    _write(other, [3])
    warned: list[str] = []
    assert start.newest([Place(str(other)), Place(d)], warn=warned.append) == Start(four, start.LAST)
    assert start.newest([Place(str(tmp_path / "none"))], warn=warned.append) == Start()
    assert len(warned) == 1 and "ckpt_path='last': no committed checkpoint in" in warned[0]


def test_best_ranks_by_the_rule_skips_a_corrupt_best_and_refuses_when_none_is_tagged(tmp_path):
    d = tmp_path / "ckpts"
    two, four, six = _write(d, [2, 4, 6], best=[2, 4])
    warned: list[str] = []
    assert start.best([(Place(str(d)), None, None)], warn=warned.append) == Start(two, start.BEST)
    assert start.best([(Place(str(d)), "loss", "max")], warn=warned.append).path == four  # the caller's own rule
    _corrupt(two)
    assert start.best([(Place(str(d)), None, None)], warn=warned.append).path == four
    assert len(warned) == 1 and "skipping corrupt" in warned[0]
    plain = tmp_path / "plain"
    _write(plain, [2])
    with pytest.raises(CheckpointNotFoundError, match=r"ckpt_path='best': no checkpoint tagged best in .*plain"):
        start.best([(Place(str(plain)), None, None)])


def test_node_local_folders_resume_from_the_newest_checkpoint_every_folder_holds(folder):
    d, (two, _) = folder
    answers = iter([["step=000002"], []])  # the other node's folder: step 2 only; then nothing it found corrupt

    def gather(obj):
        return [obj, next(answers)]

    got = start.decide(Ask(auto=True), Place(d, node_local=True, gather=gather))
    assert got.path == two
    # a rank other than 0 gets rank 0's answer: a checkpoint of a node-local folder as a name in its own folder
    sent = []

    def broadcast(obj):
        sent.append(obj)
        return ((("step=000002", True, None), None))

    got = start.decide(Ask(auto=True), Place("/elsewhere/ckpts", node_local=True, commits_here=False,
                                             gather=lambda obj: [None, None]), rank_zero=False, broadcast=broadcast)
    assert got.path == os.path.join("/elsewhere/ckpts", "step=000002") and sent == [(None, None)]
    # rank 0's error is raised on every rank, as the same class
    with pytest.raises(StorageUnavailableError, match="did not answer"):
        start.decide(Ask(auto=True), Place(d), rank_zero=False,
                     broadcast=lambda obj: (None, ("StorageUnavailableError", "s3 did not answer")))


@pytest.fixture
def down_s3(monkeypatch, tmp_path):
    """An S3 endpoint that refuses every connection (a closed port), with short timeouts and one attempt."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                 "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                 "LIGHTNING_CKPT_CACHE": str(tmp_path / "cache"), "LIGHTNING_CKPT_S3_CONNECT_TIMEOUT": "0.2",
                 "LIGHTNING_CKPT_S3_READ_TIMEOUT": "0.2", "LIGHTNING_CKPT_S3_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(k, v)
    return "s3://bucket/run"


def test_an_s3_location_that_is_down_is_an_error_not_a_fresh_start_nor_an_older_checkpoint(down_s3, folder, tmp_path):
    nothing = str(tmp_path / "nothing-local")
    with pytest.raises(StorageUnavailableError):
        resume_path(nothing, down_s3)
    with pytest.raises(StorageUnavailableError):  # the error keeps its class through the decision
        start.decide(Ask(auto=True), Place(nothing, backups=(down_s3,)))
    with pytest.raises(StorageUnavailableError, match=r"resume='auto' cannot read s3://bucket/run"):
        start.decide(Ask(auto=True), Place(down_s3, dirpath=nothing, staged_for=down_s3))
    # with a local checkpoint that one is used, and the failure is named
    d, (_, four) = folder
    with pytest.warns(UserWarning, match="cannot read backup location s3://bucket/run"):
        assert start.decide(Ask(auto=True), Place(d, backups=(down_s3,))).path == four
    # a staged folder whose upload location is down: the staged checkpoint
    assert start.decide(Ask(auto=True), Place(down_s3, dirpath=d, staged_for=down_s3)).path == four
    assert issubclass(StorageUnavailableError, CheckpointError)
