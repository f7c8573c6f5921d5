"""Trust on S3 (issue 19): an endpoint that never answers gives one clear error within the timeouts the user set, and
a pack collection in one process never deletes a pack that a push in another process found there and is committing
a reference to. The hostile-bucket campaign (objects tampered, replaced by larger ones, ...) is in
``test_s3_hostile.py``."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time

import pytest
import torch

from lightning_ckpt import CheckpointWriter, StorageUnavailableError, list_checkpoints, resume_path, verify_checkpoint
from lightning_ckpt.cli import main
from lightning_ckpt.format import manifest as mf
from lightning_ckpt.policy.retention import RetentionRules
from lightning_ckpt.store.s3 import S3Store, S3Transaction
from lightning_ckpt.tools.prune import prune
from lightning_ckpt.folder.transfer import push_checkpoint

from support import start_python

BUCKET = "trust"
pytestmark = pytest.mark.usefixtures("forkserver")


# ------------------------------------------------------------------------------------ an endpoint that never answers
@contextlib.contextmanager
def silent_endpoint():
    """A TCP server on 127.0.0.1 that accepts every connection and never sends a byte."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        srv.close()


CONNECT_S, READ_S, ATTEMPTS = 0.2, 0.2, 2
# generous: 2 attempts x (0.2 s + 0.2 s) plus botocore's backoff (< 1 s) plus a busy machine; not a benchmark
WITHIN_S = 20.0


@pytest.fixture
def dead_s3(monkeypatch, tmp_path):
    with silent_endpoint() as endpoint:
        for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                     "AWS_DEFAULT_REGION": "us-east-1", "LIGHTNING_CKPT_CACHE": str(tmp_path / "cache"),
                     "LIGHTNING_CKPT_S3_CONNECT_TIMEOUT": str(CONNECT_S), "LIGHTNING_CKPT_S3_READ_TIMEOUT": str(READ_S),
                     "LIGHTNING_CKPT_S3_MAX_ATTEMPTS": str(ATTEMPTS)}.items():
            monkeypatch.setenv(k, v)
        yield endpoint


def _fails_fast(fn, *args, **kwargs) -> StorageUnavailableError:
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailableError) as info:
        fn(*args, **kwargs)
    took = time.monotonic() - t0
    assert took < WITHIN_S, f"{fn.__name__} took {took:.1f} s against an endpoint that never answers"
    return info.value


def test_an_endpoint_that_never_answers_gives_one_clear_error_within_the_timeouts(dead_s3, tmp_path, capsys):
    uri = "s3://bucket/run"
    e = _fails_fast(list_checkpoints, uri)
    assert dead_s3 in str(e) and "LIGHTNING_CKPT_S3_READ_TIMEOUT" in str(e) and "\n" not in str(e)
    # resume never takes "unreachable" for "no checkpoint" (a fresh start would drop the run)
    _fails_fast(resume_path, str(tmp_path / "nothing-local"), [uri])
    t0 = time.monotonic()
    assert main(["ls", uri]) == 1
    assert time.monotonic() - t0 < WITHIN_S
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did not answer" in err, err


