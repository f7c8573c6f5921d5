"""The one torchrun launcher of the tests.

Every distributed test runs real ``torchrun`` (``python -m torch.distributed.run``): its rendezvous, its
environment for each rank, its signal forwarding and its handling of a rank that fails. With the fork server on
(the default), the torchrun agent is a fork-server child and each rank is too (``--no-python`` with
``tests/support/_worker_shim.py``), so a launch costs no cold ``import torch, lightning``; ``LC_TEST_FORK=0``
launches cold interpreters throughout.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable, Sequence

from . import forkserver
from .forkserver import PIPE
from .net import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
SHIM = os.path.join(HERE, "_worker_shim.py")
DDP_SCRIPT = os.path.join(os.path.dirname(HERE), "distributed", "ddp_script.py")


def torchrun_argv(nproc: int, script: str, *args: str, nnodes: int = 1, node_rank: int = 0,
                  master_port: int | None = None, torchrun_args: Sequence[str] = ()) -> list[str]:
    """``python`` arguments of a torchrun launch: standalone on one node, or node ``node_rank`` of ``nnodes``;
    ``torchrun_args`` go to torchrun itself (say ``["--max-restarts", "1"]``)."""
    if nnodes == 1:
        launch = ["--standalone", f"--nproc_per_node={nproc}"]
    else:
        launch = ["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--nproc_per_node", str(nproc),
                  "--master_addr", "127.0.0.1", "--master_port", str(master_port)]
    worker = [sys.executable, "-S", SHIM] if forkserver.enabled() else []
    return ["-m", "torch.distributed.run", *launch, *torchrun_args, *(["--no-python"] if worker else []), *worker,
            script, *[str(a) for a in args]]


def launch_env(env: dict | None = None) -> dict:
    """The environment of a launch: one thread per rank (the ranks share the cores), the fork server's address."""
    out = dict(os.environ if env is None else env, OMP_NUM_THREADS="1")
    if forkserver.enabled():
        out.update(forkserver.socket_env())
    return out


def start(nproc: int, script: str, *args: str, env: dict | None = None, cwd=None, stdout=PIPE, stderr=PIPE,
          text: bool = True, **where) -> object:
    """Starts a launch (a Popen-like object; ``os.killpg(p.pid, ...)`` and ``p.send_signal`` reach the agent)."""
    return forkserver.popen(torchrun_argv(nproc, script, *args, **where), env=launch_env(env), cwd=cwd, stdout=stdout,
                            stderr=stderr, text=text)


def torchrun(nproc: int, script: str, *args: str, ok: bool = True, timeout: float = 240, env: dict | None = None,
             cwd=None, torchrun_args: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """One standalone launch of ``nproc`` ranks; asserts that it succeeded unless ``ok=False``."""
    p = forkserver.run(torchrun_argv(nproc, script, *args, torchrun_args=torchrun_args), capture_output=True, text=True, timeout=timeout,
                       env=launch_env(env), cwd=cwd)
    if ok:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p


def nodes(n: int, per_node: int, script: str, args: Callable[[int], Sequence[str]], *, timeout: float = 240,
          env: Callable[[int], dict] | None = None, cwd: Callable[[int], str] | None = None
          ) -> list[subprocess.CompletedProcess]:
    """``n`` "nodes" on this machine: one torchrun agent per node (``--nnodes n``), as on ``n`` machines.
    ``args(k)``, ``env(k)`` and ``cwd(k)`` give node ``k``'s script arguments, extra environment and folder."""
    port = free_port()
    procs = [start(per_node, script, *args(k), nnodes=n, node_rank=k, master_port=port,
                   env=dict(os.environ, **(env(k) if env else {})), cwd=cwd(k) if cwd else None) for k in range(n)]
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def ok(results: list[subprocess.CompletedProcess]) -> None:
    for r in results:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]


def node_folder(base, node: int) -> str:
    """Node ``node``'s own checkpoint folder in :func:`ddp_two_nodes`."""
    return str(base / f"node{node}" / "ckpts")


def ddp_two_nodes(base, per_node: int, *args: str, timeout: float = 240, dirpath: str | None = None,
                  node_env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """``tests/distributed/ddp_script.py`` on two "nodes" (one torchrun agent per node, as on two machines); node k
    saves into ``node_folder(base, k)`` (or ``dirpath``). ``{node}`` in ``args`` and in ``node_env`` values is
    replaced by the node's number."""
    return nodes(2, per_node, DDP_SCRIPT,
                 lambda k: ["--dir", dirpath or node_folder(base, k), *[a.replace("{node}", str(k)) for a in args]],
                 timeout=timeout, env=lambda k: {n: v.replace("{node}", str(k)) for n, v in (node_env or {}).items()})
