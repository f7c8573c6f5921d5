"""BackupToS3 with a real S3 server (SeaweedFS on loopback): mirrored checkpoints, the location's own retention,
and the server stopped in the middle of an upload and started again while training goes on."""
from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest

from lightning_ckpt import BackupToS3, PeriodicCheckpoint, list_checkpoints, load_checkpoint
from lightning_ckpt.folder.transfer import pull_checkpoint

import support
from support import list_remote

BUCKET = "backups"  # this module's bucket: on the session's S3 server (s3), on a private one (own_s3)

_fit = functools.partial(support.fit, val_every=None, num_sanity_val_steps=0)  # a DemoModel on support.data()


def test_backups_mirror_commits_with_their_own_retention(s3, tmp_path):
    d = str(tmp_path / "ckpts")
    backup = BackupToS3(d, "s3://backups/run1", keep_last=2)
    _fit([PeriodicCheckpoint(d, every_n_train_steps=2, save_on_train_end=False), backup], max_steps=8)
    assert [c.step for c in list_checkpoints(d)] == [2, 4, 6, 8]  # all kept locally
    assert list_remote("s3://backups/run1") == ["step=000006", "step=000008"]  # 2 kept on S3
    got = pull_checkpoint("s3://backups/run1", str(tmp_path / "restore"))  # latest.json -> step 8, verified
    assert load_checkpoint(got)["global_step"] == 8


@pytest.mark.slow
def test_server_stopped_in_the_middle_of_an_upload(own_s3, tmp_path, monkeypatch):
    """The S3 server goes down between two objects of one checkpoint's upload (deterministically: from inside the
    upload); the upload is retried once the server is back, training never waits, and no partial checkpoint is ever
    listed on S3. (A private server: this one is stopped and started again.)"""
    import threading

    s3 = own_s3

    from lightning_ckpt.store.s3 import S3Store

    d = str(tmp_path / "ckpts")
    uri = "s3://backups/mid-upload"
    real_put = S3Store.put_file
    state = {"stopped_at": None, "listed_while_down": []}
    lock = threading.Lock()

    def put_file(self, key, path, progress=None, metadata=None):
        with lock:
            first = state["stopped_at"] is None and "step=000004/" in key and key.endswith(".safetensors")
            if first:
                state["stopped_at"] = key
        if first:
            real_put(self, key, path, progress, metadata)  # this object makes it, then the server goes away a while
            state["down"] = True
            s3.stop()

            def back():
                s3.start()
                state["down"] = False

            state["restart"] = threading.Timer(2.0, back)  # an outage of 2 s plus the restart: 5+ steps of 0.4 s
            state["restart"].start()
            return None
        return real_put(self, key, path, progress, metadata)

    monkeypatch.setattr(S3Store, "put_file", put_file)

    monkeypatch.setenv("LIGHTNING_CKPT_CACHE", str(tmp_path / "cache"))
    from lightning_ckpt import CheckpointError, StorageUnavailableError, verify_checkpoint

    state["steps_while_down"] = 0
    state["down"] = False

    class Observe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            import time

            if state["down"]:
                time.sleep(0.4)  # a step of a real model: the outage overlaps several steps (and saves) of training
            if trainer.global_step == 6:
                # Test harness only: on a loaded machine the uploader can lag so far behind that the outage would
                # begin after the last step. Hold step 6 until the server is down, so the outage overlaps training.
                deadline = time.monotonic() + 60
                while not state["down"] and time.monotonic() < deadline:
                    time.sleep(0.05)
            if state["down"]:
                state["steps_while_down"] += 1  # training does not wait for the server
                if trainer.global_step % 2 == 0:
                    state.setdefault("saved_while_down", []).append(trainer.global_step)
            elif state["stopped_at"]:  # while uploads catch up: only whole checkpoints listed
                try:
                    for name in list_remote(uri):
                        try:
                            verify_checkpoint(f"{uri}/{name}")
                        except StorageUnavailableError:
                            raise
                        except CheckpointError as e:
                            state["listed_while_down"].append((name, str(e)))
                except StorageUnavailableError:
                    pass  # the restarted server is not serving yet (it says nothing about what is listed): next step


    cb = PeriodicCheckpoint(d, every_n_train_steps=2, backup_uri=[{"uri": uri, "max_retry_s": 1}])
    t = _fit([cb, Observe()], max_steps=16)
    if state.get("restart") is not None:  # harness: the restart has returned before the server is stopped at the end
        state["restart"].join(120)
    assert t.global_step == 16
    assert state["stopped_at"] is not None and state["steps_while_down"] > 0
    assert len(state.get("saved_while_down", [])) >= 2  # several saves queued during the outage
    assert not state["listed_while_down"]
    names = list_remote(uri)
    assert names == [f"step={s:06d}" for s in range(2, 17, 2)]
    for name in names:
        pull_checkpoint(f"{uri}/{name}", str(tmp_path / "pulled"))  # each one is whole and verifies
