"""BackupToS3 with a real S3 server (SeaweedFS on loopback): mirrored checkpoints, the location's own retention,
and an outage in the middle of training that uploads survive."""
from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
import pytest

from lightning_ckpt import BackupToS3, PeriodicCheckpoint, list_checkpoints, load_checkpoint
from lightning_ckpt.demo import DemoDataModule, DemoModel
from lightning_ckpt.storage.s3 import list_remote, pull_checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from seaweed import s3_server  # noqa: E402


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_server(str(tmp_path_factory.mktemp("weed-backup")), "backups") as server:
        yield server


def _fit(callbacks, max_steps):
    t = pl.Trainer(max_steps=max_steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    t.fit(DemoModel(), DemoDataModule(n_train=64, n_val=32, batch_size=16))
    return t


def test_backups_mirror_commits_with_their_own_retention(s3, tmp_path):
    d = str(tmp_path / "ckpts")
    backup = BackupToS3(d, "s3://backups/run1", keep_last=2)
    _fit([PeriodicCheckpoint(d, every_n_train_steps=2, save_on_train_end=False), backup], max_steps=8)
    assert [c.step for c in list_checkpoints(d)] == [2, 4, 6, 8]  # all kept locally
    assert list_remote("s3://backups/run1") == ["step=000006", "step=000008"]  # 2 kept on S3
    got = pull_checkpoint("s3://backups/run1", str(tmp_path / "restore"))  # latest.json -> step 8, verified
    assert load_checkpoint(got)["global_step"] == 8


def test_outage_during_training_uploads_later_and_never_shows_a_partial(s3, tmp_path):
    d = str(tmp_path / "ckpts")
    seen_partial = []

    class Outage(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                s3.stop()
            if trainer.global_step == 7:
                s3.start()
            if trainer.global_step > 7:  # while uploads catch up, only complete checkpoints are ever listed
                for name in list_remote("s3://backups/run2"):
                    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket="backups", Prefix=f"run2/{name}/")["Contents"]}
                    if f"run2/{name}/manifest.json" not in keys or len(keys) < 5:
                        seen_partial.append(name)

    backup = BackupToS3(d, "s3://backups/run2", max_retry_s=2, flush_timeout_s=120)
    t = _fit([PeriodicCheckpoint(d, every_n_train_steps=2), backup, Outage()], max_steps=10)
    assert t.global_step == 10  # training went on through the outage
    # steps 4 and 6 were committed while the server was down (steps 3-7): their uploads waited and completed later
    assert {"step=000004", "step=000006"} <= set(backup.uploaded)
    assert list_remote("s3://backups/run2") == [f"step={s:06d}" for s in (2, 4, 6, 8, 10)]
    assert not seen_partial
    for name in list_remote("s3://backups/run2"):
        pull_checkpoint(f"s3://backups/run2/{name}", str(tmp_path / "pulled"))  # each one verifies
