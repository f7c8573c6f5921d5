"""Deduplicated checkpoints and S3 (SeaweedFS on loopback): push and pull move each pack of the content store once,
a backup location's retention deletes the packs no checkpoint there references any more (those this run uploaded)
and keeps the referenced ones, and a fine-tune saved straight to an ``s3://`` dirpath resumes on a fresh machine."""
from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch

from lightning_ckpt import (
    BackupToS3,
    CheckpointWriter,
    PeriodicCheckpoint,
    RetentionPolicy,
    list_checkpoints,
    load_checkpoint,
    verify_checkpoint,
)
from lightning_ckpt.demo import DemoModel
from lightning_ckpt.format import manifest as mf
from lightning_ckpt.session.backups import staging_dir
from lightning_ckpt.store.blobs import BlobStore
from lightning_ckpt.store.s3 import S3Store
from lightning_ckpt.folder.transfer import pull_checkpoint, push_checkpoint

import support
from support import data

BUCKET = "dedup"  # the s3 fixture's bucket for this module (the session's server)
MODEL_KW = {"layers": 3, "frozen_layers": 2}
FROZEN = ["net.0.weight", "net.0.bias", "net.3.weight", "net.3.bias"]

_trainer = functools.partial(support.trainer, val_every=None, num_sanity_val_steps=0)


