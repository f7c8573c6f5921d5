"""The YAML recipes in configs/ run through LightningCLI exactly as a user runs them."""
from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from lightning_ckpt import latest_checkpoint, list_checkpoints, verify_checkpoint

from support import ROOT, run_python

pytestmark = pytest.mark.usefixtures("forkserver")

CLI = os.path.join(ROOT, "examples", "cli.py")


def run_cli(cwd, *args, ok=True) -> subprocess.CompletedProcess:
    p = run_python([CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    if ok:
        assert p.returncode == 0, p.stderr[-4000:]
    return p


def config(name: str) -> str:
    return os.path.join(ROOT, "configs", name)


@pytest.mark.smoke
def test_periodic_recipe_and_resume_from_the_command_line(tmp_path):
    run_cli(tmp_path, "fit", "--config", config("periodic.yaml"))
    d = tmp_path / "runs" / "periodic"
    assert [(c.step, c.tags) for c in list_checkpoints(str(d))] == [(50, ["periodic"]), (100, ["periodic"]), (120, ["final"])]
    # resume from the command line, training further
    run_cli(tmp_path, "fit", "--config", config("periodic.yaml"), "--trainer.max_steps", "160", "--ckpt_path", str(d / "step=000120"))
    assert [c.step for c in list_checkpoints(str(d))] == [50, 100, 120, 150, 160]
    m = list_checkpoints(str(d))[-1].manifest
    assert m["resumed_from"].endswith("step=000120")


def test_best_early_stop_recipe(tmp_path):
    run_cli(tmp_path, "fit", "--config", config("best_early_stop.yaml"))
    ckpts = list_checkpoints(str(tmp_path / "runs" / "best_early_stop"))
    tags = [t for c in ckpts for t in c.tags]
    assert "early-stop" in tags and "best" in tags
    assert max(c.step for c in ckpts) < 400  # stopped early
    best_only = [c for c in ckpts if c.tags == ["best"]]
    assert len(best_only) <= 2


def test_retention_recipe(tmp_path):
    run_cli(tmp_path, "fit", "--config", config("retention.yaml"))
    steps = [c.step for c in list_checkpoints(str(tmp_path / "runs" / "retention"))]
    assert steps == [50, 100, 110, 120]


def test_full_recipe(tmp_path):
    run_cli(tmp_path, "fit", "--config", config("full.yaml"))
    d = str(tmp_path / "runs" / "full")
    ckpts = list_checkpoints(d)
    assert ckpts and sum(c.size_bytes for c in ckpts) <= 50_000_000
    for c in ckpts:
        verify_checkpoint(c.path)
    assert len({c.step for c in ckpts}) == len(ckpts)  # one checkpoint per step, whatever fired
    assert latest_checkpoint(d) == ckpts[-1].path
    export = tmp_path / "runs" / "full" / "export"
    cfg = yaml.safe_load((export / "config.yaml").read_text())  # the resolved LightningCLI config
    assert cfg["model"]["hidden"] == 64 and cfg["trainer"]["max_steps"] == 300
    assert (export / "model.safetensors").is_file() and (export / "MODEL_CARD.md").is_file()


def _write_variant(tmp_path, base: str, edit) -> str:
    with open(config(base)) as f:
        cfg = yaml.safe_load(f)
    edit(cfg)
    out = tmp_path / f"variant-{base}"
    out.write_text(yaml.safe_dump(cfg))
    return str(out)


def test_bad_value_in_yaml_fails_with_a_clear_message(tmp_path):
    def edit(cfg):
        cfg["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = "often"

    p = run_cli(tmp_path, "fit", "--config", _write_variant(tmp_path, "periodic.yaml", edit), ok=False)
    assert p.returncode != 0
    assert "every_n_train_steps" in p.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "base, edit, message",
    [
        ("periodic.yaml", lambda c: c["trainer"]["callbacks"][0]["init_args"].update(every_n_epochs=1), "every_n_train_steps and every_n_epochs"),
        ("retention.yaml", lambda c: c["trainer"]["callbacks"][1]["init_args"].update(keep_best=2), "keep_best is set but monitor is not"),
        ("best_early_stop.yaml", lambda c: c["trainer"]["callbacks"][0]["init_args"].update(mode="biggest"), "mode"),
    ],
)
def test_conflicting_options_fail_before_training(tmp_path, base, edit, message):
    p = run_cli(tmp_path, "fit", "--config", _write_variant(tmp_path, base, edit), ok=False)
    assert p.returncode != 0
    assert message in p.stderr
    assert not (tmp_path / "runs").exists(), "training started"


def test_finetune_and_branch_recipes_share_the_frozen_layers(tmp_path):
    from lightning_ckpt.store.blobs import BlobStore
    from lightning_ckpt.folder.lineage import lineage

    run_cli(tmp_path, "fit", "--config", config("finetune.yaml"))
    d = tmp_path / "runs" / "finetune"
    assert [c.name for c in list_checkpoints(str(d))] == ["step=000030", "step=000040"]
    run_cli(tmp_path, "fit", "--config", config("finetune_branch.yaml"))
    names = [c.name for c in list_checkpoints(str(d))]
    assert names == ["step=000030", "step=000040", "lr-high-step=000050", "lr-high-step=000060"]
    for c in list_checkpoints(str(d)):
        verify_checkpoint(c.path)
    assert len(BlobStore(str(d)).names()) == 1  # the frozen layers, once for both runs
    branch = list_checkpoints(str(d))[-1].manifest
    assert branch["hparams"]["lr"] == 0.05 and branch["lineage"]["parent"] == "step=000030"
    [root] = lineage(str(d))
    assert [r.run_name for r in root.children] == ["lr-high"]
    # relaunching the branch with a larger max_steps continues it
    run_cli(tmp_path, "fit", "--config", config("finetune_branch.yaml"), "--trainer.max_steps", "70")
    assert latest_checkpoint(str(d), run_name="lr-high").endswith("lr-high-step=000070")
