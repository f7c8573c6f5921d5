"""A Lightning user's habits with checkpoint folders: ``load_from_checkpoint``, ``ckpt_path=<folder>`` without the
plugin, ``load_module``, a ``.ckpt`` that strict readers accept, and a Hugging Face folder for a transformers model."""
from __future__ import annotations

import os
import warnings

import lightning.pytorch as pl
import pytest
import torch

from lightning_ckpt import CheckpointMismatchError, PeriodicCheckpoint, latest_checkpoint, load_module
from lightning_ckpt.cli import main
from lightning_ckpt.demo import DemoDataModule, DemoModel
from lightning_ckpt.tools.convert import convert_to_lightning
from lightning_ckpt.tools.export import export_hf


def trainer(callbacks=(), **kw) -> pl.Trainer:
    kw.setdefault("limit_val_batches", 0)
    return pl.Trainer(callbacks=list(callbacks), logger=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("run"))
    model = DemoModel(hidden=24, dropout=0.0)
    trainer([PeriodicCheckpoint(d, every_n_train_steps=2)], max_steps=4).fit(model, DemoDataModule())
    return d, latest_checkpoint(d), model


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_load_from_checkpoint_and_load_module_read_a_folder(run):
    _, path, model = run
    got = DemoModel.load_from_checkpoint(path)
    assert got.hparams.hidden == 24 and _same(got, model)
    got = load_module(DemoModel, path, lr=0.5)  # hyper-parameter overrides, as load_from_checkpoint takes them
    assert got.hparams.lr == 0.5 and got.hparams.hidden == 24 and _same(got, model)
    with pytest.raises(CheckpointMismatchError):
        from lightning_ckpt import load_weights

        load_weights(path, DemoModel(hidden=8))


def test_validate_and_test_with_a_folder_need_no_plugin(run):
    _, path, model = run
    t = trainer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = t.validate(DemoModel(hidden=24), DemoDataModule(), ckpt_path=path, verbose=False)
    ref = trainer().validate(model, DemoDataModule(), verbose=False)
    assert res == ref


def test_convert_writes_a_ckpt_that_strict_readers_and_lightning_accept(run, tmp_path):
    _, path, model = run
    out = str(tmp_path / "model.ckpt")
    assert main(["convert", path, out]) == 0
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4 and "lightning_ckpt" not in ckpt
    assert _same(DemoModel.load_from_checkpoint(out), model)
    t = trainer(max_steps=6)
    t.fit(DemoModel(hidden=24, dropout=0.0), DemoDataModule(), ckpt_path=out)
    assert t.global_step == 6
    assert main(["convert", path, str(tmp_path)]) == 2  # a folder is not a file to write


def test_export_a_transformers_model_as_a_hugging_face_folder(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = GPT2LMHeadModel(cfg)

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randint(0, 50, (32, 16))), batch_size=8)
    d = str(tmp_path / "run")
    lm = LM()
    trainer([PeriodicCheckpoint(d, every_n_train_steps=3)], max_steps=3).fit(lm, data)
    out = export_hf(latest_checkpoint(d), str(tmp_path / "hf"), GPT2LMHeadModel(cfg))
    assert {"config.json", "model.safetensors"} <= set(os.listdir(out))
    back = GPT2LMHeadModel.from_pretrained(out)
    assert _same(back, lm.model)
    assert back.lm_head.weight is back.transformer.wte.weight  # tied embeddings stay one tensor
    with pytest.raises(CheckpointMismatchError, match="prefix"):
        export_hf(latest_checkpoint(d), str(tmp_path / "hf2"), GPT2LMHeadModel(cfg), prefix="nope.")
