"""Runs several torchrun scripts one after the other in the same ranks: one launch, one process group.

    torchrun --standalone --nproc_per_node 2 tests/support/_shared_launch.py PLAN.json

PLAN.json (written by ``tests/support/shared.py``) lists the runs: ``{"name", "script", "argv", "cwd", "env",
"log_dir"}``. Each rank runs each script as ``python script argv...`` would (``runpy``, ``sys.argv``, the working
directory and extra environment variables of the run; restored after it), with its stdout and stderr in
``<log_dir>/<name>.rank<r>.log``, and writes its exit status to ``<log_dir>/<name>.rank<r>.status``. The scripts
see ``LC_TEST_SHARED_LAUNCH=1``: they leave the default process group alive for the next run. A run that fails
on a rank ends the launch (torchrun stops the other ranks): the runs after it are reported as not run.
"""
from __future__ import annotations

import gc
import json
import os
import runpy
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _run(run: dict, rank: int) -> int:
    log = os.path.join(run["log_dir"], f"{run['name']}.rank{rank}.log")
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved_fds = (os.dup(1), os.dup(2))
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    saved_env, saved_cwd, saved_argv, saved_path0 = dict(os.environ), os.getcwd(), list(sys.argv), sys.path[0]
    status = 0
    try:
        os.environ.update(run.get("env") or {})
        os.chdir(run["cwd"])
        sys.argv = [run["script"], *run["argv"]]
        sys.path[0] = os.path.dirname(os.path.realpath(run["script"]))
        try:
            runpy.run_path(run["script"], run_name="__main__")
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            status = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        sys.argv, sys.path[0] = saved_argv, saved_path0
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)
    with open(os.path.join(run["log_dir"], f"{run['name']}.rank{rank}.status"), "w") as f:
        f.write(str(status))
    return status


def main() -> None:
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    os.environ["LC_TEST_SHARED_LAUNCH"] = "1"
    rank = int(os.environ["RANK"])
    import torch.distributed as dist

    for run in plan:
        status = _run(run, rank)
        if status != 0:
            print(f"shared launch: {run['name']} failed on rank {rank} (exit status {status}); stopping",
                  file=sys.stderr, flush=True)
            os._exit(status if 0 < status < 256 else 1)
        if dist.is_initialized():
            dist.barrier()  # the next run starts together on every rank
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
