"""Two ranks (gloo, torchrun) save a replicated state of many small tensors, as DDP does, through the plain path
(``writer/plain.py``: no DCP planning), and count the collectives of each save.

    torchrun --standalone --nproc_per_node 2 tests/distributed/many_tensors_script.py --dir D --out INFO.json

Saves: step 1 of 1,000 tensors (synchronous), step 3 of ``--n`` tensors changed after an asynchronous save returned
(the checkpoint holds the values at the save). Every rank also saves one tensor of its own
(its RNG-like state). Rank 0 writes ``INFO.json``: the collectives (by function) each save ran on each rank.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from lightning_ckpt.writer import CheckpointWriter  # noqa: E402

COLLECTIVES = ("all_gather_object", "gather_object", "broadcast_object_list", "all_gather", "gather", "broadcast",
               "all_reduce", "reduce_scatter", "scatter_object_list", "barrier", "all_to_all")
COUNTS: collections.Counter = collections.Counter()


def count_collectives() -> None:
    """Wrap torch.distributed's collectives (the writer calls them through the module) to count calls."""
    for name in COLLECTIVES:
        fn = getattr(dist, name)

        def counted(*a, __fn=fn, __name=name, **k):
            COUNTS[__name] += 1
            return __fn(*a, **k)

        setattr(dist, name, counted)


def state(n: int, rank: int, shift: float = 0.0) -> dict:
    return {"state_dict": {f"layer{i}.weight": torch.arange(3, dtype=torch.float32) + i + shift for i in range(n)},
            "rng": torch.tensor([rank, 7], dtype=torch.int64)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=20000)
    a = ap.parse_args()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    w = CheckpointWriter(a.dir, async_save=True, dedup=False)
    count_collectives()
    per_save = {}
    for step, n, sync in ((1, 1000, True), (3, a.n, False)):  # (sizes: tests/test_scale_tensors.py)
        COUNTS.clear()
        s = state(n, rank, shift=float(step))
        w.save(s, step=step, sync=sync)
        if not sync:  # changed after the save returned: the checkpoint keeps the values at the save
            for t in s["state_dict"].values():
                t.add_(1000)
        w.wait()
        per_save[step] = dict(COUNTS)
    w.close()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, per_save)
    if rank == 0:
        with open(a.out, "w") as f:
            json.dump({"world_size": dist.get_world_size(), "collectives": everyone}, f)
    dist.barrier()
    if not os.environ.get("LC_TEST_SHARED_LAUNCH"):  # else the next run of the shared launch uses the group
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
