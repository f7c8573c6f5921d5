"""FSDP1's sharded state dict holds ``ShardedTensor``s (Lightning's ``FSDPStrategy(state_dict_type="sharded")``).
torch's FSDP1 itself needs a GPU, so this builds the same kind of state directly, on CPU/gloo under torchrun: every
rank owns rows [4r, 4r+4) of each tensor. Saves it (sync and async), then loads it back into fresh ShardedTensors.

    torchrun --standalone --nproc_per_node 2 tests/distributed/sharded_tensor_script.py OUT
"""
from __future__ import annotations

import gc
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed._shard.metadata import ShardMetadata  # noqa: E402
from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards  # noqa: E402

from lightning_ckpt import CheckpointWriter, load_into  # noqa: E402


def sharded(rank: int, world: int, seed: float, cols: int = 3):
    local = torch.arange(4 * cols, dtype=torch.float32).reshape(4, cols) + 100 * rank + seed
    md = ShardMetadata(shard_offsets=[4 * rank, 0], shard_sizes=[4, cols], placement=f"rank:{rank}/cpu")
    return init_from_local_shards([Shard(local, md)], [4 * world, cols])


def state(rank: int, world: int, seed: float) -> dict:
    return {
        "state_dict": {"layer.weight": sharded(rank, world, seed), "layer.bias": torch.full((2,), seed)},
        "optimizer_states": [{"state": {"layer.weight": {"exp_avg": sharded(rank, world, seed + 0.5, 5)}},
                              "param_groups": [{"lr": 0.1, "params": ["layer.weight"]}]}],
        "global_step": 3,
    }


def local(t):
    return t.local_shards()[0].tensor if hasattr(t, "local_shards") else t


def main() -> None:
    out = sys.argv[1]
    if not dist.is_initialized():  # initialized already: an earlier run of a shared launch (tests/support/shared.py)
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    saved = state(rank, world, 0.0)
    for mode in ("sync", "async"):
        w = CheckpointWriter(os.path.join(out, mode), async_save=mode == "async")
        w.save(saved, step=3)
        w.close()
        fresh = state(rank, world, 7.0)
        load_into(os.path.join(out, mode, "step=000003"), fresh)
        for a, b in ((saved["state_dict"]["layer.weight"], fresh["state_dict"]["layer.weight"]),
                     (saved["state_dict"]["layer.bias"], fresh["state_dict"]["layer.bias"]),
                     (saved["optimizer_states"][0]["state"]["layer.weight"]["exp_avg"],
                      fresh["optimizer_states"][0]["state"]["layer.weight"]["exp_avg"])):
            assert torch.equal(local(a), local(b)), mode
        del fresh
    dist.barrier()
    if rank == 0:
        print("SHARDED-TENSOR-OK")
    del saved
    gc.collect()  # ShardedTensors still alive when the process group goes away can abort the process (torch)
    if not os.environ.get("LC_TEST_SHARED_LAUNCH"):  # else the next run of the shared launch uses the group
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
