"""Folders of many checkpoints (issue 22): ``latest_checkpoint`` finds the newest one through ``latest.json`` and its
index, reading O(1) manifests (O(1) requests on S3), and falls back to reading every manifest whenever the hint does
not add up; a run's own folder is listed from memory, so the callbacks' work per save does not grow with it. No
timing asserts: the tests count manifest reads and S3 requests."""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import shutil
import warnings

import pytest
import torch

from lightning_ckpt import CheckpointWriter, latest_checkpoint, list_checkpoints, resume_path
from lightning_ckpt.callbacks import BestMetricCheckpoint, PeriodicCheckpoint, RetentionPolicy
from lightning_ckpt.demo import DemoModel
from lightning_ckpt.format import manifest as mf
from lightning_ckpt.store import LocalStore, hint
from lightning_ckpt.store.s3 import S3Store, client
from lightning_ckpt.folder.transfer import push_checkpoint

from support import data, trainer
from support.clones import clone, manifest_for

BUCKET = "scale"
N = 60  # checkpoints in a folder: enough that "every manifest" and "O(1) manifests" cannot be confused


def _one(folder, step=1) -> str:
    w = CheckpointWriter(str(folder), async_save=False)
    try:
        torch.manual_seed(step)
        return w.save({"state_dict": {"w": torch.randn(8, 8)}, "global_step": step}, step=step).result().path
    finally:
        w.close()


def _folder(tmp_path, n=N):
    """``n`` committed checkpoints (steps 1..n) and a ``latest.json`` whose index accounts for all of them."""
    d = tmp_path / "ckpts"
    first = _one(tmp_path / "seed")
    clone(first, str(d), range(1, n + 1))
    LocalStore(str(d)).publish_latest({"name": f"step={n:06d}", "step": n, "epoch": 0})
    return d


@pytest.fixture
def reads(monkeypatch):
    """How many manifests ``LocalStore.read_manifest`` reads."""
    count = {"n": 0}
    real = LocalStore.read_manifest

    def counted(self, name):
        count["n"] += 1
        return real(self, name)

    monkeypatch.setattr(LocalStore, "read_manifest", counted)
    return count


def test_latest_checkpoint_reads_o1_manifests_with_a_good_hint(tmp_path, reads):
    d = _folder(tmp_path)
    reads["n"] = 0
    assert latest_checkpoint(str(d)) == str(d / f"step={N:06d}")
    assert reads["n"] <= 2  # the hint's entry (and the verification's own read)
    reads["n"] = 0
    assert latest_checkpoint(str(d), run_name=None, verify=False) == str(d / f"step={N:06d}")
    assert reads["n"] == 1
    reads["n"] = 0
    assert len(list_checkpoints(str(d))) == N and reads["n"] == N  # the listing itself still reads them all


def _tamper_index(d, **change):
    doc = json.loads((d / "latest.json").read_text())
    doc["index"]["runs"][0].update(change)
    (d / "latest.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("case", ["missing", "garbage", "names-older", "wrong-sha", "deleted", "replaced",
                                  "corrupt-newest", "unpublished-newer", "wrong-version"])
