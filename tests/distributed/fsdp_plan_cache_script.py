"""FSDP2 saves of one writer on 2 gloo ranks and the planning ``dcp.planned.save_planned`` reuses between them: a second
save of the same state reuses the global plan; a cast to another dtype and a rank without the cached plan (the
coordinator's cache lost: every rank plans again) are planned afresh; each checkpoint loads back what was saved."""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_model_state_dict  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from lightning_ckpt import CheckpointWriter, load_into  # noqa: E402
from lightning_ckpt import dcp as lc_dcp  # noqa: E402
from lightning_ckpt.dcp import planned  # noqa: E402


def main(d: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.arange(6.0) + 10 * i) for i in range(5)])
    fully_shard(model)
    w = CheckpointWriter(os.path.join(d, "ckpts"), async_save=False, dedup=False)
    out: dict = {"rank": rank, "saves": []}
    calls = {"global": 0, "gathers": 0}
    real_global = DefaultSavePlanner.create_global_plan

    def counted_global(self, plans):
        calls["global"] += 1
        return real_global(self, plans)

    DefaultSavePlanner.create_global_plan = counted_global
    real_gather = dist.gather_object

    def counted_gather(*a, **k):
        calls["gathers"] += 1
        return real_gather(*a, **k)

    dist.gather_object = counted_gather

    def save(step: int, label: str) -> None:
        calls["global"] = calls["gathers"] = 0
        state = {"state_dict": get_model_state_dict(model)}
        r = w.save(state, step=step).result()
        want = {k: v.full_tensor().clone() for k, v in state["state_dict"].items()}
        with torch.no_grad():
            for v in state["state_dict"].values():
                v.to_local().zero_()
        load_into(r.path, state)
        equal = all(torch.equal(state["state_dict"][k].full_tensor(), want[k]) for k in want)
        with open(os.path.join(r.path, "manifest.json")) as f:
            dtypes = sorted({t["dtype"] for t in json.load(f)["tensors"].values()})
        out["saves"].append({"label": label, "global_plans": calls["global"], "gathers": calls["gathers"],
                             "loaded_equal": equal, "dtypes": dtypes})

    save(1, "first")
    save(2, "same state")
    model.to(torch.float64)  # the same shapes in another dtype
    save(3, "cast")
    save(4, "cast again")
    if rank == 0:
        planned._PlanCache._all.clear()  # the coordinator lost its plans; rank 1 still names its plan by token
    save(5, "coordinator without the plans")
    save(6, "after")
    planned.CACHE_MAX_ITEMS = 0  # (every rank, caches emptied) plans too large to keep: planned at every save
    planned._PlanCache._all.clear()
    save(7, "too large to keep")
    save(8, "too large to keep, again")
    out["kept_before_close"] = sum(k[0] == w.writer_id for k in planned._PlanCache._all)
    w.close()  # drops this writer's planning
    out["kept_after_close"] = sum(k[0] == w.writer_id for k in planned._PlanCache._all)
    with open(os.path.join(d, f"out-{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
