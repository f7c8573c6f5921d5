"""Two ranks (gloo, torchrun) build writers and report their ``Topology`` (``writer/topology.py``): one folder both
ranks see, then a folder of each rank's own (as node-local disks are), then own folders where only rank 0's is
written (the staging folders of an ``s3://`` dirpath). Also the topology's collectives (agree, broadcast, gather) and
that closing a writer lets go of the groups it created.

    torchrun --standalone --nproc_per_node 2 tests/distributed/topology_script.py --dir D

Each rank writes ``D/rank<r>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch.distributed as dist  # noqa: E402

from lightning_ckpt.writer import CheckpointWriter, Topology  # noqa: E402


def view(t: Topology) -> dict:
    return {"rank": t.rank, "world_size": t.world_size, "folder_ranks": list(t.folder_ranks),
            "node_local": t.node_local, "every_folder": t.every_folder, "leader": t.leader, "is_leader": t.is_leader,
            "folder_written": t.folder_written, "has_group": t.group is not None,
            "has_folder_group": t.folder_group is not None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    a = ap.parse_args()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    out: dict = {}
    shared = CheckpointWriter(os.path.join(a.dir, "shared"), async_save=False)
    out["joined"] = view(shared.topology)
    shared.detect_folders()
    out["shared"] = view(shared.topology)
    out["agree"] = shared.agree("rank 1 failed" if rank == 1 else None)
    out["broadcast"] = shared.topology.broadcast(f"from rank {rank}")
    out["gather"] = shared.topology.gather(rank * 10)
    out["same_writer_id"] = len(set(shared.topology.gather(shared.writer_id))) == 1
    own = CheckpointWriter(os.path.join(a.dir, f"own{rank}"), async_save=False)
    own.detect_folders()
    out["own"] = view(own.topology)
    out["own_dedup"] = own.dedup is not None
    staging = CheckpointWriter(os.path.join(a.dir, f"staging{rank}"), async_save=False)
    staging.detect_folders(every_folder=False)
    out["staging"] = view(staging.topology)
    for w in (shared, own, staging):
        w.close()
    out["closed"] = view(own.topology)
    with open(os.path.join(a.dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    if not os.environ.get("LC_TEST_SHARED_LAUNCH"):  # else the next run of the shared launch uses the group
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
