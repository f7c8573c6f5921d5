"""Lightning Fabric with ``Fabric(plugins=[LightningCkptIO()])``: ``fabric.save`` writes checkpoint folders,
``fabric.load`` restores from them in place, in this process, in a fresh one, and under 2-rank DDP (gloo).

Real Fabric objects throughout; the fresh processes are the fork server's (``support.run_python``), the 2-rank run
is a real torchrun launch shared with the session's other healthy 2-rank runs (``support.shared.two_ranks``)."""
from __future__ import annotations

import os

import pytest
import torch
from lightning.fabric import Fabric
from safetensors.torch import load_file
from torch import nn

from lightning_ckpt import (LightningCkptIO, list_checkpoints, load_checkpoint, load_weights, merge_checkpoint,
                            verify_checkpoint)
from lightning_ckpt.writer import CheckpointWriter

from support import ROOT, run_python
from support.shared import two_ranks

pytestmark = pytest.mark.usefixtures("forkserver")

EXAMPLE = os.path.join(ROOT, "examples", "fabric_loop.py")

# the example under torchrun, 2 ranks, DDP on CPU (gloo), saving in the background: 8 steps; then the same command
# resumed to 12 steps in that folder (every rank loads rank 0's checkpoint); and 12 steps straight, to compare
fabric_ddp = two_ranks("fabric_ddp", EXAMPLE, lambda d: ["--dir", d / "ckpts", "--steps", "8", "--every", "4",
                                                          "--async-save", "--out", d / "final.safetensors"])
fabric_ddp_resumed = two_ranks("fabric_ddp_resumed", EXAMPLE, lambda d: [
    "--dir", d.parent / "fabric_ddp" / "ckpts", "--steps", "12", "--every", "4", "--resume", "--async-save",
    "--out", d / "final.safetensors"])
fabric_ddp_straight = two_ranks("fabric_ddp_straight", EXAMPLE, lambda d: [
    "--dir", d / "ckpts", "--steps", "12", "--every", "4", "--out", d / "final.safetensors"])


def model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    model[0].requires_grad_(False)
    return model, torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def fabric_of(**io) -> Fabric:
    return Fabric(accelerator="cpu", devices=1, plugins=[LightningCkptIO(**io)])


def train(fabric: Fabric, model, optimizer, steps: int) -> None:
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        loss = model(torch.randn(4, 8, generator=g)).pow(2).mean()
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()


def assert_same(a: nn.Module | torch.optim.Optimizer, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    if isinstance(a, nn.Module):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        return
    assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys()
    for pid, st in sa["state"].items():
        assert st.keys() == sb["state"][pid].keys()
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(sb["state"][pid][k])) for k, v in st.items())


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_fabric_save_writes_a_verified_deduplicated_folder_and_load_restores_in_place(tmp_path, async_save):
    fabric = fabric_of(async_save=async_save)
    model, optimizer = fabric.setup(*model_and_optimizer())
    d = tmp_path / "ckpts"
    for step in (2, 4, 6):
        train(fabric, model, optimizer, 2)
        fabric.save(d / f"step-{step:04d}", {"model": model, "optimizer": optimizer, "step": step, "tag": "run-a"})
    fresh, fresh_opt = model_and_optimizer(seed=1)
    fresh, fresh_opt = fabric.setup(fresh, fresh_opt)
    state = {"model": fresh, "optimizer": fresh_opt, "step": 0}
    rest = fabric.load(d / "step-0006", state)  # waits for a background save of that path
    assert rest == {"tag": "run-a"} and state["step"] == 6
    assert_same(fresh.module, model.module)
    assert_same(fresh_opt.optimizer, optimizer.optimizer)
    ckpts = list_checkpoints(str(d))
    assert [(c.name, c.step) for c in ckpts] == [("step-0002", 2), ("step-0004", 4), ("step-0006", 6)]
    for c in ckpts:
        verify_checkpoint(c.path)
        assert {"model-rank00000.safetensors", "optim-rank00000.safetensors"} <= set(c.manifest["files"])
    # the frozen layer, unchanged since the first save, is written once into the content store and referenced after
    packs = [set(c.manifest.get("packs") or {}) for c in ckpts]
    assert packs[0] == set() and packs[1] and packs[1] == packs[2]
    # the folder is the callbacks' layout: the model's own names, readable without Fabric
    assert set(load_checkpoint(ckpts[-1].path)["state_dict"]) == set(model.module.state_dict())
    plain, _ = model_and_optimizer(seed=3)
    load_weights(ckpts[-1].path, plain)
    assert_same(plain, model.module)
    merge_checkpoint(ckpts[-1].path, str(tmp_path / "merged" / "model.safetensors"))
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert merged.keys() == model.module.state_dict().keys()
    assert all(torch.equal(merged[k], v) for k, v in model.module.state_dict().items())
    fabric.strategy.checkpoint_io.teardown()


