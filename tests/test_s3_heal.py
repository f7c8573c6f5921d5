"""Backups that heal, against a real S3 server (SeaweedFS on loopback): a corrupt local checkpoint is skipped without
holding back the others, a re-push repairs damaged or missing objects, a corrupt download never sticks in the read
cache, and a failed pull of a newer backup falls back to the valid local checkpoint."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from lightning_ckpt import CheckpointCorruptError, CheckpointWriter, load_checkpoint, resume_path, verify_checkpoint
from lightning_ckpt.session.backups import BackupLocation, Uploader
from lightning_ckpt.folder.transfer import push_checkpoint
from seaweed import list_remote

BUCKET = "heal"  # the s3 fixture's bucket for this module (the session's server: no server of its own to start)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_CKPT_CACHE", str(tmp_path / "cache"))


def _ckpts(d, steps=(1, 2, 3)) -> list[str]:
    w = CheckpointWriter(str(d), async_save=False)
    try:
        return [w.save({"state_dict": {"w": torch.full((64, 64), float(s))}, "global_step": s}, step=s).result().path
                for s in steps]
    finally:
        w.close()


def _flip(path: str, pos: int = -1) -> None:
    b = bytearray(open(path, "rb").read())
    b[pos] ^= 0x40
    open(path, "wb").write(bytes(b))


def test_a_corrupt_local_checkpoint_is_skipped_and_the_later_ones_are_uploaded(s3, tmp_path):
    a, b, c = _ckpts(tmp_path / "run")
    _flip(os.path.join(b, "model-rank00000.safetensors"))
    uri = f"s3://{BUCKET}/skip"
    up = Uploader(BackupLocation(uri), str(tmp_path / "run"))
    up.start()
    try:
        up.catch_up()  # queues all three: nothing is on S3 yet
        assert up.flush(120) == []  # not stuck retrying the bad one
    finally:
        up.stop()
    assert up.skipped == ["step=000002"] and up.failures == 0
    assert list_remote(uri) == ["step=000001", "step=000003"]
    verify_checkpoint(f"{uri}/step=000003")


@pytest.mark.parametrize("damage", ["deleted", "replaced", "truncated"])
def test_pushing_again_repairs_a_damaged_remote_copy(s3, tmp_path, damage):
    (a,) = _ckpts(tmp_path / "run", steps=(5,))
    uri = f"s3://{BUCKET}/repair-{damage}"
    push_checkpoint(a, uri)
    key = f"repair-{damage}/step=000005/model-rank00000.safetensors"
    client = s3.client()
    body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    if damage == "deleted":
        client.delete_object(Bucket=BUCKET, Key=key)
    elif damage == "replaced":
        client.put_object(Bucket=BUCKET, Key=key, Body=bytes(len(body)))  # same size, other bytes
    else:
        client.put_object(Bucket=BUCKET, Key=key, Body=body[: len(body) // 2])
    with pytest.raises(CheckpointCorruptError):
        verify_checkpoint(f"{uri}/step=000005")
    res = push_checkpoint(a, uri)  # the manifest is the same: only the damaged object goes up again
    assert res.files == 2
    verify_checkpoint(f"{uri}/step=000005")  # the remote copy verifies again; the bad download was never cached
    assert torch.equal(load_checkpoint(f"{uri}/step=000005")["state_dict"]["w"], torch.full((64, 64), 5.0))


def test_a_newer_backup_that_cannot_be_pulled_falls_back_to_the_valid_local_one(s3, tmp_path):
    local = tmp_path / "run"
    _ckpts(local, steps=(2,))
    (newer,) = _ckpts(tmp_path / "elsewhere", steps=(4,))
    uri = f"s3://{BUCKET}/fallback"
    push_checkpoint(newer, uri)
    s3.client().delete_object(Bucket=BUCKET, Key="fallback/step=000004/model-rank00000.safetensors")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = resume_path(str(local), uri)
    assert got == str(local / "step=000002")
    assert any("fallback/step=000004" in str(w.message) and "resuming from the local" in str(w.message) for w in rec)
    assert not [e for e in os.listdir(local) if e.startswith(".partial-")]  # the failed pull left nothing behind
