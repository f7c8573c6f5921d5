"""Ray Train and Ray Tune (``lightning_ckpt/callbacks/ray.py``, docs/ray.md): a real local Ray runtime (2 CPUs), one for
the module. Ray Train: a 2-worker ``TorchTrainer`` over gloo with only ``PeriodicCheckpoint(resume="auto")``; Ray Tune:
population-based training whose trials share one folder. Plus the reference folder and the start decision, without
Ray."""
from __future__ import annotations

import glob
import json
import os
import random
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

import lightning_ckpt
from lightning_ckpt import PeriodicCheckpoint, RetentionPolicy, latest_checkpoint, load_checkpoint, verify_checkpoint
from lightning_ckpt.cli import main as cli_main
from lightning_ckpt.errors import CheckpointCorruptError, CheckpointNotFoundError
from lightning_ckpt.format.manifest import DIGEST
from lightning_ckpt.read import REFERENCE, is_checkpoint_dir, list_checkpoints, read_reference
from lightning_ckpt.store import open_store
from lightning_ckpt.folder.lineage import lineage_of

import support


TREE = os.path.dirname(os.path.dirname(lightning_ckpt.__file__))


@pytest.fixture(scope="module")
def ray_runtime():
    """One local Ray runtime for every test of the module: 2 CPUs, this tree first on the workers' path."""
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    path = os.pathsep.join([TREE, support.TESTS] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1", "RAY_TRAIN_V2_ENABLED": "1",
                                       # a failed worker is noticed in 0.25 s, not 2 s; no watcher threads
                                       "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
                                       "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                                       "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0"}})
    yield ray
    ray.shutdown()


def _weights(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def _ray_checkpoint_dirs(storage: str) -> list[str]:
    return sorted(d for d in glob.glob(os.path.join(storage, "**", "checkpoint_*"), recursive=True) if os.path.isdir(d))


def _dir_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


# ---------------------------------------------------------------------------------------------- Ray Train
def _train_func(config: dict) -> None:
    """A Ray Train worker: a 2-rank DDP fit with PeriodicCheckpoint(resume="auto") and nothing Ray-specific of ours.
    The first attempt fails at step 10 on every rank, after Ray registered the checkpoints of steps 4 and 8, and
    records its weights at step 10 (the uninterrupted run); the restarted attempt records its own at step 10."""
    import lightning.pytorch as pl
    import ray.train
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer

    from lightning_ckpt.demo import DemoDataModule, DemoModel

    root = config["root"]
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    given = ray.train.get_checkpoint()

    class Scripted(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step != 10:
                return
            first = not os.path.exists(os.path.join(root, "failed"))
            if trainer.is_global_zero:
                save_file(_weights(pl_module), os.path.join(root, "uninterrupted-10.safetensors" if first
                                                            else "resumed-10.safetensors"))
            if first:
                ray.train.get_all_reported_checkpoints()  # every report in flight is registered by Ray
                trainer.strategy.barrier()
                if trainer.is_global_zero:
                    open(os.path.join(root, "failed"), "w").close()
                raise RuntimeError("injected failure after the commits of steps 4 and 8")

    trainer = pl.Trainer(
        max_steps=14, accelerator="cpu", devices="auto", strategy=RayDDPStrategy(),
        plugins=[RayLightningEnvironment()], limit_val_batches=0, logger=False, enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[PeriodicCheckpoint(os.path.join(root, "ckpts"), every_n_train_steps=4, resume="auto"),
                   RetentionPolicy(os.path.join(root, "ckpts"), keep_last=2), Scripted()])
    trainer = prepare_trainer(trainer)
    trainer.fit(DemoModel(hidden=32), DemoDataModule(n_train=256, batch_size=16))
    if trainer.is_global_zero:
        with open(os.path.join(root, f"attempt-{len(glob.glob(os.path.join(root, 'attempt-*')))}.json"), "w") as f:
            json.dump({"given": None if given is None else given.path, "ckpt_path": str(trainer.ckpt_path)}, f)


@pytest.mark.slow
def test_ray_train_reports_references_and_a_restarted_worker_group_resumes_exactly(ray_runtime, tmp_path):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    root = str(tmp_path)
    storage = os.path.join(root, "ray")
    trainer = TorchTrainer(_train_func, train_loop_config={"root": root},
                           scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                           run_config=RunConfig(name="exp", storage_path=storage,
                                                failure_config=FailureConfig(max_failures=1)))
    result = trainer.fit()
    assert result.error is None
    ckpts = os.path.join(root, "ckpts")

    # Ray knows the last commit: result.checkpoint is a reference that loads it (digest checked)
    assert result.checkpoint is not None
    ref = read_reference(result.checkpoint.path)
    final = latest_checkpoint(ckpts)
    assert ref is not None and ref["path"] == final and ref["step"] == 14 and "final" in ref["tags"]
    assert is_checkpoint_dir(result.checkpoint.path)
    verify_checkpoint(result.checkpoint.path)
    got, want = load_checkpoint(result.checkpoint.path), load_checkpoint(final)
    assert got["global_step"] == 14
    assert all(torch.equal(got["state_dict"][k], want["state_dict"][k]) for k in want["state_dict"])

    # the restarted attempt started from the checkpoint Ray handed it (step 8) and went on exactly
    attempts = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(root, "attempt-*.json")))]
    assert len(attempts) == 1  # the first attempt failed before its end
    assert attempts[0]["ckpt_path"] == os.path.join(ckpts, "step=000008")
    assert read_reference(attempts[0]["given"])["step"] == 8
    a = load_file(os.path.join(root, "uninterrupted-10.safetensors"))
    b = load_file(os.path.join(root, "resumed-10.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len({lineage_of(c.manifest)["run"] for c in list_checkpoints(ckpts)}) == 1  # one run, continued

    # Ray stores references only: a few hundred bytes per reported checkpoint, none of the checkpoint's bytes
    dirs = _ray_checkpoint_dirs(storage)
    assert len(dirs) >= 4  # steps 4, 8 (first attempt), 12, 14
    sizes = [_dir_bytes(d) for d in dirs]
    assert max(sizes) < 1_000_000 and all(os.listdir(d) == [REFERENCE] for d in dirs)
    ours = sum(_dir_bytes(c.path) for c in list_checkpoints(ckpts))
    print(f"\nRay stores {max(sizes)} bytes per reported checkpoint (ours: {ours / len(list_checkpoints(ckpts)):.0f})")

    # our retention (keep_last=2) removed step 4; Ray's reference to it says so instead of loading something else
    old = [d for d in dirs if read_reference(d)["step"] == 4]
    assert old and not os.path.exists(os.path.join(ckpts, "step=000004"))
    with pytest.raises(CheckpointNotFoundError, match="retention"):
        load_checkpoint(old[0])


# ---------------------------------------------------------------------------------------------- Ray Tune
def _pbt_model(lr: float):
    from lightning_ckpt.demo import DemoModel

    return DemoModel(hidden=768, layers=2, frozen_layers=2, lr=lr)  # a frozen backbone, a trainable head


def _pbt_trainer(callbacks: list, **kw):
    return support.trainer(callbacks, max_steps=8, val_every=None, accelerator="cpu", devices=1, **kw)


def _trial(config: dict) -> None:
    """A Tune trial: a one-process fit into the study's one folder, under its own run_name."""
    import lightning.pytorch as pl
    import ray.tune

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    trial = ray.tune.get_context().get_trial_id()
    given = ray.tune.get_checkpoint()
    n = len(glob.glob(os.path.join(config["root"], f"start-{trial}-*.json")))
    with open(os.path.join(config["root"], f"start-{trial}-{n}.json"), "w") as f:  # Tune may stop it at any report
        json.dump({"trial": trial, "lr": config["lr"],
                   "given": None if given is None else read_reference(given.path)}, f)
    cb = PeriodicCheckpoint(config["folder"], every_n_train_steps=4, resume="auto", run_name=trial, async_save=False)
    trainer = _pbt_trainer([cb])
    trainer.fit(_pbt_model(config["lr"]), support.data(n_train=256, batch_size=16))


@pytest.mark.slow
def test_ray_tune_population_based_training_exploits_are_branches_of_one_folder(ray_runtime, tmp_path, capsys):
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    from lightning_ckpt.folder.lineage import lineage

    root, folder = str(tmp_path), str(tmp_path / "ckpts")
    random.seed(0)  # PBT's choices
    pbt = PopulationBasedTraining(time_attr="training_iteration", metric="train_loss", mode="min",
                                  perturbation_interval=1, quantile_fraction=0.25,
                                  hyperparam_mutations={"lr": [1e-5, 1e-4, 1e-3, 1e-2, 3e-2]})
    tuner = tune.Tuner(
        tune.with_resources(_trial, {"cpu": 2}),  # one trial at a time: the folder has one writer (its lock)
        param_space={"lr": tune.grid_search([1e-5, 1e-2, 3e-2, 1e-4]), "folder": folder, "root": root},
        tune_config=tune.TuneConfig(scheduler=pbt, reuse_actors=True),
        run_config=tune.RunConfig(name="pbt", storage_path=os.path.join(root, "ray"), verbose=0,
                                  stop={"training_iteration": 2}))
    results = tuner.fit()
    assert not results.errors

    # every exploit is a branch of the cloned trial's checkpoint, in the lineage of the one folder
    runs, nodes = [], {}

    def walk(rs):
        for r in rs:
            runs.append(r)
            nodes.update({n.name: (r, n) for n in r.checkpoints})
            walk(r.children)

    walk(lineage(folder))
    branches = [r for r in runs if r.branch]
    assert branches, "PBT exploited no trial"
    for br in branches:
        owner, parent = nodes[br.parent]
        assert owner.run_name != br.run_name and br.checkpoints  # another trial's checkpoint; the branch trained on
        # the bytes the exploit added (the branch's first checkpoint: its own files and new packs) against a full copy
        # of the checkpoint it cloned; Ray itself stored one reference for the exploit
        added, full = br.checkpoints[0].own_bytes, parent.total_bytes
        with capsys.disabled():
            print(f"\nexploit {br.run_name} <- {br.parent}: +{added} bytes against a full copy of {full} "
                  f"({100 * added / full:.1f}%)")
        assert added <= 0.05 * full
    assert cli_main(["lineage", folder]) == 0
    tree = capsys.readouterr().out
    for br in branches:  # `lightning-ckpt lineage` shows the exploit under the checkpoint it cloned
        assert f"({br.run_name}), branched from {br.parent}:" in tree, tree

    # a trial that was paused and resumed (never exploited) ended exactly where a straight run ends
    starts = [json.load(open(p)) for p in glob.glob(os.path.join(root, "start-*.json"))]
    exploited = {b.run_name for b in branches}
    resumed = sorted({(s["trial"], s["lr"]) for s in starts if s["given"] is not None
                      and s["given"]["run_name"] == s["trial"] and s["trial"] not in exploited})
    assert resumed, starts
    trial, lr = resumed[0]
    import lightning.pytorch as pl

    pl.seed_everything(0, verbose=False)
    straight = _pbt_trainer([], enable_checkpointing=False)  # as in the trial: the Trainer, then the model
    model = _pbt_model(lr)
    straight.fit(model, support.data(n_train=256, batch_size=16))
    mine = load_checkpoint(latest_checkpoint(folder, run_name=trial))["state_dict"]
    assert all(torch.equal(mine[k], v) for k, v in _weights(model).items())

    # Ray Tune's trial folders hold references only
    assert all(os.listdir(d) == [REFERENCE] for d in _ray_checkpoint_dirs(os.path.join(root, "ray")))


# ---------------------------------------------------------------------------------------------- without Ray
def _three_checkpoints(folder: str) -> list[str]:
    support.fit([PeriodicCheckpoint(folder, every_n_train_steps=2, async_save=False)], max_steps=6, val_every=None)
    return [c.path for c in list_checkpoints(folder)]


def _reference(path: str, **over) -> dict:
    from lightning_ckpt.read import read_checkpoint_manifest

    m = read_checkpoint_manifest(path)
    lin = lineage_of(m)
    ref = {"path": path, "name": os.path.basename(path), "step": int(m["step"]), DIGEST: m[DIGEST], "uri": None,
           "folder": os.path.dirname(path), "run_name": lin["run_name"], "lineage_run": lin["run"]}
    ref.update(over)
    return ref


def test_a_reference_folder_loads_its_checkpoint_and_says_why_it_cannot(tmp_path):
    from lightning_ckpt.callbacks.ray import write_reference

    first, _, third = _three_checkpoints(str(tmp_path / "ckpts"))
    ref = str(tmp_path / "ref")
    write_reference(ref, _reference(third))
    assert is_checkpoint_dir(ref)
    verify_checkpoint(ref)
    got, want = load_checkpoint(ref), load_checkpoint(third)
    assert all(torch.equal(got["state_dict"][k], v) for k, v in want["state_dict"].items())

    other = str(tmp_path / "other")  # another checkpoint under the reported name: refused, not loaded
    write_reference(other, _reference(third, **{DIGEST: "0" * 64}))
    with pytest.raises(CheckpointCorruptError, match="digest"):
        load_checkpoint(other)
    gone = str(tmp_path / "gone")
    write_reference(gone, _reference(first))
    open_store(os.path.dirname(first)).delete(os.path.basename(first))
    with pytest.raises(CheckpointNotFoundError, match="no longer"):
        load_checkpoint(gone)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / REFERENCE).write_text('{"path": 3}')
    assert is_checkpoint_dir(str(bad))  # so Lightning's ckpt_path hands it to us, and the load says what is wrong
    with pytest.raises(CheckpointCorruptError, match="not a checkpoint reference"):
        load_checkpoint(str(bad))

    # a reference is a ckpt_path: the fit resumes from the checkpoint it names (step 6)
    t = support.fit([PeriodicCheckpoint(str(tmp_path / "b"), every_n_train_steps=100)], ckpt_path=ref, max_steps=8,
                    val_every=None)
    assert t.global_step == 8 and load_checkpoint(latest_checkpoint(str(tmp_path / "b")))["global_step"] == 8


def test_the_start_under_ray_continues_the_run_from_its_newest_commit_or_branches_another_runs(tmp_path):
    from lightning_ckpt.callbacks.ray import _choose

    folder = str(tmp_path / "ckpts")
    first, second, third = _three_checkpoints(folder)
    session = types.SimpleNamespace(key=folder, dirpath=folder, run_name=None, staged_for=None,
                                    writer=types.SimpleNamespace(node_local=False))
    # Ray knows step 2 only (the worker died before reporting 4 and 6): the run goes on from its newest commit
    assert _choose(session, _reference(first)) == (third, False, False)
    # Ray hands another run's checkpoint (a PBT exploit): a branch of exactly that one
    assert _choose(session, _reference(second, run_name="trial-b")) == (second, True, False)
    # the reported checkpoint is gone and nothing newer of its run exists: a clear error, not a silent fresh start
    reported = _reference(first)
    store = open_store(folder)
    for p in (first, second, third):
        store.delete(os.path.basename(p))
    with pytest.raises(CheckpointNotFoundError, match="retention"):
        _choose(session, reported)


@pytest.mark.parametrize("stop, recorded", [(SystemExit(0), False), (RuntimeError("crash"), True)])
def test_a_stop_tune_asks_for_is_not_recorded_as_a_failed_run(tmp_path, stop, recorded):
    """Ray Tune pauses or ends a function trial by raising SystemExit(0) inside its report; `prune --failed` must not
    take that trial's checkpoints for a crashed run's."""
    import lightning.pytorch as pl

    class Stop(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                raise stop

    folder = str(tmp_path / "ckpts")
    with pytest.raises(type(stop)):
        support.fit([PeriodicCheckpoint(folder, every_n_train_steps=2, async_save=False), Stop()], max_steps=6,
                    val_every=None)
    assert len(list_checkpoints(folder)) == 1
    assert bool(glob.glob(os.path.join(folder, ".runs", "*.json"))) is recorded


def test_outside_ray_a_fit_never_imports_ray(forkserver, tmp_path):
    code = ("import sys, lightning.pytorch as pl\n"
            "from lightning_ckpt import PeriodicCheckpoint, load_checkpoint, latest_checkpoint\n"
            "from lightning_ckpt.demo import DemoDataModule, DemoModel\n"
            "pl.Trainer(max_steps=2, logger=False, enable_progress_bar=False, limit_val_batches=0,\n"
            "           callbacks=[PeriodicCheckpoint(sys.argv[1], every_n_train_steps=1)]).fit(DemoModel(), DemoDataModule())\n"
            "load_checkpoint(latest_checkpoint(sys.argv[1]))\n"
            "print('ray' in sys.modules)")
    out = support.run_python(["-c", code, str(tmp_path / "ckpts")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"
