"""torchrun restarts (``--max-restarts``): a warning about a torch launcher bug that makes a restart fail to connect.

Since torch 2.4 the torchrun agent hosts the rendezvous TCPStore that the workers' ``init_process_group`` uses, and
keeps it for the whole job (``TORCHELASTIC_USE_AGENT_STORE=True``). The keys of a failed attempt stay in it, with no
per-attempt prefix, so a restarted rank can read the dead attempt's gloo (or NCCL) address and fail to connect
("Gloo connectFullMesh failed ... Connection refused"): pytorch/pytorch#135712 and #167288. Measured here with torch
2.13: a rank killed after a commit, ``--max-restarts 1``: the restart failed in Lightning's ``init_process_group``,
before any of this package's code ran. ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in torchrun's environment makes
rank 0 host a fresh store on a fresh port for each attempt, and the restart resumed exactly
(tests/distributed/test_elastic.py). A per-attempt key prefix taken from ``TORCHELASTIC_RESTART_COUNT`` is no fix:
that count is kept by each node's agent, and a node whose workers did not fail restarts them without counting, so
ranks of one attempt would disagree (the cause torch's issue names).

The package cannot reach the agent's environment, so it warns on rank 0 when the run can restart and the store is
shared, once per process, when a writer is created (the first attempt, long before a restart needs it).
"""
from __future__ import annotations

import os
import warnings

_WARNED: list[bool] = []

FIX = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"


def restart_store_problem(env: "os._Environ[str] | dict[str, str]" = os.environ) -> str | None:
    """The warning to give for this worker's environment, or None: only under torchrun with ``--max-restarts`` > 0
    and the agent's shared store."""
    try:
        restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    except ValueError:
        return None
    if restarts <= 0 or env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return (
        f"torchrun may restart this job (--max-restarts {restarts}), but its workers share the agent's rendezvous "
        "store across attempts, and torch keeps the failed attempt's process-group addresses in it: a restarted "
        "rank can connect to a dead one and the restart fails (pytorch/pytorch#135712). Launch torchrun with "
        f"{FIX} in its environment (`{FIX} torchrun --max-restarts ...`) so that every attempt gets a fresh store; "
        "the checkpoints are not affected either way."
    )


def warn_restart_store(rank: int) -> None:
    """Warn (rank 0, once per process) when a torchrun restart of this job would likely fail to connect."""
    if rank != 0 or _WARNED:
        return
    message = restart_store_problem()
    if message is not None:
        _WARNED.append(True)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
