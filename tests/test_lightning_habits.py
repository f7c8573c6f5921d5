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
    t = trainer(max_steps=6, default_root_dir=str(tmp_path))  # (Lightning writes its own .ckpt there)
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


# ------------------------------------------------------------------ ckpt_path="last"/"best", default dirpath, mixing
from lightning_ckpt import BestMetricCheckpoint, RetentionPolicy, list_checkpoints  # noqa: E402
from lightning_ckpt.errors import FolderNotEmptyError  # noqa: E402


class ValLoss(DemoModel):
    """val_loss follows a script (one value per validation), so which checkpoint is best is known."""

    script = [0.5, 0.2, 0.4, 0.3, 0.6, 0.7]

    def validation_step(self, batch, batch_idx):
        v = self.script[min(self.trainer.global_step // 2 - 1, len(self.script) - 1)]
        self.log("val_loss", torch.tensor(v))


def _fit_best(d, max_steps, *, first="periodic", ckpt_path=None, **kw):
    cbs = [PeriodicCheckpoint(d, every_n_train_steps=2, **kw), BestMetricCheckpoint(d, monitor="val_loss", top_k=2)]
    if first != "periodic":
        cbs.reverse()
    t = trainer(cbs, max_steps=max_steps, limit_val_batches=1, val_check_interval=2, check_val_every_n_epoch=None)
    model = ValLoss(hidden=16, dropout=0.0)
    t.fit(model, DemoDataModule(n_train=64, batch_size=4), ckpt_path=ckpt_path)
    return t, model, cbs


def test_ckpt_path_last_resumes_the_newest_checkpoint_in_a_new_trainer(tmp_path):
    d = str(tmp_path / "ck")
    _fit_best(d, 6)
    before = [c.name for c in list_checkpoints(d)]
    t, model, _ = _fit_best(d, 10, ckpt_path="last")
    assert t.ckpt_path == latest_checkpoint(d) or t.ckpt_path.endswith("step=000006")
    names = [c.name for c in list_checkpoints(d)]
    assert not any(n.endswith("-v2") for n in names), names  # resumed at step 6, not from step 0 next to the old run
    assert "step=000010" in names and set(before) - {"step=000002"} <= set(names) | {"step=000004"}
    # validate(ckpt_path="last") on a new Trainer evaluates the trained weights, not fresh ones
    t2 = trainer([PeriodicCheckpoint(d, every_n_train_steps=2)], limit_val_batches=1)
    fresh = ValLoss(hidden=16, dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t2.validate(fresh, DemoDataModule(), ckpt_path="last", verbose=False)
    assert t2.ckpt_path.endswith("step=000010") and _same(fresh, model)


@pytest.mark.parametrize("first", ["periodic", "best"])
def test_ckpt_path_best_whatever_the_callback_order_and_in_a_new_trainer(tmp_path, first):
    d = str(tmp_path / "ck")
    _fit_best(d, 12, first=first)
    # val_loss by step: 2->0.5 4->0.2 6->0.4 8->0.3 10->0.6 12->0.7: the best is step 4
    t = trainer([PeriodicCheckpoint(d, every_n_train_steps=2), BestMetricCheckpoint(d, monitor="val_loss", top_k=2)][
        ::(1 if first == "periodic" else -1)], limit_val_batches=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.validate(ValLoss(hidden=16, dropout=0.0), DemoDataModule(), ckpt_path="best", verbose=False)
    assert t.ckpt_path.endswith("step=000004")
    # a Trainer with only a PeriodicCheckpoint: the rule comes from the manifests
    t = trainer([PeriodicCheckpoint(d, every_n_train_steps=2)], limit_val_batches=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.validate(ValLoss(hidden=16, dropout=0.0), DemoDataModule(), ckpt_path="best", verbose=False)
    assert t.ckpt_path.endswith("step=000004")
    assert t.callbacks[0].best_model_path.endswith("step=000004") if hasattr(t.callbacks[0], "best_model_path") else True


def test_ckpt_path_best_skips_a_corrupt_best(tmp_path):
    d = str(tmp_path / "ck")
    _fit_best(d, 8)
    best = os.path.join(d, "step=000004")
    victim = next(f for f in os.listdir(best) if f.startswith("model-"))
    with open(os.path.join(best, victim), "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\xff" * 8)
    t = trainer([PeriodicCheckpoint(d, every_n_train_steps=2)], limit_val_batches=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.validate(ValLoss(hidden=16, dropout=0.0), DemoDataModule(), ckpt_path="best", verbose=False)
    assert t.ckpt_path.endswith("step=000008")  # 0.3: the second best


def test_ls_marks_the_current_best_and_not_one_that_fell_out(tmp_path, capsys):
    d = str(tmp_path / "ck")
    _fit_best(d, 12)
    capsys.readouterr()
    assert main(["ls", d]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("step=")}
    assert "best #1" in lines["step=000004"] and "best #2" in lines["step=000008"]
    # step 2 (0.5) entered the top-2 and fell out; it is kept by PeriodicCheckpoint, so it is listed, not as best
    assert "was best" in lines["step=000002"] and "best #" not in lines["step=000002"]
    assert "best now: step=000004" in out


def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused_with_the_choices(tmp_path):
    d = str(tmp_path / "ck")
    _fit_best(d, 4)
    names = sorted(os.listdir(d))
    with pytest.raises(FolderNotEmptyError) as e:
        _fit_best(d, 4)
    msg = str(e.value)
    assert "ckpt_path='last'" in msg and "resume='auto'" in msg and "allow_existing=True" in msg and "dirpath" in msg
    assert sorted(os.listdir(d)) == names  # nothing written, nothing deleted
    _fit_best(d, 6, allow_existing=True)  # the explicit opt-in
    _fit_best(d, 8, resume="auto")  # resuming is no fresh start


def test_default_dirpath_is_default_root_dir_checkpoints(tmp_path):
    t = trainer([PeriodicCheckpoint(every_n_train_steps=2), RetentionPolicy(keep_last=1)], max_steps=6,
                default_root_dir=str(tmp_path))
    t.fit(DemoModel(hidden=8), DemoDataModule(n_train=64, batch_size=8))
    names = [c.name for c in list_checkpoints(str(tmp_path / "checkpoints"))]
    assert names == ["step=000006"]


def test_verbose_prints_one_line_per_save_and_deletion_and_is_quiet_without(tmp_path):
    import logging

    lines: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    lg = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # where Lightning prints its own lines
    h = Grab(level=logging.INFO)
    lg.addHandler(h)
    level = lg.level
    lg.setLevel(logging.INFO)
    try:
        d = str(tmp_path / "v")
        trainer([PeriodicCheckpoint(d, every_n_train_steps=2), RetentionPolicy(d, keep_last=1)], max_steps=4).fit(
            DemoModel(hidden=8), DemoDataModule(n_train=64, batch_size=8))
        saved = [ln for ln in lines if ln.startswith("lightning_ckpt: saved ")]
        assert len(saved) == 2 and all("training paused" in ln and "MB written" in ln for ln in saved), lines
        assert [ln for ln in lines if ln.startswith("lightning_ckpt: deleted ")] == [
            f"lightning_ckpt: deleted {os.path.join(d, 'step=000002')} (retention policy)"]
        lines.clear()
        q = str(tmp_path / "q")
        trainer([PeriodicCheckpoint(q, every_n_train_steps=2, verbose=False)], max_steps=4).fit(
            DemoModel(hidden=8), DemoDataModule(n_train=64, batch_size=8))
        assert not [ln for ln in lines if ln.startswith("lightning_ckpt:")], lines
    finally:
        lg.removeHandler(h)
        lg.setLevel(level)