def test_fabric_checkpoint_loads_in_a_fresh_process_and_the_cli_reads_it(tmp_path):
    """Save here, load in another process (the fork server): equal weights and optimizer state."""
    fabric = fabric_of()
    model, optimizer = fabric.setup(*model_and_optimizer())
    train(fabric, model, optimizer, 3)
    path = tmp_path / "ckpts" / "step-0003"
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 3})
    fabric.strategy.checkpoint_io.teardown()
    out = tmp_path / "loaded.pt"
    script = f"""
import torch, sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_fabric import fabric_of, model_and_optimizer
fabric = fabric_of()
model, optimizer = fabric.setup(*model_and_optimizer(seed=5))
state = {{"model": model, "optimizer": optimizer, "step": 0}}
fabric.load({str(path)!r}, state)
torch.save({{"model": model.module.state_dict(), "optimizer": optimizer.optimizer.state_dict(),
            "step": state["step"]}}, {str(out)!r})
"""
    p = run_python(["-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    assert got["step"] == 3
    fresh, fresh_opt = model_and_optimizer(seed=5)
    fresh.load_state_dict(got["model"])
    fresh_opt.load_state_dict(got["optimizer"])
    assert_same(fresh, model.module)
    assert_same(fresh_opt, optimizer.optimizer)
    for argv in (["ls", str(tmp_path / "ckpts")], ["verify", str(path)], ["show", str(path)]):
        p = run_python(["-m", "lightning_ckpt.cli", *argv], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and "step-0003" in p.stdout, (argv, p.stdout, p.stderr)


def test_an_async_save_at_the_end_of_a_script_is_committed_at_exit(tmp_path):
    """The script ends right after ``fabric.save`` (async, no teardown): the save still commits. Before, its writer
    thread failed at interpreter exit ("cannot schedule new futures after interpreter shutdown") and nothing was
    committed."""
    path = tmp_path / "c" / "last"
    script = f"""
import torch
from lightning.fabric import Fabric
from lightning_ckpt import LightningCkptIO
fabric = Fabric(accelerator="cpu", devices=1, plugins=[LightningCkptIO(async_save=True)])
model = fabric.setup(torch.nn.Linear(1000, 1000))
fabric.save({str(path)!r}, {{"model": model, "step": 1}})
"""
    p = run_python(["-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "failed" not in p.stderr, p.stderr[-3000:]
    verify_checkpoint(str(path))
    assert list_checkpoints(str(tmp_path / "c"))[0].step == 1


def test_several_modules_and_optimizers_round_trip(tmp_path):
    fabric = fabric_of()
    (enc, enc_opt), (head, head_opt) = model_and_optimizer(1), model_and_optimizer(2)
    enc, enc_opt = fabric.setup(enc, enc_opt)
    head, head_opt = fabric.setup(head, head_opt)
    train(fabric, enc, enc_opt, 2)
    train(fabric, head, head_opt, 3)
    state = {"enc": enc, "head": head, "enc_opt": enc_opt, "head_opt": head_opt, "cfg": {"lr": 0.01, "n": [1, 2]}}
    fabric.save(tmp_path / "c" / "both", state)
    ck = load_checkpoint(str(tmp_path / "c" / "both"))
    assert any(k.startswith("enc.") for k in ck["state_dict"]) and any(k.startswith("head.") for k in ck["state_dict"])
    (e2, eo2), (h2, ho2) = model_and_optimizer(3), model_and_optimizer(4)
    e2, eo2 = fabric.setup(e2, eo2)
    h2, ho2 = fabric.setup(h2, ho2)
    back = {"enc": e2, "head": h2, "enc_opt": eo2, "head_opt": ho2, "cfg": None}
    assert fabric.load(tmp_path / "c" / "both", back) == {}
    assert back["cfg"] == {"lr": 0.01, "n": [1, 2]}
    for a, b in ((e2, enc), (h2, head), (eo2, enc_opt), (ho2, head_opt)):
        assert_same(getattr(a, "module", getattr(a, "optimizer", a)), getattr(b, "module", getattr(b, "optimizer", b)))
    fabric.strategy.checkpoint_io.teardown()


def test_fabric_save_never_overwrites_and_refuses_names_that_are_not_plain(tmp_path):
    fabric = fabric_of()
    model, optimizer = fabric.setup(*model_and_optimizer())
    fabric.save(tmp_path / "c" / "last", {"model": model})
    before = load_checkpoint(str(tmp_path / "c" / "last"))["state_dict"]
    train(fabric, model, optimizer, 1)
    with pytest.raises(ValueError, match="never overwritten"):
        fabric.save(tmp_path / "c" / "last", {"model": model})
    with pytest.raises(ValueError, match="not a plain name"):
        fabric.save(tmp_path / "c" / ".hidden", {"model": model})
    with pytest.raises(ValueError, match="lightning-ckpt push"):
        fabric.save("s3://bucket/run/step-1", {"model": model})
    after = load_checkpoint(str(tmp_path / "c" / "last"))["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)  # the earlier checkpoint is intact
    fabric.strategy.checkpoint_io.remove_checkpoint(tmp_path / "c" / "last")
    assert list_checkpoints(str(tmp_path / "c")) == []
    fabric.strategy.checkpoint_io.teardown()


def test_trainer_checkpoints_still_go_to_the_wrapped_io(tmp_path):
    """A Trainer's checkpoint dictionary (Lightning's ModelCheckpoint, trainer.save_checkpoint) is not Fabric's
    state: the IO hands it to the wrapped TorchCheckpointIO, as before."""
    io = LightningCkptIO()
    io.save_checkpoint({"pytorch-lightning_version": "2.6", "state_dict": {"w": torch.ones(2)}}, tmp_path / "x.ckpt")
    assert os.path.isfile(tmp_path / "x.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "x.ckpt", weights_only=True)["state_dict"]["w"], torch.ones(2))


def test_the_example_resumes_exactly(tmp_path):
    """examples/fabric_loop.py: 8 steps straight vs 4 steps then a resumed run to 8 (fresh processes): bitwise the
    same model and optimizer state."""
    def run(*args: str) -> None:
        p = run_python([EXAMPLE, *args], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]

    run("--dir", str(tmp_path / "a"), "--steps", "8", "--every", "4", "--out", str(tmp_path / "a.safetensors"))
    run("--dir", str(tmp_path / "b"), "--steps", "4", "--every", "4")
    run("--dir", str(tmp_path / "b"), "--steps", "8", "--every", "4", "--resume", "--async-save",
        "--out", str(tmp_path / "b.safetensors"))
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [c.step for c in list_checkpoints(str(tmp_path / "b"))] == [4, 8]


def test_two_rank_ddp_fabric_saves_on_rank_zero_and_every_rank_resumes(fabric_ddp, fabric_ddp_resumed,
                                                                         fabric_ddp_straight):
    ckpts = list_checkpoints(str(fabric_ddp / "ckpts"))
    assert [c.step for c in ckpts] == [4, 8, 12]  # 4 and 8 by the first run, 12 by the resumed one
    for c in ckpts:
        verify_checkpoint(c.path)
        assert c.manifest["world_size"] == 1  # Fabric saves on rank 0: the writer works alone
    # what the first run's rank 0 had at step 8 is what its checkpoint holds
    final8 = load_file(str(fabric_ddp / "final.safetensors"))
    ck = load_checkpoint(ckpts[1].path)
    flat = {f"model/{k}": v for k, v in ck["state_dict"].items()}
    flat.update({f"optim/{pid}/{n}": v for pid, st in ck["optimizer_states"][0]["state"].items()
                 for n, v in st.items() if torch.is_tensor(v)})
    assert flat.keys() == final8.keys() and all(torch.equal(flat[k], final8[k]) for k in flat)
    # both ranks loaded step 8 and went on exactly as the straight 2-rank run did (DDP keeps the ranks equal)
    a, b = load_file(str(fabric_ddp_resumed / "final.safetensors")), load_file(str(fabric_ddp_straight / "final.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_writer_alone_ignores_the_process_group(tmp_path):
    """``alone=True`` never creates or uses a process group (Fabric calls the IO on rank 0 only)."""
    w = CheckpointWriter(str(tmp_path), alone=True)
    assert (w.rank, w.world_size, w.pg) == (0, 1, None)
    w.close()
