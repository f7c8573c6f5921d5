"""A hostile bucket (the fuzzer reaching S3): the objects of committed checkpoints tampered with, replaced by larger
objects or deleted, extra keys planted, a listing past 1,000 keys, a hostile ``latest.json``, random byte-level
damage (hypothesis: ``LC_S3_FUZZ_EXAMPLES``, default 8), and the server killed in the middle of a download; each run
through the S3 readers (ls, latest, verify, load, pull).

Every reader must give the right data or a ``CheckpointError``, never download more than the manifests allow (bytes
read from response bodies are counted), and never lose the earlier good checkpoint (on S3, and the copy pulled into a
local folder before). ``test_s3_locations.py`` covers hostile manifests (escapes, pickles, newer formats) on S3;
``test_hostile_fuzz.py`` the local readers.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import threading
import warnings

import itertools

import boto3
import pytest
import torch
from botocore.config import Config
from botocore.response import StreamingBody
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_ckpt import (CheckpointError, CheckpointWriter, StorageUnavailableError, latest_checkpoint,
                            list_checkpoints, load_checkpoint, verify_checkpoint)
from lightning_ckpt.cli import main
from lightning_ckpt.format import manifest as mf
from lightning_ckpt.store.s3 import S3Store
from lightning_ckpt.folder.transfer import pull_checkpoint, push_checkpoint

BUCKET = "hostile"
GOOD, VICTIM = "step=000003", "step=000007"
JUNK = 8 << 20  # what a "larger" object adds: far more than the whole checkpoint


def _save(folder, step: int, head_numel: int = 256) -> str:
    """A checkpoint with its own pack (a frozen tensor) and a trained head."""
    torch.manual_seed(step)
    w = CheckpointWriter(str(folder), async_save=False)
    try:
        state = {"state_dict": {"frozen": torch.randn(32, 32), "head": torch.randn(head_numel)}, "global_step": step,
                 "callbacks": {"note": {"step": step}}}
        return w.save(state, step=step, stable=["state_dict/frozen"]).result().path
    finally:
        w.close()


# ------------------------------------------------------------------------------ counting what comes from S3
class Counted:
    """Bytes read from S3 response bodies, by this process (every download and GET goes through StreamingBody)."""

    def __init__(self) -> None:
        self.n = 0
        self.lock = threading.Lock()

    def add(self, k: int) -> None:
        with self.lock:
            self.n += k


@pytest.fixture
def counted(monkeypatch) -> Counted:
    c = Counted()
    real = StreamingBody.read

    def read(self, amt=None):
        out = real(self, amt)
        c.add(len(out))
        return out

    monkeypatch.setattr(StreamingBody, "read", read)
    return c


def _call(what: str, counted: Counted, bound: int, fn, *args, **kwargs):
    """One reader: its result or the CheckpointError it raised (anything else fails), within the byte bound."""
    counted.n = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = fn(*args, **kwargs)
        except CheckpointError as e:
            out = e
        except BaseException as e:  # noqa: BLE001
            pytest.fail(f"{what} raised {type(e).__name__}: {e} (expected a CheckpointError subclass)")
    assert counted.n <= bound, f"{what} read {counted.n} bytes from S3; the manifests allow {bound}"
    return out


# ------------------------------------------------------------------------------------------------ the world
@pytest.fixture(scope="module")
def world(s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    good, victim = _save(root / "a", 3), _save(root / "b", 7)
    uri = s3.uri("pristine")
    push_checkpoint(good, uri)
    push_checkpoint(victim, uri)
    m = json.loads(open(os.path.join(victim, mf.MANIFEST), "rb").read())
    sizes = sum(os.path.getsize(os.path.join(d, f)) for d in (good, victim) for f in os.listdir(d))
    sizes += sum(int(e["size"]) for e in m["packs"].values()) * 2  # both packs (of about the same size)
    objects = [o["Key"] for o in S3Store(uri).list_objects()]
    expected = load_checkpoint(victim)
    # a reader may fetch a checkpoint twice (a corrupt cached copy is fetched again once)
    return {"uri": uri, "objects": objects, "victim_manifest": m, "bound": 2 * sizes + (64 << 10),
            "expected": expected, "good": good}


def _clone(s3, world, prefix: str) -> str:
    client, src = s3.client(), world["uri"][len(f"s3://{BUCKET}/"):]
    with cf.ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda k: client.copy_object(Bucket=BUCKET, Key=prefix + k[len(src):],
                                                 CopySource={"Bucket": BUCKET, "Key": k}), world["objects"]))
    return s3.uri(prefix)


def _mutate(s3, world, prefix: str, kind: str) -> None:
    client = s3.client()
    (pack,) = world["victim_manifest"]["packs"]
    target, _, how = kind.partition("-")
    key = {"shard": f"{prefix}/{VICTIM}/model-rank00000.safetensors", "pack": f"{prefix}/{mf.BLOBS}/{pack}",
           "state": f"{prefix}/{VICTIM}/state-rank00000.json", "manifest": f"{prefix}/{VICTIM}/{mf.MANIFEST}",
           "latest": f"{prefix}/{mf.LATEST}"}.get(target)

    def put(k: str, body: bytes) -> None:
        client.put_object(Bucket=BUCKET, Key=k, Body=body)

    body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read() if key else b""
    if how == "flipped":
        b = bytearray(body)
        b[len(b) // 2] ^= 0x10
        put(key, bytes(b))
    elif how == "larger":  # the bytes the manifest expects, then far more
        put(key, body + b"\0" * JUNK)
    elif how == "deleted":
        client.delete_object(Bucket=BUCKET, Key=key)
    elif kind == "latest-hostile":
        put(key, json.dumps({"name": "../../secret", "step": 99}).encode())
    elif kind == "extra-keys":  # a folder without manifest, debris in a checkpoint, foreign keys in the store, and
        # 1,001 keys listed before the checkpoints (their manifests are on the listing's second page)
        for k in (f"{VICTIM}/evil.bin", f"{VICTIM}/sub/model-rank00000.safetensors", "step=000009/model.bin",
                  f"{mf.BLOBS}/pack-0badf00d-1-rank00000.safetensors", f"{mf.BLOBS}/notes.txt"):
            put(f"{prefix}/{k}", b"junk" * 100)
        many = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                            region_name="us-east-1", config=Config(max_pool_connections=64))
        with cf.ThreadPoolExecutor(32) as ex:
            list(ex.map(lambda i: many.put_object(Bucket=BUCKET, Key=f"{prefix}/0-junk/{i:04d}", Body=b""),
                        range(1001)))
    else:
        raise AssertionError(kind)


# (flipped, truncated and deleted shards: test_s3_heal.py, test_s3_locations.py, test_s3_push_pull.py)
DAMAGED = ["shard-larger", "pack-flipped", "pack-larger", "pack-deleted", "state-larger"]
INTACT = ["extra-keys", "latest-hostile"]


@pytest.mark.parametrize("kind", DAMAGED + INTACT + ["manifest-deleted"])
def test_a_hostile_bucket_through_every_reader(s3, world, tmp_path, monkeypatch, counted, kind):
    monkeypatch.setenv("LIGHTNING_CKPT_CACHE", str(tmp_path / "cache"))
    prefix = f"case-{kind}"
    uri = _clone(s3, world, prefix)
    dest = str(tmp_path / "local")
    pull_checkpoint(f"{uri}/{GOOD}", dest)  # the earlier good checkpoint, pulled before the bucket turned
    _mutate(s3, world, prefix, kind)
    bound, victim = world["bound"], f"{uri}/{VICTIM}"
    damaged, listed = kind in DAMAGED, kind != "manifest-deleted"

    got = _call("list_checkpoints", counted, bound, list_checkpoints, uri)
    assert not isinstance(got, CheckpointError), got
    assert [c.name for c in got] == ([GOOD, VICTIM] if listed else [GOOD])
    assert _call("lightning-ckpt ls", counted, bound, main, ["ls", uri]) == 0
    got = _call("latest_checkpoint", counted, bound, latest_checkpoint, uri)
    assert got == (victim if listed and not damaged else f"{uri}/{GOOD}"), got
    got = _call("verify_checkpoint", counted, bound, verify_checkpoint, victim)
    assert isinstance(got, CheckpointError) == (damaged or not listed), got
    got = _call("load_checkpoint", counted, bound, load_checkpoint, victim)
    if isinstance(got, CheckpointError):
        assert damaged or not listed, got
    else:
        for k, t in world["expected"]["state_dict"].items():
            assert torch.equal(got["state_dict"][k], t), f"load_checkpoint returned wrong data for {k}"
    for src in (victim, uri):  # by name, and the run folder (its latest.json)
        got = _call(f"pull_checkpoint({src})", counted, bound, pull_checkpoint, src, dest)
        if isinstance(got, CheckpointError):
            assert damaged or not listed or kind == "latest-hostile", got
        else:
            assert got == os.path.join(dest, VICTIM)
            assert torch.equal(load_checkpoint(got)["state_dict"]["head"], world["expected"]["state_dict"]["head"])
    # the earlier good checkpoint is never lost: on S3, and the local copy; nothing partial is left
    verify_checkpoint(f"{uri}/{GOOD}")
    verify_checkpoint(os.path.join(dest, GOOD))
    assert sorted(e for e in os.listdir(dest) if not e.startswith((".lock", mf.BLOBS))) == (
        [GOOD] if damaged or not listed else [GOOD, VICTIM])


FUZZ = settings(max_examples=int(os.environ.get("LC_S3_FUZZ_EXAMPLES", "8")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
_CASE = itertools.count()


@FUZZ
@given(target=st.sampled_from(["model-rank00000.safetensors", "state-rank00000.json", mf.MANIFEST, "pack"]),
       op=st.sampled_from(["flip", "truncate", "extend", "prepend"]), where=st.floats(0, 1), n=st.integers(1, 1 << 16))
def test_fuzzed_objects_through_the_readers(s3, world, tmp_path, counted, target, op, where, n):
    """Any object of the newest checkpoint with a byte flipped, cut, or bytes added before or after: latest falls back
    to the good one, verify and load refuse or give the right data, within the byte bound."""
    prefix = f"fuzz-{next(_CASE)}"
    uri = _clone(s3, world, prefix)
    client = s3.client()
    (pack,) = world["victim_manifest"]["packs"]
    key = f"{prefix}/{mf.BLOBS}/{pack}" if target == "pack" else f"{prefix}/{VICTIM}/{target}"
    b = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    at = min(len(b) - 1, int(where * len(b)))
    if op == "flip":
        b[at] ^= 1 << (n % 8)
    body = {"flip": bytes(b), "truncate": bytes(b[:at]), "extend": bytes(b) + os.urandom(n),
            "prepend": os.urandom(n) + bytes(b)}[op]
    client.put_object(Bucket=BUCKET, Key=key, Body=body)
    saved = os.environ.get("LIGHTNING_CKPT_CACHE")
    os.environ["LIGHTNING_CKPT_CACHE"] = str(tmp_path / prefix)  # nothing cached by an earlier example
    try:
        bound, victim = world["bound"], f"{uri}/{VICTIM}"
        verified = _call("verify_checkpoint", counted, bound, verify_checkpoint, victim)
        got = _call("load_checkpoint", counted, bound, load_checkpoint, victim)
        if not isinstance(got, CheckpointError):
            for k, t in world["expected"]["state_dict"].items():
                assert torch.equal(got["state_dict"][k], t), f"load_checkpoint returned wrong data for {k}"
        latest = _call("latest_checkpoint", counted, bound, latest_checkpoint, uri)
        assert latest == (f"{uri}/{GOOD}" if isinstance(verified, CheckpointError) else victim), latest
    finally:
        if saved is None:
            del os.environ["LIGHTNING_CKPT_CACHE"]
        else:
            os.environ["LIGHTNING_CKPT_CACHE"] = saved


@pytest.mark.slow
def test_the_server_killed_in_the_middle_of_a_download(own_s3, tmp_path, monkeypatch):
    """The server dies while the newest checkpoint's largest object is being downloaded: every reader gives
    StorageUnavailableError within the timeouts (never an older checkpoint, never "no checkpoint": that would make
    a resume start over), nothing partial enters the cache, and the local copy of an earlier checkpoint stays."""
    monkeypatch.setenv("LIGHTNING_CKPT_CACHE", str(tmp_path / "cache"))
    uri = f"s3://{BUCKET}/killed"
    push_checkpoint(_save(tmp_path / "a", 3), uri)
    push_checkpoint(_save(tmp_path / "b", 7, head_numel=4 << 20), uri)  # a 16 MiB shard
    dest = str(tmp_path / "local")
    pull_checkpoint(f"{uri}/{GOOD}", dest)
    # short timeouts only from here: a freshly started server may take longer than 0.5 s to answer the setup's
    # first uploads (it allocates its volumes then)
    for k, v in {"LIGHTNING_CKPT_S3_CONNECT_TIMEOUT": "0.5", "LIGHTNING_CKPT_S3_READ_TIMEOUT": "0.5",
                 "LIGHTNING_CKPT_S3_MAX_ATTEMPTS": "2"}.items():
        monkeypatch.setenv(k, v)
    real = S3Store.download

    def download(store, key, path, *args):  # (..., size, progress): the last is the progress callback
        progress = args[-1] if args else None

        def killing(n):
            if own_s3.proc is not None:
                own_s3.stop()  # SIGKILL, after the first MiB arrived
            if progress is not None:
                progress(n)

        big = key.endswith(f"{VICTIM}/model-rank00000.safetensors")
        return real(store, key, path, *args[:-1], killing if big else progress)

    monkeypatch.setattr(S3Store, "download", download)
    with pytest.raises(StorageUnavailableError):
        latest_checkpoint(uri)
    assert own_s3.proc is None, "the server was not killed in the middle of a download"
    monkeypatch.setenv("LIGHTNING_CKPT_S3_MAX_ATTEMPTS", "1")  # the server is gone: no need to wait for retries
    for fn, args in ((list_checkpoints, (uri,)), (pull_checkpoint, (f"{uri}/{VICTIM}", dest))):
        with pytest.raises(StorageUnavailableError):
            fn(*args)
    cached = [f for _, _, files in os.walk(tmp_path / "cache") for f in files if f.endswith(".safetensors")]
    assert not any(f.startswith("model-") for f in cached), cached  # the cut-off download never entered the cache
    verify_checkpoint(os.path.join(dest, GOOD))
    assert sorted(e for e in os.listdir(dest) if not e.startswith((".lock", mf.BLOBS))) == [GOOD]
