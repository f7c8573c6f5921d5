"""FSDP2 (fully_shard) on CPU with gloo under torchrun: every rank writes only its own shards; reload at 2 ranks."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard  # noqa: E402

from lightning_ckpt import CheckpointWriter, load_into  # noqa: E402


def build():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    for layer in m:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(m)
    return m, torch.optim.Adam(m.parameters(), lr=1e-2)


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    if not dist.is_initialized():  # initialized already: an earlier run of a shared launch (tests/support/shared.py)
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    m, opt = build()
    for i in range(3):
        torch.manual_seed(100 + i)
        m(torch.randn(4, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    state = {"state_dict": get_model_state_dict(m), "optimizer_states": [get_optimizer_state_dict(m, opt)], "global_step": 3}
    w = CheckpointWriter(os.path.join(out, "ckpts"), async_save=(mode == "async"))
    w.save(state, step=3, epoch=0)
    w.close()
    full = get_model_state_dict(m, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        save_file({k: v.contiguous() for k, v in full.items()}, os.path.join(out, "full.safetensors"))
    # reload into a fresh sharded model at the same world size
    m2, opt2 = build()
    state2 = {"state_dict": get_model_state_dict(m2), "optimizer_states": [get_optimizer_state_dict(m2, opt2)]}
    load_into(os.path.join(out, "ckpts", "step=000003"), state2)
    for k, v in state["state_dict"].items():
        assert torch.equal(v.to_local(), state2["state_dict"][k].to_local()), k
    exp = state["optimizer_states"][0]["state"]
    got = state2["optimizer_states"][0]["state"]
    for p_name, st in exp.items():
        for k, v in st.items():
            a = v.to_local() if hasattr(v, "to_local") else v
            b = got[p_name][k].to_local() if hasattr(got[p_name][k], "to_local") else got[p_name][k]
            assert torch.equal(a, b), (p_name, k)
    dist.barrier()
    if rank == 0:
        print("FSDP-OK")
    if not os.environ.get("LC_TEST_SHARED_LAUNCH"):  # else the next run of the shared launch uses the group
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