def test_latest_checkpoint_falls_back_when_the_hint_does_not_add_up(tmp_path, reads, case):
    d = _folder(tmp_path)
    newest = N
    if case == "missing":
        os.remove(d / "latest.json")
    elif case == "garbage":
        (d / "latest.json").write_text('{"name": "step=000001", "index": {"v": 1, "runs": 7}}')
    elif case == "names-older":  # a hand-edited hint naming an older checkpoint as the run's newest
        _tamper_index(d, name="step=000003", step=3)
    elif case == "wrong-sha":
        _tamper_index(d, sha="0" * 64)
    elif case == "wrong-version":
        _tamper_index(d, version="12345")
    elif case == "deleted":  # the hint's checkpoint is gone (pruned by hand)
        shutil.rmtree(d / f"step={N:06d}")
        newest = N - 1
    elif case == "replaced":  # same name, another checkpoint (a newer step written under it)
        shutil.rmtree(d / f"step={N:06d}")
        clone(str(d / "step=000001"), str(d), [N + 5], name=f"step={N:06d}")
        newest = N + 5
    elif case == "corrupt-newest":
        data_file = next(f for f in os.listdir(d / f"step={N:06d}") if f.startswith("model-"))
        path = d / f"step={N:06d}" / data_file
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0xFF
        os.remove(path)  # a hard link of the other copies: replace it, do not write through it
        path.write_bytes(bytes(raw))
        newest = N - 1
    elif case == "unpublished-newer":  # committed by a writer that died before it replaced latest.json
        clone(str(d / "step=000001"), str(d), [N + 7])
        newest = N + 7
    reads["n"] = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = latest_checkpoint(str(d))
    name = f"step={newest:06d}" if case != "replaced" else f"step={N:06d}"
    assert got == str(d / name)
    assert mf.parse_manifest((d / name / "manifest.json").read_bytes(), "x")["step"] == newest
    if case == "unpublished-newer":
        assert reads["n"] <= 3  # found as an entry the index does not account for, without a full listing
    elif case == "corrupt-newest":
        assert any("skipping corrupt" in str(w.message) for w in caught)
        assert reads["n"] >= N - 1
    else:
        assert reads["n"] >= N - 1  # listed and read in full


def test_runs_sharing_a_folder_each_find_their_own_newest_through_the_hint(tmp_path, reads):
    d = tmp_path / "ckpts"
    first = _one(tmp_path / "seed")
    clone(first, str(d), range(1, 31), run_name="a")
    clone(first, str(d), range(31, 41), name="b-{step:06d}", run_name="b")
    clone(first, str(d), range(5, 9), name="main-{step:06d}")
    LocalStore(str(d)).publish_latest({"name": "b-000040", "step": 40, "epoch": 0})  # another run published last
    clone(first, str(d), [35], name="a-late-{step:06d}", run_name="a")  # committed by run a, never published
    reads["n"] = 0
    assert latest_checkpoint(str(d), run_name="a") == str(d / "a-late-000035")
    assert latest_checkpoint(str(d), run_name="b") == str(d / "b-000040")
    assert latest_checkpoint(str(d), run_name=None) == str(d / "main-000008")
    assert latest_checkpoint(str(d), run_name="nobody") is None
    assert latest_checkpoint(str(d)) == str(d / "b-000040")
    assert reads["n"] <= 5 * 3  # each call: its runs' entries, the one unpublished checkpoint, the verification
    # the hint names run b's checkpoint for run a: it is not believed
    doc = json.loads((d / "latest.json").read_text())
    a = next(e for e in doc["index"]["runs"] if e["run_name"] == "a")
    b = next(e for e in doc["index"]["runs"] if e["run_name"] == "b")
    a.update({k: b[k] for k in ("name", "version", "step", "created", "sha")})
    (d / "latest.json").write_text(json.dumps(doc))
    assert latest_checkpoint(str(d), run_name="a") == str(d / "a-late-000035")


def test_the_index_follows_commits_and_deletions_of_a_writer(tmp_path):
    d = tmp_path / "w"
    w = CheckpointWriter(str(d), async_save=False)
    try:
        for step in range(1, 6):
            w.save({"state_dict": {"w": torch.randn(4)}, "global_step": step}, step=step).result()
        LocalStore(str(d)).delete("step=000005")  # the newest goes (by hand): the index no longer adds up
        assert latest_checkpoint(str(d)) == str(d / "step=000004")
        w.save({"state_dict": {"w": torch.randn(4)}, "global_step": 6}, step=6).result()
    finally:
        w.close()
    idx = hint.Index.parse(json.loads((d / "latest.json").read_text()))
    assert idx is not None and idx.runs[None]["name"] == "step=000006"
    assert latest_checkpoint(str(d)) == str(d / "step=000006")


