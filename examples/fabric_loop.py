"""A Lightning Fabric training loop whose checkpoints are lightning_ckpt folders (CPU, a few seconds).

    python examples/fabric_loop.py --dir runs/fabric --steps 12 --every 4            # train, save every 4 steps
    python examples/fabric_loop.py --dir runs/fabric --steps 20 --every 4 --resume   # go on from the newest one
    torchrun --standalone --nproc_per_node 2 examples/fabric_loop.py --dir runs/fabric_ddp   # DDP, gloo
    lightning-ckpt ls runs/fabric && lightning-ckpt verify runs/fabric/step-000012

``Fabric(plugins=[LightningCkptIO()])`` is all it takes: ``fabric.save(path, state)`` writes a checkpoint folder
at ``path`` (checksummed, committed atomically; the frozen layer is stored once in the folder's content store and
referenced by every later checkpoint) and ``fabric.load(path, state)`` restores the model, the optimizer and the
plain values in place. ``--async-save`` returns from ``fabric.save`` once the state is copied, and writes in the
background. Under DDP, rank 0 writes the checkpoint (Fabric saves on rank 0) and every rank loads it.

Each step's batch is drawn from a generator seeded with the step number, so a resumed run trains on exactly the
batches the uninterrupted run would have: resuming is exact without saving a data position.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from lightning.fabric import Fabric  # noqa: E402
from torch import nn  # noqa: E402

from lightning_ckpt import LightningCkptIO, latest_checkpoint  # noqa: E402
from lightning_ckpt.demo import synthetic_regression  # noqa: E402


def build_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    model[0].requires_grad_(False)  # a "pretrained" frozen layer: deduplicated across checkpoints
    return model


def batch(x: torch.Tensor, y: torch.Tensor, step: int, size: int, rank: int, world: int):
    """The step's batch (the same at every run of this step), this rank's share of it."""
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1000 + step))[:size]
    idx = idx[rank::world]
    return x[idx], y[idx]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="the checkpoint folder")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--resume", action="store_true", help="go on from the newest checkpoint in --dir")
    ap.add_argument("--async-save", action="store_true")
    ap.add_argument("--out", help="rank 0 writes the final model and optimizer tensors here (safetensors)")
    a = ap.parse_args(argv)

    devices = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    io = LightningCkptIO(async_save=a.async_save)
    fabric = Fabric(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", plugins=[io])
    fabric.launch()
    x, y = synthetic_regression(512, 16, 4)
    model = build_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = fabric.setup(model, optimizer)
    state = {"model": model, "optimizer": optimizer, "step": 0}
    if a.resume:
        path = latest_checkpoint(a.dir)
        if path is not None:
            fabric.load(path, state)  # model, optimizer and step, in place
            fabric.print(f"resumed from {path} at step {state['step']}")
    while state["step"] < a.steps:
        xb, yb = batch(x, y, state["step"], 32, fabric.global_rank, fabric.world_size)
        loss = nn.functional.mse_loss(model(xb), yb)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        state["step"] += 1
        if state["step"] % a.every == 0:
            fabric.save(os.path.join(a.dir, f"step-{state['step']:06d}"), state)
            fabric.print(f"step {state['step']}: loss {loss.item():.4f}, saved")
    if a.out and fabric.global_rank == 0:
        from safetensors.torch import save_file

        tensors = {f"model/{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
        for pid, st in optimizer.state_dict()["state"].items():
            tensors.update({f"optim/{pid}/{k}": v.contiguous() for k, v in st.items() if torch.is_tensor(v)})
        save_file(tensors, a.out)
    io.teardown()  # waits for a background save and releases the folder's lock (the end of the process would too)
    return state


if __name__ == "__main__":
    main()
