"""Where a resume cannot be exact, it is said before it matters: a warning at the first save it applies to (once per
reason), the manifest's ``resume`` record, and ``lightning-ckpt show``."""
from __future__ import annotations

import pytest

import torch

from lightning_ckpt import CheckpointWriter, PeriodicCheckpoint, list_checkpoints
from lightning_ckpt.cli import main
from resume_cells import Cell, fit

pytestmark = pytest.mark.filterwarnings("ignore:.*set_vital.*:UserWarning")  # torchdata on torch 2.13

EVERY3 = lambda d, phase: [PeriodicCheckpoint(d, every_n_train_steps=3, async_save=False)]  # noqa: E731


def test_plain_dataloader_warns_once_and_show_says_why(tmp_path, capsys):
    d = str(tmp_path / "ckpts")
    run = fit(Cell("plain", EVERY3, ("fit", {}), loader="plain_shuffle", trainer={"max_steps": 12}), d, "cut")
    ckpts = {c.step: c for c in list_checkpoints(d)}
    assert sorted(ckpts) == [3, 6, 9, 12]
    # one warning for the reason, at the first save it applies to (step 3), not at every save
    warned = [w for w in run.warnings if "will not reproduce" in w]
    assert len(warned) == 1 and "checkpoint of step 3" in warned[0] and "StatefulDataLoader" in warned[0]
    mid = ckpts[3].manifest["resume"]
    assert mid["exact"] is False and mid["position"] == "batch_end"
    assert any("does not save its position" in w for w in mid["why"])
    assert main(["show", ckpts[3].path]) == 0
    out = capsys.readouterr().out
    assert "exact resume no, because" in out and "does not save its position" in out
    # every save here is mid-epoch (an epoch is 10 steps); the end of fit (step 12) too, and it is the final one
    assert not any(c.manifest["resume"]["exact"] for c in ckpts.values())
    assert ckpts[12].manifest["resume"]["position"] == "batch_end" and "final" in ckpts[12].tags


def test_exact_checkpoint_shows_yes(tmp_path, capsys):
    d = str(tmp_path / "ckpts")
    fit(Cell("stateful", EVERY3, ("fit", {}), trainer={"max_steps": 6}), d, "cut")
    c = list_checkpoints(d)[-1]
    assert c.manifest["resume"] == {"exact": True, "why": [], "position": "batch_end"}
    assert main(["show", c.path]) == 0
    assert "exact resume yes" in capsys.readouterr().out


def test_show_without_a_record(tmp_path, capsys):
    w = CheckpointWriter(str(tmp_path), async_save=False)
    w.save({"state_dict": {"w": torch.zeros(2)}, "global_step": 1}, step=1, epoch=0)
    w.close()
    assert main(["show", str(tmp_path / "step=000001")]) == 0
    assert "exact resume unknown" in capsys.readouterr().out
