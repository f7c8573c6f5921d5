"""`lightning-ckpt push | pull` against a real S3 server (SeaweedFS on loopback, started here)."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import torch

from lightning_ckpt import CheckpointCorruptError, CheckpointWriter, load_checkpoint, resume_path
from lightning_ckpt.cli import main
from lightning_ckpt.store import LocalStore
from lightning_ckpt.store.lock import FolderBusyError
from lightning_ckpt.store.s3 import S3Store
from lightning_ckpt.folder.transfer import PULL_RUN_ID, pull_checkpoint, push_checkpoint

from support import list_remote, run_python, start_python

BUCKET = "ckpts"  # the s3 fixture's bucket for this module (the session's server)


def _ckpts(tmp_path, steps=(5, 10)):
    w = CheckpointWriter(str(tmp_path / "local"), async_save=False)
    paths = []
    for s in steps:
        torch.manual_seed(s)
        paths.append(w.save({"state_dict": {"w": torch.randn(300, 300)}, "global_step": s}, step=s).result().path)
    w.close()
    return paths


def test_push_then_pull_round_trips_and_verifies(s3, tmp_path):
    a, b = _ckpts(tmp_path)
    res = push_checkpoint(a, "s3://ckpts/run1")
    assert res.uri == "s3://ckpts/run1/step=000005" and res.bytes > 300 * 300 * 4
    push_checkpoint(b, "s3://ckpts/run1")
    assert list_remote("s3://ckpts/run1") == ["step=000005", "step=000010"]
    latest = json.loads(s3.client().get_object(Bucket="ckpts", Key="run1/latest.json")["Body"].read())
    assert latest["name"] == "step=000010"
    got = pull_checkpoint("s3://ckpts/run1", str(tmp_path / "pulled"))  # the newest, by latest.json
    assert got.endswith("step=000010")
    assert torch.equal(load_checkpoint(got)["state_dict"]["w"], load_checkpoint(b)["state_dict"]["w"])
    got_a = pull_checkpoint("s3://ckpts/run1/step=000005", str(tmp_path / "pulled"))
    assert torch.equal(load_checkpoint(got_a)["state_dict"]["w"], load_checkpoint(a)["state_dict"]["w"])


def test_upload_without_manifest_is_not_a_checkpoint_and_corrupt_objects_are_refused(s3, tmp_path):
    (a,) = _ckpts(tmp_path, steps=(7,))
    client = s3.client()
    for f in os.listdir(a):  # an interrupted upload: data objects but no manifest
        if f != "manifest.json":
            client.upload_file(os.path.join(a, f), "ckpts", f"run2/step=000007/{f}")
    assert list_remote("s3://ckpts/run2") == []
    push_checkpoint(a, "s3://ckpts/run3")
    data = bytearray(open(os.path.join(a, "model-rank00000.safetensors"), "rb").read())
    data[-10] ^= 0x40
    client.put_object(Bucket="ckpts", Key="run3/step=000007/model-rank00000.safetensors", Body=bytes(data))
    with pytest.raises(CheckpointCorruptError):
        pull_checkpoint("s3://ckpts/run3/step=000007", str(tmp_path / "bad"))
    # nothing partial is left behind (the lock file the pull held stays, as after a run: it is not a save)
    assert not [e for e in os.listdir(tmp_path / "bad") if e != ".lock"], "nothing partial is left behind"


@pytest.mark.usefixtures("forkserver")
def test_cli_push_pull(s3, tmp_path, capsys):
    (a,) = _ckpts(tmp_path, steps=(3,))
    assert main(["push", a, "s3://ckpts/cli", "--quiet"]) == 0
    assert "pushed" in capsys.readouterr().out
    assert main(["pull", "s3://ckpts/cli", str(tmp_path / "p"), "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"].endswith("step=000003")
    assert main(["pull", "s3://ckpts/nothing-here", str(tmp_path / "q"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    p = run_python(["-m", "lightning_ckpt.cli", "push", a, "not-a-uri"], capture_output=True, text=True)
    assert p.returncode == 2 and "s3://bucket/prefix" in p.stderr


def test_resume_path_local_first_then_backups(s3, tmp_path):
    a, b = _ckpts(tmp_path, steps=(4, 8))
    push_checkpoint(a, "s3://ckpts/auto")
    push_checkpoint(b, "s3://ckpts/auto")
    assert resume_path(str(tmp_path / "local")) == b  # local wins
    fresh = str(tmp_path / "fresh-machine")
    got = resume_path(fresh, "s3://ckpts/auto")
    assert got == os.path.join(fresh, "step=000008")
    assert torch.equal(load_checkpoint(got)["state_dict"]["w"], load_checkpoint(b)["state_dict"]["w"])
    # the newest backup is corrupt: the previous one is used, with a warning
    data = bytearray(open(os.path.join(b, "model-rank00000.safetensors"), "rb").read())
    data[-3] ^= 1
    s3.client().put_object(Bucket="ckpts", Key="auto/step=000008/model-rank00000.safetensors", Body=bytes(data))
    with pytest.warns(UserWarning, match="step=000008"):
        got = resume_path(str(tmp_path / "another"), ["s3://ckpts/empty", "s3://ckpts/auto"])
    assert got.endswith("step=000004")
    assert resume_path(str(tmp_path / "nothing"), "s3://ckpts/empty") is None


def test_read_cache_keeps_the_newest_versions_of_a_folder(s3, tmp_path, monkeypatch):
    """Each resume from S3 caches a checkpoint; the cache keeps the LIGHTNING_CKPT_CACHE_KEEP most recently read
    versions of a folder and prunes the others once nothing has read them for an hour."""
    import time

    from lightning_ckpt.store import locate

    def fetch_checkpoint(uri: str) -> str:
        store, name = locate(uri)
        return store.local_folder(name)

    monkeypatch.setenv("LIGHTNING_CKPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LIGHTNING_CKPT_CACHE_KEEP", "2")
    paths = _ckpts(tmp_path, steps=(1, 2, 3, 4))
    for p in paths:
        push_checkpoint(p, "s3://ckpts/cached")
    first = fetch_checkpoint("s3://ckpts/cached/step=000001")
    second = fetch_checkpoint("s3://ckpts/cached/step=000002")
    third = fetch_checkpoint("s3://ckpts/cached/step=000003")
    assert all(os.path.isdir(p) for p in (first, second, third))  # all read within the hour: none pruned
    hour_ago = time.time() - 3700
    for p in (first, second, third):
        os.utime(p, (hour_ago, hour_ago))
    os.utime(second, (hour_ago + 60, hour_ago + 60))  # read after the first one
    fourth = fetch_checkpoint("s3://ckpts/cached/step=000004")
    assert not os.path.exists(first) and not os.path.exists(third) and os.path.isdir(second) and os.path.isdir(fourth)
    assert sorted(os.listdir(os.path.dirname(fourth))) == sorted(os.path.basename(p) for p in (second, fourth))
    assert load_checkpoint("s3://ckpts/cached/step=000001")["global_step"] == 1  # pruned: fetched again
    monkeypatch.setenv("LIGHTNING_CKPT_CACHE_KEEP", "-1")
    with pytest.raises(ValueError, match="LIGHTNING_CKPT_CACHE_KEEP"):
        fetch_checkpoint("s3://ckpts/cached/step=000003")


def _holding_the_lock(dest, run_id: str, then: str) -> subprocess.Popen:
    """Another process that takes ``dest``'s lock as ``run_id`` and, once it holds it, runs the statements ``then``
    (``lk``: the lock). A fork-server child (``support.start_python``): a process of its own, without the seconds
    of a cold interpreter's imports."""
    p = start_python(
        ["-c", "import sys, time; from lightning_ckpt.store import LocalStore; "
         f"lk = LocalStore(sys.argv[1]).lock({{'run_id': {run_id!r}}}); print('held', flush=True); {then}",
         str(dest)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_pull_into_a_folder_another_process_is_writing_is_refused(s3, forkserver, tmp_path):
    """A pull writes a checkpoint and packs into the folder: not while another run holds its lock (that run's
    retention and collection would race with it); the same process (a run pulling its own backup) may."""
    (a,) = _ckpts(tmp_path, steps=(3,))
    push_checkpoint(a, "s3://ckpts/busy")
    dest = tmp_path / "dest"
    holder = _holding_the_lock(dest, "trainer", "time.sleep(60)")
    try:
        with pytest.raises(FolderBusyError, match="trainer"):
            pull_checkpoint("s3://ckpts/busy", str(dest))
        assert sorted(os.listdir(dest)) == [".lock"]  # nothing written, not even a partial
    finally:
        holder.kill()
        holder.wait()
    lock = LocalStore(str(dest)).lock({"run_id": "this run"})
    try:  # this process holds it: a run pulling its own backup
        got = pull_checkpoint("s3://ckpts/busy", str(dest))
    finally:
        lock.release()
    assert torch.equal(load_checkpoint(got)["state_dict"]["w"], load_checkpoint(a)["state_dict"]["w"])
    assert LocalStore(str(dest)).lock_holder() is None  # the pull did not leave the lock taken


def test_pulls_of_one_checkpoint_by_two_processes_wait_for_each_other_and_fetch_once(s3, forkserver, tmp_path,
                                                                                     monkeypatch):
    """Every rank of a job resolving ckpt_path='last' pulls the newest backup into the same folder: the second waits
    for the first (its lock says it is a pull), then finds the checkpoint there and fetches nothing."""
    (a,) = _ckpts(tmp_path, steps=(4,))
    push_checkpoint(a, "s3://ckpts/twice")
    dest = tmp_path / "dest"
    # "another rank": holds the lock as a pull does for a moment, then pulls the same checkpoint itself
    other = _holding_the_lock(dest, PULL_RUN_ID, "time.sleep(1.0); lk.release(); "
                              "from lightning_ckpt.folder.transfer import pull_checkpoint; "
                              "pull_checkpoint('s3://ckpts/twice', sys.argv[1])")
    try:
        t0 = time.monotonic()
        got = pull_checkpoint("s3://ckpts/twice", str(dest))
        assert time.monotonic() - t0 > 0.5  # it waited for the other pull's lock, not failed
    finally:
        assert other.wait(60) == 0
    # a third pull of the same checkpoint: verified in place, nothing downloaded
    monkeypatch.setattr(S3Store, "download", lambda *a, **k: pytest.fail("downloaded a checkpoint already there"))
    assert pull_checkpoint("s3://ckpts/twice", str(dest)) == got
    assert torch.equal(load_checkpoint(got)["state_dict"]["w"], load_checkpoint(a)["state_dict"]["w"])
