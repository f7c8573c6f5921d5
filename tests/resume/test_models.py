"""The resume matrix on third-party models and callbacks (see model_cells.py), in this process."""
from __future__ import annotations

import pytest
import torch

from lightning_ckpt import latest_checkpoint, load_checkpoint
from model_cells import CELLS, EPOCHS, HF
from resume_cells import Cell, check_cell, cut_and_resume, fit

pytestmark = pytest.mark.filterwarnings("ignore:.*set_vital.*:UserWarning")  # torchdata on torch 2.13

REFS: dict = {}


def reference(cell: Cell, tmp_path_factory):
    if cell.ref_key not in REFS:
        REFS[cell.ref_key] = fit(cell, str(tmp_path_factory.mktemp("ref")), "ref")
    return REFS[cell.ref_key]


@pytest.mark.parametrize("cell", CELLS, ids=[c.name for c in CELLS])
def test_resume_cell(cell: Cell, tmp_path, tmp_path_factory):
    ref = reference(cell, tmp_path_factory)
    cut, res, ckpt = cut_and_resume(cell, str(tmp_path))
    check_cell(cell, ref, cut, res, ckpt)
    if isinstance(res.model, HF) and res.model.kind == "gpt2":  # tied input/output embeddings stay one tensor
        m = res.model.model
        assert m.lm_head.weight is m.transformer.wte.weight
        sd = load_checkpoint(ckpt)["state_dict"]
        assert torch.equal(sd["model.lm_head.weight"], sd["model.transformer.wte.weight"])


def test_ema_checkpoint_holds_the_averaged_weights_and_the_training_weights(tmp_path):
    """EMAWeightAveraging puts the averaged weights into the checkpoint's state_dict (and the weights being trained
    under current_model_state): what load_weights / lightning-ckpt export give is the average."""
    from model_cells import ema
    from resume_cells import CrashAt

    seen = {}

    class Grab(CrashAt):  # the state right after the checkpoint of step 10 (the end of epoch 0)
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 10:
                cb = next(c for c in trainer.callbacks if type(c).__name__ == "EMAWeightAveraging")
                seen["avg"] = {k[len("module."):]: v.clone() for k, v in cb._average_model.state_dict().items()
                               if k.startswith("module.")}
                seen["cur"] = {k: v.clone() for k, v in trainer.lightning_module.state_dict().items()}
            super().on_train_batch_start(trainer, *args)

    cell = Cell("ema", EPOCHS, ("crash", 11), extra=ema)
    fit(cell, str(tmp_path / "ckpts"), "cut", extra_callbacks=[Grab(11)])
    ckpt = load_checkpoint(latest_checkpoint(str(tmp_path / "ckpts")))
    for k, v in seen["avg"].items():
        assert torch.equal(ckpt["state_dict"][k], v), k
    for k, v in seen["cur"].items():
        assert torch.equal(ckpt["current_model_state"][k], v), k
    assert any(not torch.equal(seen["avg"][k], seen["cur"][k]) for k in seen["avg"])


def test_swa_average_is_in_the_callback_state_and_in_the_model_after_fit(tmp_path):
    """StochasticWeightAveraging keeps its average in its own state (``average_model_state``); it copies it into the
    model only in on_train_end, after the last checkpoint took the state the run can go on from."""
    from model_cells import swa
    from resume_cells import Net

    cell = Cell("swa", EPOCHS, ("fit", {}), model=lambda: Net(sched="epoch"), extra=swa, trainer={"max_epochs": 4})
    run = fit(cell, str(tmp_path / "ckpts"), "cut")
    ckpt = load_checkpoint(latest_checkpoint(str(tmp_path / "ckpts")))
    assert ckpt["global_step"] == 40
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("StochasticWeightAveraging")]
    after_fit = run.model.state_dict()
    for k, v in after_fit.items():
        assert torch.equal(state["average_model_state"][k], v), k  # the model after fit holds the average
    assert any(not torch.equal(ckpt["state_dict"][k], v) for k, v in after_fit.items())  # the checkpoint: trained
