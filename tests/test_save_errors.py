"""A write error in the middle of a save (here: the file-size limit, RLIMIT_FSIZE, which fails a write the way a full
disk does): a clear error, nothing partial listed, earlier checkpoints intact, and the run stops or continues as
configured (``on_save_error``). Real processes, real Trainer."""
from __future__ import annotations

import os
import textwrap

import pytest

from lightning_ckpt import list_checkpoints, verify_checkpoint

from support import ROOT, run_python

pytestmark = pytest.mark.usefixtures("forkserver")

SCRIPT = textwrap.dedent('''
    import os, resource, signal, sys, warnings
    warnings.filterwarnings("ignore")
    sys.path.insert(0, {root!r})
    import lightning.pytorch as pl, torch
    from lightning_ckpt import PeriodicCheckpoint
    from lightning_ckpt.demo import DemoDataModule, DemoModel
    d, max_steps, limit, policy, async_save = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
    if limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    torch.manual_seed(0)
    cb = PeriodicCheckpoint(d, every_n_train_steps=2, resume="auto", async_save=async_save,
                            on_save_error=None if policy == "default" else policy)
    t = pl.Trainer(max_steps=max_steps, callbacks=[cb], logger=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    t.fit(DemoModel(), DemoDataModule(n_train=64, n_val=32, batch_size=16))
    print("FINISHED", t.global_step, len(cb._session.save_errors) if cb._session else "-")
''').format(root=ROOT)


def _run(d, max_steps, limit, policy, async_save):
    return run_python(["-c", SCRIPT, d, str(max_steps), str(limit), policy, "1" if async_save else "0"],
                      capture_output=True, text=True, timeout=300)


def _entries(d):
    return sorted(os.listdir(d))


def test_write_error_mid_save_continue_or_stop(tmp_path, async_save=True):
    d = str(tmp_path / "ckpts")
    first = _run(d, 4, 0, "default", async_save)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [c.step for c in list_checkpoints(d)] == [2, 4]

    # the optimizer shard (about 45 KB) cannot be written under a 32 KiB file-size limit; the small files can
    cont = _run(d, 8, 32 * 1024, "continue", async_save)
    assert cont.returncode == 0, cont.stderr[-3000:]
    assert "FINISHED 8" in cont.stdout  # resumed at 4 and trained to the end despite the failed saves
    assert "training continues (on_save_error='continue')" in cont.stderr
    assert "File too large" in cont.stderr and "earlier checkpoints are intact" in cont.stderr
    assert [c.step for c in list_checkpoints(d)] == [2, 4]  # nothing partial listed
    assert not [e for e in _entries(d) if e.startswith(".partial-")]  # and no partial folder left behind
    for c in list_checkpoints(d):
        verify_checkpoint(c.path)

    stop = _run(d, 8, 32 * 1024, "default", async_save)
    assert stop.returncode != 0
    assert "FINISHED" not in stop.stdout
    assert "CheckpointWriteError" in stop.stderr and "File too large" in stop.stderr
    assert "Free disk space" in stop.stderr
    assert [c.step for c in list_checkpoints(d)] == [2, 4]
    assert not [e for e in _entries(d) if e.startswith(".partial-")]
    for c in list_checkpoints(d):
        verify_checkpoint(c.path)

    # once the limit is gone, the same command resumes from the newest intact checkpoint and saves again
    again = _run(d, 8, 0, "default", async_save)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [c.step for c in list_checkpoints(d)] == [2, 4, 6, 8]