def test_s3_timeout_settings_are_checked(monkeypatch, capsys):
    monkeypatch.setenv("LIGHTNING_CKPT_S3_READ_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="LIGHTNING_CKPT_S3_READ_TIMEOUT='soon'"):
        list_checkpoints("s3://bucket/run")
    monkeypatch.setenv("LIGHTNING_CKPT_S3_READ_TIMEOUT", "5")
    monkeypatch.setenv("LIGHTNING_CKPT_S3_MAX_ATTEMPTS", "0")
    assert main(["ls", "s3://bucket/run"]) == 2
    assert "LIGHTNING_CKPT_S3_MAX_ATTEMPTS" in capsys.readouterr().err


# ------------------------------------------------------------------- a collection elsewhere vs a push that reuses
COLLECTOR = r"""
import json, sys
from lightning_ckpt.store.s3 import S3Store

real, pause = S3Store.manifests, [False]

def manifests(self):  # the collection's decision is made from these: optionally wait here for the other process
    out = real(self)
    if pause[0]:
        print("decided", flush=True)
        sys.stdin.readline()
    return out

S3Store.manifests = manifests
for line in sys.stdin:
    cmd = json.loads(line)
    pause[0] = cmd["pause"]
    removed, _ = S3Store(cmd["uri"]).collect_packs(mine=set(cmd["mine"]))
    print(json.dumps(removed), flush=True)
"""


class Collector:
    """Another process (a run's backup uploader) that uploaded a pack itself and collects unreferenced packs."""

    def __init__(self) -> None:
        self.p = start_python(["-c", COLLECTOR], stdin=-1, stdout=-1, text=True)

    def collect(self, uri: str, mine: list[str], pause: bool = False) -> None:
        self.p.stdin.write(json.dumps({"uri": uri, "mine": mine, "pause": pause}) + "\n")
        self.p.stdin.flush()
        if pause:
            assert self.p.stdout.readline().strip() == "decided"

    def go(self) -> None:
        self.p.stdin.write("\n")
        self.p.stdin.flush()

    def removed(self) -> list[str]:
        line = self.p.stdout.readline()
        assert line, "the collector process died"
        return json.loads(line)

    def close(self) -> None:
        self.p.stdin.close()
        assert self.p.wait(30) == 0


def _saves(folder) -> tuple[list[str], str]:
    """Three saves sharing one pack (a frozen tensor); returns the paths and the pack's name."""
    torch.manual_seed(0)
    frozen, head = torch.randn(64, 64), torch.zeros(4, 64)
    w = CheckpointWriter(str(folder), async_save=False)
    try:
        paths = [w.save({"state_dict": {"frozen": frozen, "head": head + s}, "global_step": s}, step=s,
                        stable=["state_dict/frozen"]).result().path for s in (1, 2, 3)]
    finally:
        w.close()
    (pack,) = os.listdir(os.path.join(str(folder), mf.BLOBS))
    return paths, pack


def _orphaned(uri: str, first: str) -> S3Store:
    """The pack of ``first`` pushed to ``uri``, then its checkpoint deleted there (retention): nothing references it."""
    push_checkpoint(first, uri)
    store = S3Store(uri)
    store.delete(os.path.basename(first))
    return store


def test_a_collection_elsewhere_never_deletes_a_pack_a_push_found_there(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_CKPT_CACHE", str(tmp_path / "cache"))
    (first, second, third), pack = _saves(tmp_path / "run")
    other = Collector()
    try:
        # 1. the other process collects between this push's decision (the pack is there: not sent) and its commit
        uri = s3.uri("between")
        store = _orphaned(uri, first)
        real_commit = S3Transaction.commit

        def commit(tx, *args, **kwargs):
            other.collect(uri, [pack])
            collected.extend(other.removed())
            return real_commit(tx, *args, **kwargs)

        collected: list[str] = []
        monkeypatch.setattr(S3Transaction, "commit", commit)
        assert push_checkpoint(second, uri).packs == ()  # found there, not uploaded
        monkeypatch.setattr(S3Transaction, "commit", real_commit)
        assert collected == [], "the collection deleted a pack a push was committing a reference to"
        verify_checkpoint(f"{uri}/step=000002")

        # 2. the other process decides (lists, reads the manifests) before this push, and deletes after its commit
        uri = s3.uri("around")
        store = _orphaned(uri, first)
        other.collect(uri, [pack], pause=True)
        assert push_checkpoint(second, uri).packs == ()
        other.go()
        assert other.removed() == [], "the collection deleted a pack a push committed a reference to meanwhile"
        verify_checkpoint(f"{uri}/step=000002")
        # a dry-run prune lists no pack to remove: the reuse marks are not packs
        assert prune(uri, RetentionRules(keep_last=1), dry_run=True).packs == []

        # once no manifest references it any more, the pack is collected (after the grace: here, at once)
        store.delete("step=000002")
        assert store.collect_packs(grace_s=0) == ([pack], os.path.getsize(os.path.join(tmp_path, "run", mf.BLOBS, pack)))
        assert store.list_objects(mf.BLOBS) == []  # its reuse marks went with it
    finally:
        other.close()


def test_a_pack_deleted_while_a_push_commits_is_uploaded_again(s3, tmp_path, monkeypatch):
    """A collection's delete already on its way when the push marked the pack (the last window): the push checks
    after its commit and puts the pack back."""
    monkeypatch.setenv("LIGHTNING_CKPT_CACHE", str(tmp_path / "cache"))
    (first, second, _), pack = _saves(tmp_path / "run")
    uri = s3.uri("late-delete")
    store = _orphaned(uri, first)
    real_commit = S3Transaction.commit

    def commit(tx, *args, **kwargs):
        out = real_commit(tx, *args, **kwargs)
        store.delete_keys([store.key(mf.BLOBS, pack)])
        return out

    with monkeypatch.context() as mp:
        mp.setattr(S3Transaction, "commit", commit)
        push_checkpoint(second, uri)
    assert pack in {o["Key"].rsplit("/", 1)[-1] for o in store.list_objects(mf.BLOBS)}
    verify_checkpoint(f"{uri}/step=000002")