def test_a_writer_publishes_from_the_index_it_wrote_unless_latest_json_changed_since(tmp_path, monkeypatch):
    """Each publish starts from the index in ``latest.json``. The writer keeps the one it wrote (no parse of the file
    per save: it holds an id per checkpoint) and uses it only while the file is the one it wrote; a file replaced
    since (another writer, an older release, a hand edit) is read again."""
    d = tmp_path / "w"
    parsed = {"n": 0}
    real = hint.Index.parse

    def counted(doc):
        parsed["n"] += 1
        return real(doc)

    w = CheckpointWriter(str(d), async_save=False)
    try:
        for step in (1, 2):  # (the first publish of a process rescans the folder)
            w.save({"state_dict": {"w": torch.randn(4)}, "global_step": step}, step=step).result()
        monkeypatch.setattr(hint.Index, "parse", staticmethod(counted))
        w.save({"state_dict": {"w": torch.randn(4)}, "global_step": 3}, step=3).result()
        assert parsed["n"] == 0  # from the index it wrote
        # another writer's latest.json: its index accounts for an entry this writer never saw
        doc = json.loads((d / "latest.json").read_text())
        idx = real(doc)
        ghost = hint.entry_id("ghost", 7)
        idx.ids.add(ghost)
        LocalStore(str(d)).write_atomic("latest.json", json.dumps({**doc, "index": idx.to_doc()}).encode())
        w.save({"state_dict": {"w": torch.randn(4)}, "global_step": 4}, step=4).result()
        assert parsed["n"] >= 1
    finally:
        w.close()
    got = real(json.loads((d / "latest.json").read_text()))
    assert ghost in got.ids and got.runs[None]["name"] == "step=000004"  # started from the file, not the memo
    assert latest_checkpoint(str(d)) == str(d / "step=000004")


def test_callbacks_read_o1_manifests_per_save_in_a_big_folder(tmp_path, reads):
    """A fit with periodic saves, best-k and retention into a folder that already holds N checkpoints reads each
    manifest once, not N per save (the run's folder is listed from memory while it holds the lock)."""
    d = tmp_path / "ckpts"
    first = _one(tmp_path / "seed")
    clone(first, str(d), range(100_000, 100_000 + 10 * N, 10))  # an older part of the run: milestones
    LocalStore(str(d)).publish_latest({"name": f"step={100_000 + 10 * (N - 1):06d}", "step": 0, "epoch": 0})
    reads["n"] = 0
    saves = 8
    cbs = [PeriodicCheckpoint(str(d), every_n_train_steps=1, allow_existing=True),
           BestMetricCheckpoint(str(d), monitor="train_loss", every_n_train_steps=1, top_k=2),
           RetentionPolicy(str(d), keep_last=2, keep_every_n_steps=10)]
    trainer(cbs, max_steps=saves, log_every_n_steps=1).fit(DemoModel(), data())
    assert reads["n"] <= N + 3 * saves, reads["n"]  # N * 4 per save before: retention, best-k, protections
    kept = [c.step for c in list_checkpoints(str(d))]
    assert len([s for s in kept if s >= 100_000]) == N  # the milestones stay
    assert 1 <= len([s for s in kept if s < 100_000]) <= 4  # retention ran after the saves (plus the best two)


# ------------------------------------------------------------------------------------------------ S3
def _count_requests():
    calls: list[str] = []

    def before(event_name, params=None, **kwargs):
        op = event_name.rsplit(".", 1)[-1]
        calls.append(op)
        if op == "GetObject" and str((params or {}).get("Key", "")).endswith("/manifest.json"):
            calls.append("manifest")

    client().meta.events.register("before-call.s3", before)
    return calls, lambda: client().meta.events.unregister("before-call.s3", before)