@pytest.fixture(autouse=True)
def _own_cache_and_staging(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_CKPT_CACHE", str(tmp_path / "cache"))  # nothing downloaded before is cached
    monkeypatch.setenv("LIGHTNING_CKPT_STAGING", str(tmp_path / "staging"))


def remote_packs(uri: str) -> dict[str, dict]:
    """The pack objects of ``uri``'s content store: {name: listing}."""
    return S3Store(uri).blob_listing()[0]


def remote_referenced(uri: str) -> set[str]:
    return {p for c in list_checkpoints(uri) for p in c.manifest.get("packs") or {}}


def check_remote(uri: str) -> set[str]:
    """Every checkpoint at ``uri`` references packs that are there with their size, and verifies; returns the packs
    they reference."""
    present = remote_packs(uri)
    for c in list_checkpoints(uri):
        for p, e in (c.manifest.get("packs") or {}).items():
            assert p in present and int(present[p]["Size"]) == int(e["size"]), (c.name, p)
        verify_checkpoint(c.path)
    return remote_referenced(uri)


def fine_tune_saves(folder, steps) -> tuple[list[str], dict]:
    """A writer's saves of a frozen 'backbone' (256 KiB, stable) and a trained head; returns the paths and the
    state of the last one."""
    torch.manual_seed(0)
    frozen, head = torch.randn(256, 256), torch.randn(8, 256)
    w = CheckpointWriter(str(folder), async_save=False)
    paths = []
    for s in steps:
        head.add_(0.5)
        state = {"state_dict": {"frozen": frozen, "head": head}, "global_step": s}
        paths.append(w.save(state, step=s, stable=["state_dict/frozen"]).result().path)
    w.close()
    return paths, {"frozen": frozen.clone(), "head": head.clone()}


def count_downloads(monkeypatch) -> list[str]:
    keys: list[str] = []
    real = S3Store.download

    def download(store, key, dest, size, progress=None):
        keys.append(key)
        return real(store, key, dest, size, progress)

    monkeypatch.setattr(S3Store, "download", download)
    return keys


def test_push_sends_each_pack_once_and_pull_fetches_what_it_lacks(s3, tmp_path, monkeypatch):
    uri = f"s3://{BUCKET}/push"
    (a, b, c), last = fine_tune_saves(tmp_path / "local", (1, 2, 3))
    (pack,) = BlobStore(str(tmp_path / "local")).names()
    pack_size = (tmp_path / "local" / mf.BLOBS / pack).stat().st_size
    first = push_checkpoint(a, uri)
    assert first.packs == (pack,) and first.bytes > pack_size
    before = remote_packs(uri)
    second = push_checkpoint(b, uri)  # references the same pack: no pack bytes go up
    assert second.packs == () and second.bytes < pack_size / 4, second
    assert push_checkpoint(a, uri).packs == ()  # pushed again: already there
    assert remote_packs(uri) == before  # not even rewritten (same ETag and time)
    push_checkpoint(c, uri)
    assert check_remote(uri) == {pack}

    # a pull into an empty folder fetches the pack with the checkpoint, into the folder's content store
    monkeypatch.setenv("LIGHTNING_CKPT_CACHE", str(tmp_path / "cache2"))  # check_remote's reads are cached
    downloads = count_downloads(monkeypatch)
    got = pull_checkpoint(f"{uri}/step=000002", str(tmp_path / "pulled"))
    assert f"push/{mf.BLOBS}/{pack}" in downloads
    assert BlobStore(str(tmp_path / "pulled")).names() == [pack]
    verify_checkpoint(got)
    # the next pull into that folder lacks only the checkpoint's own files
    downloads.clear()
    got = pull_checkpoint(uri, str(tmp_path / "pulled"))  # the newest, by latest.json
    assert got.endswith("step=000003") and downloads and not [k for k in downloads if f"/{mf.BLOBS}/" in k]
    verify_checkpoint(got)
    sd = load_checkpoint(got)["state_dict"]
    assert torch.equal(sd["frozen"], last["frozen"]) and torch.equal(sd["head"], last["head"])

    # a pack deleted or damaged on S3 is sent again by the next push of a checkpoint that references it
    s3.client().delete_object(Bucket=BUCKET, Key=f"push/{mf.BLOBS}/{pack}")
    assert push_checkpoint(c, uri).packs == (pack,)
    assert check_remote(uri) == {pack}


class RefreshFrozen(pl.Callback):
    """Changes the frozen layers before the save of step ``at`` (a backbone refreshed once): that save writes them
    into its own files, the next one into a new pack, and the first pack is referenced by the saves before only."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.at:
            with torch.no_grad():
                for p in [*pl_module.net[0].parameters(), *pl_module.net[3].parameters()]:
                    p.add_(0.01)


def test_backup_retention_collects_the_packs_this_run_uploaded_and_no_checkpoint_references(s3, tmp_path):
    d = str(tmp_path / "ckpts")
    builtin, callback = f"s3://{BUCKET}/keep2", f"s3://{BUCKET}/keep3"
    # a pack no manifest references, uploaded by someone else a moment ago (an upload in progress elsewhere): kept
    stranger = "pack-0badf00d-1-rank00000.safetensors"
    s3.client().put_object(Bucket=BUCKET, Key=f"keep2/{mf.BLOBS}/{stranger}", Body=b"not yet referenced")
    torch.manual_seed(0)
    cbs = [PeriodicCheckpoint(d, every_n_train_steps=1, backup_uri=[{"uri": builtin, "keep_last": 2}]),
           BackupToS3(d, callback, keep_last=3), RefreshFrozen(at=4)]
    _trainer(cbs, max_steps=8).fit(DemoModel(**MODEL_KW), data())
    local = list_checkpoints(d)  # no local retention: every checkpoint and both packs
    assert [c.step for c in local] == list(range(1, 9))
    first_pack, later_pack = set(local[0].manifest["packs"]), set(local[-1].manifest["packs"])
    assert len(first_pack) == 1 and len(later_pack) == 1 and first_pack != later_pack
    assert set(BlobStore(d).names()) == first_pack | later_pack
    for uri, steps in ((builtin, [7, 8]), (callback, [6, 7, 8])):
        assert [c.step for c in list_checkpoints(uri)] == steps
        referenced = check_remote(uri)
        assert referenced == later_pack  # the first pack went with the last checkpoint that referenced it
        assert set(remote_packs(uri)) - referenced == ({stranger} if uri == builtin else set())


def test_s3_dirpath_fine_tune_resumes_on_a_fresh_machine(s3, tmp_path, monkeypatch):
    uri = f"s3://{BUCKET}/direct"

    def run(max_steps):
        torch.manual_seed(0)
        model = DemoModel(**MODEL_KW)
        cbs = [PeriodicCheckpoint(uri, every_n_train_steps=2, resume="auto"), RetentionPolicy(uri, keep_last=2)]
        t = _trainer(cbs, max_steps=max_steps)
        t.fit(model, data())
        return t, model

    _, first = run(6)
    assert [c.step for c in list_checkpoints(uri)] == [4, 6]
    assert list_checkpoints(staging_dir(uri)) == []  # staged copies are removed once uploaded
    packs = check_remote(uri)
    assert packs and set(remote_packs(uri)) == packs  # the packs of the deleted checkpoints went with them
    # a fresh machine: no staging folder, no read cache
    monkeypatch.setenv("LIGHTNING_CKPT_STAGING", str(tmp_path / "staging2"))
    monkeypatch.setenv("LIGHTNING_CKPT_CACHE", str(tmp_path / "cache2"))
    t, model = run(10)
    assert str(t.ckpt_path) == f"{uri}/step=000006" and t.global_step == 10
    ckpts = list_checkpoints(uri)
    assert [c.step for c in ckpts] == [6, 8, 10]  # the checkpoint it resumed from is kept while it runs
    assert ckpts[-1].manifest["resumed_from"] == f"{uri}/step=000006"
    check_remote(uri)
    got = load_checkpoint(f"{uri}/step=000010")["state_dict"]
    for k, v in model.state_dict().items():
        assert torch.equal(got[k], v), k
    for k in FROZEN:  # the frozen layers came through S3 unchanged
        assert torch.equal(got[k], first.state_dict()[k]), k
