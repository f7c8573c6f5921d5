"""What a writer records about the process that saves (``run`` in the manifest) and how it turns metrics and
hyper-parameters into plain JSON; and the priority of its background threads."""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import threading
from typing import Any

import torch

def _git_commit(cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
        if out.returncode == 0:
            commit = out.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=cwd, capture_output=True, text=True, timeout=5)
            return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


_RUN_INFO: dict | None = None


def run_info() -> dict:
    """Metadata about the process that writes checkpoints; what cannot change in a process (versions, the git commit,
    the host) is computed once, the rest (argv, working directory, pid, seed) at every call, so a forked process
    records its own."""
    global _RUN_INFO
    if _RUN_INFO is None:
        versions = {"python": platform.python_version(), "torch": torch.__version__}
        for mod in ("lightning", "numpy", "safetensors"):
            m = sys.modules.get(mod)
            if m is not None and hasattr(m, "__version__"):
                versions[mod] = m.__version__
        from ..version import __version__

        versions["lightning_ckpt"] = __version__
        _RUN_INFO = {
            "versions": versions,
            "git_commit": _git_commit(),
            "host": socket.gethostname(),
            "platform": platform.platform(),
        }
    info = dict(_RUN_INFO)
    info["argv"] = list(sys.argv)
    try:
        info["cwd"] = os.getcwd()
    except OSError:  # the working directory was removed
        info["cwd"] = None
    info["pid"] = os.getpid()
    info["seed"] = os.environ.get("PL_GLOBAL_SEED")
    return info


BACKGROUND_NICE = 5


def background_priority() -> None:
    """Background saves yield the CPU to training: on Linux a thread's nice value is its own (by thread id)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except (AttributeError, OSError):
        pass


def json_safe(x: Any) -> Any:
    """Metrics and hparams for the manifest: plain JSON, tensors as numbers, the rest as strings."""
    if isinstance(x, torch.Tensor):
        if x.numel() == 1:
            return json_safe(x.item())
        return json_safe(x.tolist()) if x.numel() <= 64 else f"<tensor {list(x.shape)} {x.dtype}>"
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return x if x == x and x not in (float("inf"), float("-inf")) else str(x)
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [json_safe(v) for v in x]
    if hasattr(x, "item") and callable(x.item):
        try:
            return json_safe(x.item())
        except Exception:  # noqa: BLE001
            pass
    return str(x)


def manifest_header(*, step, epoch, tags, metrics, hparams, meta, kind, save_id, world_size, mode) -> dict:
    """Everything a manifest records about a save before its files are written (the commit adds the rest)."""
    from ..format import manifest as mf

    h = {
        "save_id": save_id,
        "format": mf.FORMAT_NAME,
        "format_version": mf.PLAIN_VERSION,  # the newest version once it references packs (job.py)
        "step": int(step),
        "epoch": None if epoch is None else int(epoch),
        "kind": kind,
        "world_size": world_size,
        "mode": mode,
        "tags": sorted(set(tags)),
        "metrics": json_safe(metrics or {}),
        "hparams": json_safe(hparams) if hparams is not None else None,
        "run": run_info(),
    }
    if meta:
        h.update(json_safe(meta))
    return h


def state_bytes_of(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")


class StateDoc:
    """A rank's non-tensor state, encoded to bytes when the background save needs them (``SaveJob.write``): off the
    training thread (the JSON of a state of 50,000 tensors' references takes about 0.1 s)."""

    def __init__(self, doc: Any) -> None:
        self.doc = doc

    def __bytes__(self) -> bytes:
        return state_bytes_of(self.doc)