@pytest.mark.slow
def test_s3_latest_checkpoint_makes_o1_requests_at_1000_checkpoints(tmp_path, s3):
    """1,000 committed checkpoints (manifests put directly; listing them takes two LIST pages), one real one pushed
    last: ``latest_checkpoint`` reads latest.json, lists once and reads one manifest, however many there are."""
    uri = s3.uri("run")
    real = _one(tmp_path / "local", step=5000)
    template = json.loads((tmp_path / "local" / "step=005000" / "manifest.json").read_bytes())
    c = s3.client()
    idx = hint.Index()
    fakes = []
    for i in range(1000):
        raw = manifest_for(template, i + 1, created=1.0 + i)
        fakes.append((f"step={i + 1:06d}", raw))
        idx.add(f"step={i + 1:06d}", hashlib.md5(raw).hexdigest(), json.loads(raw), raw)
    with cf.ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda nr: c.put_object(Bucket=BUCKET, Key=f"run/{nr[0]}/manifest.json", Body=nr[1]), fakes))
    c.put_object(Bucket=BUCKET, Key="run/latest.json",
                 Body=json.dumps({"name": fakes[-1][0], "step": 1000, "epoch": 0,
                                  "index": {**idx.to_doc(), "listed": 1000}}).encode())
    push_checkpoint(real, uri)
    calls, stop = _count_requests()
    try:
        got = latest_checkpoint(uri)
    finally:
        stop()
    assert got == f"{uri}/step=005000"
    assert calls.count("ListObjectsV2") == 2  # 1,000 manifests and the real checkpoint's files: two pages
    assert calls.count("GetObject") <= 2 + 4, calls  # latest.json, the manifest, the verification's downloads
    # (before the index: one GET per manifest, 1,001 here)
    assert len(calls) - calls.count("manifest") <= 10, calls
    # a relaunch on a new machine (empty local folder) finds and pulls it the same way: no GET per checkpoint
    calls, stop = _count_requests()
    try:
        got = resume_path(str(tmp_path / "relaunch"), uri)
    finally:
        stop()
    assert got == str(tmp_path / "relaunch" / "step=005000")
    assert calls.count("manifest") <= 3, calls
    assert len(S3Store(uri).names()) == 1001  # the listing goes past the first 1,000 keys


def test_a_locked_folder_is_listed_from_memory_and_still_sees_every_change(tmp_path, reads, monkeypatch):
    from lightning_ckpt.store.listing import Listings

    d = tmp_path / "ckpts"
    first = _one(tmp_path / "seed")
    clone(first, str(d), range(1, 21))
    monkeypatch.setattr(Listings, "RELIST_S", 3600.0)
    lock = LocalStore(str(d)).lock({"run_id": "test"})
    try:
        assert len(list_checkpoints(str(d))) == 20
        reads["n"] = 0
        for _ in range(3):
            assert len(list_checkpoints(str(d))) == 20
        assert reads["n"] == 0  # from memory
        w = CheckpointWriter(str(d), async_save=False)  # a commit and a deletion through the store of this process
        try:
            w.save({"state_dict": {"w": torch.randn(4)}, "global_step": 99}, step=99).result()
        finally:
            w.close()
        LocalStore(str(d)).delete("step=000003")
        reads["n"] = 0  # (the writer's first latest.json indexed the folder: it had no index)
        steps = [c.step for c in list_checkpoints(str(d))]
        assert steps == [s for s in range(1, 21) if s != 3] + [99] and reads["n"] == 1  # only the new one
        shutil.rmtree(d / "step=000004")  # by hand: seen at the next listing of the names
        monkeypatch.setattr(Listings, "RELIST_S", 0.0)
        assert 4 not in [c.step for c in list_checkpoints(str(d))]
    finally:
        lock.release()
    reads["n"] = 0
    assert len(list_checkpoints(str(d))) == 19 and reads["n"] == 19  # not locked: read in full, as before


def test_a_runs_newest_replaced_by_an_older_checkpoint_under_its_name_reindexes(tmp_path, reads):
    d = _folder(tmp_path, n=6)
    shutil.rmtree(d / "step=000006")
    clone(str(d / "step=000001"), str(d), [2], name="step=000006")  # committed (replace) under the newest's name
    LocalStore(str(d)).publish_latest({"name": "step=000006", "step": 2, "epoch": 0})
    idx = hint.Index.parse(json.loads((d / "latest.json").read_text()))
    assert idx.runs[None]["name"] == "step=000005"  # not the replaced entry: the folder was indexed again
    reads["n"] = 0
    assert latest_checkpoint(str(d)) == str(d / "step=000005") and reads["n"] <= 2
