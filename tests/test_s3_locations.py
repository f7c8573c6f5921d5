"""Backups as an argument of the saving callbacks (several locations, each with its own retention), an s3:// dirpath,
checkpoints read in place from S3 (list / latest / verify / load / fit), and resume="auto" -- against a real S3
server (SeaweedFS on loopback) that the tests start themselves."""
from __future__ import annotations

import functools
import json
import os
import shutil

import pytest
import torch

from lightning_ckpt import (
    BestMetricCheckpoint,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    PeriodicCheckpoint,
    RetentionPolicy,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    verify_checkpoint,
)
from lightning_ckpt.session.session import staging_dir
from lightning_ckpt.demo import DemoModel
from lightning_ckpt.format import manifest as mf
from lightning_ckpt.folder.transfer import push_checkpoint

import support
from support import ROOT, data, list_remote, run_python

BUCKET = "locs"  # the s3 fixture's bucket for this module (the session's server)


@pytest.fixture(autouse=True)
def _local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_CKPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LIGHTNING_CKPT_STAGING", str(tmp_path / "staging"))


_trainer = functools.partial(support.trainer, num_sanity_val_steps=0)  # validation per epoch unless given


def _model():
    torch.manual_seed(0)
    return DemoModel()


def _steps(uri):
    return sorted(c.step for c in list_checkpoints(uri))


def test_backup_uri_locations_each_with_their_own_retention(s3, tmp_path):
    d = str(tmp_path / "ckpts")
    locations = [
        {"uri": f"s3://{BUCKET}/last1", "keep_last": 1},
        {"uri": f"s3://{BUCKET}/bests", "keep_tags": ["best"]},
    ]
    cbs = [
        PeriodicCheckpoint(d, every_n_train_steps=2, backup_uri=locations),
        BestMetricCheckpoint(d, monitor="val_loss", top_k=-1),
        RetentionPolicy(d, keep_last=2),
    ]
    t = _trainer(cbs, max_steps=12, val_check_interval=4, limit_val_batches=2)
    t.fit(_model(), data())
    local = list_checkpoints(d)
    # local: the 2 newest plus the best ones that BestMetricCheckpoint keeps (top_k=-1 protects every improvement)
    assert [c.step for c in local][-2:] == [10, 12]
    assert _steps(f"s3://{BUCKET}/last1") == [12]
    bests = list_checkpoints(f"s3://{BUCKET}/bests")
    best_steps = sorted(c.step for c in local if "best" in c.tags)
    assert best_steps and {c.step for c in bests} == set(best_steps) | {12}  # every best, and the newest
    assert all("best" in c.tags for c in bests if c.step != 12)
    # what is on S3 reads in place: listed, verified and loaded (through the local cache)
    newest = latest_checkpoint(f"s3://{BUCKET}/last1")
    assert newest == f"s3://{BUCKET}/last1/step=000012"
    verify_checkpoint(newest)
    ck = load_checkpoint(newest)
    assert ck["global_step"] == 12
    on_disk = load_checkpoint(os.path.join(d, "step=000012"))
    for k, v in on_disk["state_dict"].items():
        assert torch.equal(v, ck["state_dict"][k])


def test_bad_backup_settings_are_refused_with_a_clear_message(tmp_path):
    d = str(tmp_path / "c")
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        PeriodicCheckpoint(d, every_n_train_steps=1, backup_uri="/mnt/backup")
    with pytest.raises(ValueError, match="unknown keys"):
        PeriodicCheckpoint(d, every_n_train_steps=1, backup_uri=[{"uri": "s3://b/p", "keep_lst": 2}])
    with pytest.raises(ValueError, match="twice"):
        PeriodicCheckpoint(d, every_n_train_steps=1, backup_uri=["s3://b/p", "s3://b/p/"])
    with pytest.raises(ValueError, match="keep_best is set but monitor"):
        PeriodicCheckpoint(d, every_n_train_steps=1, backup_uri=[{"uri": "s3://b/p", "keep_best": 2}])
    with pytest.raises(ValueError, match="resume="):
        PeriodicCheckpoint(d, every_n_train_steps=1, resume="latest")
    with pytest.raises(ValueError, match="on_save_error="):
        PeriodicCheckpoint(d, every_n_train_steps=1, on_save_error="ignore")
    with pytest.raises(ValueError, match="merge_on_train_end needs a local dirpath"):
        PeriodicCheckpoint("s3://b/p", every_n_train_steps=1, merge_on_train_end=True)


