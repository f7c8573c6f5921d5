"""FSDP2 saves through ``dcp.planned.save_planned`` on 2 gloo ranks, where one rank fails: in its local plan, in its write.
Every rank must raise, nothing may be committed, and the next save must commit and load back (reply paths "same"
and "plan" both taken: DTensor shards plus a replicated plain tensor that DCP deduplicates). Then loads where one
rank fails to read, or to plan (``dcp.planned.load_planned``): every rank must raise."""
from __future__ import annotations

import contextlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_model_state_dict  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from lightning_ckpt import CheckpointWriter, list_checkpoints, load_into  # noqa: E402
from lightning_ckpt import dcp as lc_dcp  # noqa: E402
from lightning_ckpt.dcp import planned  # noqa: E402


def main(d: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.arange(6.0) + 10 * i) for i in range(5)])
    fully_shard(model)
    state = {"state_dict": dict(get_model_state_dict(model), buf=torch.arange(3.0))}  # buf: replicated, plain
    folder = os.path.join(d, "ckpts")
    w = CheckpointWriter(folder, async_save=False, dedup=False)
    out: dict = {"rank": rank}
    replies: list = []
    real_reply = planned._plan_reply

    def counted_reply(g, p):  # (the coordinator's) which reply each rank got
        r = real_reply(g, p)
        replies.append(r[0])
        return r

    planned._plan_reply = counted_reply

    def attempt(label: str, run) -> None:
        try:
            run()
            out[label] = "ok"
        except BaseException as e:  # noqa: BLE001
            out[label] = f"{type(e).__name__}: {e}"

    def save(step: int):
        return lambda: w.save(state, step=step).result()

    def load():
        load_into(list_checkpoints(folder)[-1].path, state)

    @contextlib.contextmanager
    def failing(cls, attr: str, on_rank: int, exc: BaseException):
        """``cls.attr`` raises ``exc`` on rank ``on_rank`` while the block runs."""
        real = getattr(cls, attr)

        def bad(self, *a):
            if rank == on_rank:
                raise exc
            return real(self, *a)

        setattr(cls, attr, bad)
        try:
            yield
        finally:
            setattr(cls, attr, real)

    with failing(DefaultSavePlanner, "create_local_plan", 1, RuntimeError("injected plan failure")):
        attempt("plan_failure", save(1))
    with failing(lc_dcp.LCStorageWriter, "write_chunks", 1, OSError(28, "injected: no space left on device")):
        attempt("write_failure", save(2))
    dist.barrier()
    out["committed_after_failures"] = [c.name for c in list_checkpoints(folder)]
    attempt("good", save(3))
    w.close()
    dist.barrier()
    out["committed"] = [c.name for c in list_checkpoints(folder)]
    out["replies"] = replies
    full = lambda v: v.full_tensor() if hasattr(v, "full_tensor") else v  # noqa: E731
    want = {k: full(v).clone() for k, v in state["state_dict"].items()}
    with torch.no_grad():
        for v in state["state_dict"].values():
            (v.to_local() if hasattr(v, "to_local") else v).zero_()
    load()
    out["loaded_equal"] = all(torch.equal(full(state["state_dict"][k]), want[k]) for k in want)
    with failing(lc_dcp.LCStorageReader, "read_data", 1, OSError(5, "injected: input/output error")):
        attempt("read_failure", load)
    with failing(DefaultLoadPlanner, "create_local_plan", 0, RuntimeError("injected load plan failure")):
        attempt("load_plan_failure", load)
    with open(os.path.join(d, f"out-{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