def test_s3_dirpath_keeps_no_local_copy_and_resumes_from_s3(s3, tmp_path):
    uri = f"s3://{BUCKET}/direct"
    cbs = [PeriodicCheckpoint(uri, every_n_train_steps=2, resume="auto"), RetentionPolicy(uri, keep_last=2)]
    t = _trainer(cbs, max_steps=8, limit_val_batches=0)
    t.fit(_model(), data())
    assert _steps(uri) == [6, 8]  # retention applied on S3
    staged = staging_dir(uri)
    assert list_checkpoints(staged) == []  # staged copies are removed once uploaded
    ck = load_checkpoint(f"{uri}/step=000008")
    assert ck["global_step"] == 8

    # relaunch the same command with more steps: it resumes from S3
    cb = PeriodicCheckpoint(uri, every_n_train_steps=2, resume="auto")
    t2 = _trainer([cb, RetentionPolicy(uri, keep_last=2)], max_steps=12, limit_val_batches=0)
    t2.fit(_model(), data())
    assert str(t2.ckpt_path) == f"{uri}/step=000008"
    assert t2.global_step == 12
    assert _steps(uri) == [8, 10, 12]  # retention never deletes the checkpoint this run resumed from
    newest = load_checkpoint(f"{uri}/step=000012")
    assert newest["global_step"] == 12

    # Trainer.fit(ckpt_path=<s3 checkpoint>) works with no auto resume, too
    model = _model()
    t3 = _trainer([PeriodicCheckpoint(str(tmp_path / "other"), every_n_train_steps=100)], max_steps=13, limit_val_batches=0)
    t3.fit(model, data(), ckpt_path=f"{uri}/step=000012")
    assert t3.global_step == 13


def test_resume_auto_prefers_local_then_backups_then_starts_fresh(s3, tmp_path):
    d = str(tmp_path / "ckpts")
    uri = f"s3://{BUCKET}/auto"

    def run(max_steps):
        cb = PeriodicCheckpoint(d, every_n_train_steps=2, backup_uri=uri, resume="auto")
        t = _trainer([cb], max_steps=max_steps, limit_val_batches=0)
        t.fit(_model(), data())
        return t

    t = run(4)
    assert t.ckpt_path is None and t.global_step == 4  # nothing anywhere: a fresh start
    t = run(6)
    assert str(t.ckpt_path) == os.path.join(d, "step=000004")  # local first
    assert _steps(uri) == [2, 4, 6]
    shutil.rmtree(d)  # a fresh machine: nothing local
    t = run(8)
    assert str(t.ckpt_path) == os.path.join(d, "step=000006")  # pulled from the backup, verified
    assert t.global_step == 8
    assert _steps(uri) == [2, 4, 6, 8]


def test_resume_auto_skips_a_corrupt_newest_backup(s3, tmp_path):
    d = str(tmp_path / "ckpts")
    uri = f"s3://{BUCKET}/corrupt-newest"
    _trainer([PeriodicCheckpoint(d, every_n_train_steps=2, backup_uri=uri)], max_steps=4, limit_val_batches=0).fit(_model(), data())
    # damage the newest checkpoint on S3 (one shard file replaced by flipped bytes)
    client = s3.client()
    key = next(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="corrupt-newest/step=000004/")["Contents"]
               if o["Key"].endswith(".safetensors"))
    body = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[-1] ^= 0xFF
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    shutil.rmtree(d)
    with pytest.warns(UserWarning, match="step=000004"):
        t = _trainer([PeriodicCheckpoint(d, every_n_train_steps=2, backup_uri=uri, resume="auto")], max_steps=6,
                     limit_val_batches=0)
        t.fit(_model(), data())
    assert str(t.ckpt_path) == os.path.join(d, "step=000002")


# --------------------------------------------------------------------------------------------------- hostile S3 input
def _put_tree(client, prefix, folder):
    for f in os.listdir(folder):
        with open(os.path.join(folder, f), "rb") as fh:
            client.put_object(Bucket=BUCKET, Key=f"{prefix}/{f}", Body=fh.read())


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory, s3):
    d = str(tmp_path_factory.mktemp("good"))
    _trainer([PeriodicCheckpoint(d, every_n_train_steps=2)], max_steps=2, limit_val_batches=0).fit(_model(), data())
    return os.path.join(d, "step=000002")


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def _hostile(kind, src, dst):
    shutil.copytree(src, dst)
    m = json.loads(_read(os.path.join(dst, "manifest.json")))
    shard = next(f for f in m["files"] if f.endswith(".safetensors"))
    if kind == "escape":
        m["files"]["../../etc/passwd"] = m["files"].pop(shard)
    elif kind == "newer":
        m["format_version"] = 99
    elif kind == "pickle":
        import pickle

        class Boom:
            def __reduce__(self):
                return (os.system, ("touch /tmp/lightning_ckpt_pwned",))

        _write(os.path.join(dst, shard), pickle.dumps(Boom()))
    elif kind == "truncated":
        with open(os.path.join(dst, shard), "r+b") as f:
            f.truncate(os.path.getsize(os.path.join(dst, shard)) // 2)
    elif kind == "bitflip":
        b = bytearray(_read(os.path.join(dst, shard)))
        b[len(b) // 2] ^= 0x01
        _write(os.path.join(dst, shard), bytes(b))
    elif kind == "notjson":
        _write(os.path.join(dst, "manifest.json"), b"\x80not json{")
        return
    _write(os.path.join(dst, "manifest.json"), mf.dumps(m))  # as an attacker would: its digest recomputed


@pytest.mark.parametrize("kind,error", [
    ("escape", CheckpointCorruptError), ("newer", CheckpointError), ("pickle", CheckpointCorruptError),
    ("truncated", CheckpointCorruptError), ("bitflip", CheckpointCorruptError), ("notjson", CheckpointCorruptError),
])
def test_hostile_checkpoints_on_s3_are_refused_before_anything_runs(s3, good_ckpt, tmp_path, kind, error):
    src = str(tmp_path / "step=000002")
    _hostile(kind, good_ckpt, src)
    prefix = f"hostile-{kind}"
    _put_tree(s3.client(), f"{prefix}/step=000002", src)
    uri = f"s3://{BUCKET}/{prefix}/step=000002"
    with pytest.raises(error):
        load_checkpoint(uri)
    with pytest.raises(error):
        verify_checkpoint(uri)
    # a Trainer refuses it before training: the model keeps its weights
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = _trainer([PeriodicCheckpoint(str(tmp_path / "run"), every_n_train_steps=100)], max_steps=3, limit_val_batches=0)
    with pytest.raises(error):
        t.fit(model, data(), ckpt_path=uri)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not os.path.exists("/tmp/lightning_ckpt_pwned")
    # next to a valid older checkpoint, latest_checkpoint falls back to that one
    push_checkpoint(good_ckpt, f"s3://{BUCKET}/{prefix}-mixed")
    _put_tree(s3.client(), f"{prefix}-mixed/step=000009", src)
    with pytest.warns(UserWarning):
        assert latest_checkpoint(f"s3://{BUCKET}/{prefix}-mixed") == f"s3://{BUCKET}/{prefix}-mixed/step=000002"


def test_load_from_s3_fetches_only_what_is_needed(s3, good_ckpt, tmp_path):
    push_checkpoint(good_ckpt, f"s3://{BUCKET}/partial-fetch")
    uri = f"s3://{BUCKET}/partial-fetch/step=000002"
    model = DemoModel()
    load_weights(uri, model)
    cached = [f for root, _, files in os.walk(str(tmp_path / "cache")) for f in files if not f.startswith(".")]
    names = set(cached)
    assert "manifest.json" in names
    assert any(n.startswith("model-") for n in names)
    assert not any(n.startswith("optim-") for n in names), names  # the optimizer state was not downloaded
    with pytest.raises(CheckpointNotFoundError):
        load_checkpoint(f"s3://{BUCKET}/partial-fetch/step=999999")
    assert list_remote(f"s3://{BUCKET}/partial-fetch") == ["step=000002"]


def test_cli_lists_shows_verifies_and_merges_checkpoints_on_s3(s3, good_ckpt, tmp_path, capsys):
    from lightning_ckpt.cli import main

    push_checkpoint(good_ckpt, f"s3://{BUCKET}/cli")
    assert main(["ls", f"s3://{BUCKET}/cli", "--verify"]) == 0
    assert "step=000002" in capsys.readouterr().out
    assert main(["show", f"s3://{BUCKET}/cli/step=000002"]) == 0
    assert "step         2" in capsys.readouterr().out
    assert main(["verify", f"s3://{BUCKET}/cli/step=000002"]) == 0
    out = str(tmp_path / "model.safetensors")
    assert main(["merge", f"s3://{BUCKET}/cli/step=000002", out, "--quiet"]) == 0
    from safetensors.torch import load_file

    model = DemoModel()
    model.load_state_dict(load_file(out))
    assert main(["verify", f"s3://{BUCKET}/cli/step=000404"]) == 2
    assert main(["ls", "s3://no-such-bucket-here/x"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.usefixtures("forkserver")
def test_fault_tolerant_recipe_resumes_on_a_fresh_machine_from_its_backups(s3, tmp_path):
    """configs/fault_tolerant.yaml through LightningCLI, as a user runs it; then the same command on a machine
    without the run folder continues from S3."""
    s3.client().create_bucket(Bucket="lightning-ckpt")
    cmd = [os.path.join(ROOT, "examples", "cli.py"), "fit", "--config",
           os.path.join(ROOT, "configs", "fault_tolerant.yaml")]
    first = run_python(cmd + ["--trainer.max_steps", "60"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-4000:]
    local = str(tmp_path / "runs" / "fault_tolerant")
    assert [c.step for c in list_checkpoints(local)][-2:] == [40, 60]
    assert _steps("s3://lightning-ckpt/runs/fault_tolerant") == [20, 40, 60]
    bests = list_checkpoints("s3://lightning-ckpt/best/fault_tolerant")
    assert bests and all("best" in c.tags for c in bests[:-1])
    shutil.rmtree(tmp_path / "runs")  # a fresh machine
    again = run_python(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resuming from" in again.stderr and "step=000060" in again.stderr
    assert _steps("s3://lightning-ckpt/runs/fault_tolerant") == [60, 80, 100]
    newest = list_checkpoints(local)[-1]
    assert newest.step == 100 and newest.manifest["resumed_from"].endswith("step=000060")


def test_reupload_of_a_name_uncommits_the_old_one_first_and_orphans_are_cleaned(s3, good_ckpt, tmp_path):
    """Pushing a different checkpoint under a name that is already on S3 removes the old manifest before any object
    is overwritten (an interrupted overwrite is never listed); what interrupted uploads leave is cleaned up."""
    from lightning_ckpt.store.s3 import S3Store

    uri = f"s3://{BUCKET}/overwrite"
    push_checkpoint(good_ckpt, uri)
    other = str(tmp_path / "other")
    _trainer([PeriodicCheckpoint(other, every_n_train_steps=2)], max_steps=2, limit_val_batches=0).fit(DemoModel(hidden=48), data())
    client = s3.client()
    real = S3Store.put_file
    calls = []

    def interrupting_put(self, key, path, progress=None, metadata=None):
        calls.append(key)
        if len(calls) == 2:  # the second data object of the new checkpoint: the process dies here
            raise KeyboardInterrupt("killed")
        return real(self, key, path, progress, metadata)

    S3Store.put_file = interrupting_put
    try:
        with pytest.raises(KeyboardInterrupt):
            push_checkpoint(os.path.join(other, "step=000002"), uri)
    finally:
        S3Store.put_file = real
    assert list_remote(uri) == []  # the old manifest went first: nothing half-replaced is listed
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="overwrite/step=000002/")["Contents"]]
    assert keys and not any(k.endswith("manifest.json") for k in keys)
    assert S3Store(uri).cleanup(older_than_s=3600) == []  # recent: maybe an upload in progress elsewhere
    assert S3Store(uri).cleanup(older_than_s=0) == ["step=000002"]
    assert "Contents" not in client.list_objects_v2(Bucket=BUCKET, Prefix="overwrite/step=000002/")
    # the same checkpoint pushed twice is uploaded once
    push_checkpoint(good_ckpt, uri)
    res = push_checkpoint(good_ckpt, uri)
    assert res.files == 1 and list_remote(uri) == ["step=000002"]
    verify_checkpoint(f"{uri}/step=000002")


def test_resume_prefers_a_newer_backup_over_a_stale_local_folder(s3, tmp_path):
    from lightning_ckpt import resume_path
    from lightning_ckpt.folder.transfer import pull_checkpoint

    d = str(tmp_path / "a")
    uri = f"s3://{BUCKET}/stale"
    _trainer([PeriodicCheckpoint(d, every_n_train_steps=2, backup_uri=uri)], max_steps=6, limit_val_batches=0).fit(_model(), data())
    stale = str(tmp_path / "b")
    pull_checkpoint(f"{uri}/step=000002", stale)  # machine B has an old copy of the run folder
    got = resume_path(stale, uri)
    assert got == os.path.join(stale, "step=000006")  # the newer backup, pulled
    assert resume_path(d, uri) == os.path.join(d, "step=000006")  # as new as S3: nothing downloaded


def test_a_corrupt_local_checkpoint_is_never_committed_on_s3(s3, good_ckpt, tmp_path):
    bad = str(tmp_path / "step=000002")
    _hostile("bitflip", good_ckpt, bad)
    uri = f"s3://{BUCKET}/refuse-corrupt"
    with pytest.raises(CheckpointCorruptError):
        push_checkpoint(bad, uri)
    assert list_remote(uri) == []
    assert "Contents" not in s3.client().list_objects_v2(Bucket=BUCKET, Prefix="refuse-corrupt/")  # nothing left behind


def test_export_at_the_end_of_a_run_saved_straight_to_s3(s3, tmp_path):
    from safetensors.torch import load_file

    from lightning_ckpt import ExportOnTrainEnd

    uri = f"s3://{BUCKET}/export-run"
    with pytest.raises(ValueError, match="export_dir"):
        ExportOnTrainEnd(uri)
    out = str(tmp_path / "export")
    cbs = [PeriodicCheckpoint(uri, every_n_train_steps=4), BestMetricCheckpoint(uri, monitor="val_loss", top_k=1),
           ExportOnTrainEnd(uri, export_dir=out)]
    t = _trainer(cbs, max_steps=8, val_check_interval=4, limit_val_batches=2)
    t.fit(_model(), data())
    best = cbs[1].best_model_path
    assert best is not None and best.startswith(uri + "/")
    model = DemoModel()
    model.load_state_dict(load_file(os.path.join(out, "model.safetensors")))
    ref = load_checkpoint(best)["state_dict"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k])
    with pytest.raises(ValueError, match="max_retry_s"):
        PeriodicCheckpoint(str(tmp_path / "x"), every_n_train_steps=1, backup_uri=[{"uri": uri, "max_retry_s": 0}])
