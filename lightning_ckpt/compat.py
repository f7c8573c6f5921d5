"""Every private torch attribute this package touches, in one place (the Lightning ones are in
``callbacks/compat.py``). Each is used through a function here; :func:`check` raises a
:class:`~lightning_ckpt.CheckpointError` naming the supported torch versions when one is missing, never a silent
fallback."""
from __future__ import annotations

from typing import Any

import torch

from .errors import CheckpointError

SUPPORTED = ">=2.4"  # keep in step with pyproject.toml (CI tests the newest, 2.13)


def tensor_version(t: torch.Tensor) -> int | None:
    """The version counter of ``t`` (bumped by every in-place change), or None for tensors without one
    (inference-mode tensors)."""
    try:
        return int(t._version)
    except (RuntimeError, AttributeError):
        return None


def _sharded_tensor_module() -> Any:
    from torch.distributed._shard import sharded_tensor

    return sharded_tensor


def is_sharded_tensor(t: Any) -> bool:
    """Is ``t`` a ``ShardedTensor`` (FSDP1's sharded state dict)?"""
    return isinstance(t, _sharded_tensor_module().ShardedTensor)


def sharded_tensor_like(t: Any, shards: list, metadata: Any) -> Any:
    """A ``ShardedTensor`` with ``t``'s process group over local ``shards`` (``Shard`` objects) and global
    ``metadata``, without any communication."""
    st = _sharded_tensor_module()
    return st.ShardedTensor._init_from_local_shards_and_global_metadata(
        shards, metadata, process_group=t._process_group, init_rrefs=False)


def shard_types() -> tuple[Any, Any]:
    """(``Shard``, ``ShardMetadata``) of torch's sharded tensors."""
    from torch.distributed._shard.metadata import ShardMetadata

    return _sharded_tensor_module().Shard, ShardMetadata


def foreach_copy(dsts: list, srcs: list) -> None:
    """``dst.copy_(src)`` for each pair in one call (``torch._foreach_copy_``: one dispatch for many small tensors);
    a loop where this torch lacks it."""
    fn = getattr(torch, "_foreach_copy_", None)
    if fn is None:
        for d, s in zip(dsts, srcs):
            d.copy_(s)
    else:
        fn(dsts, srcs)


def check() -> None:
    """Raise when the installed torch lacks what this package uses."""
    missing = []
    try:
        st = _sharded_tensor_module()
        if not hasattr(st.ShardedTensor, "_init_from_local_shards_and_global_metadata"):
            missing.append("ShardedTensor._init_from_local_shards_and_global_metadata")
        shard_types()
    except ImportError:
        missing.append("torch.distributed._shard")
    if not hasattr(torch.zeros(1), "_version"):
        missing.append("Tensor._version")
    if missing:
        raise CheckpointError(f"lightning_ckpt supports torch {SUPPORTED}; the installed torch {torch.__version__} "
                              f"lacks {', '.join(missing)}. Install a supported version.")


def before_thread_shutdown(fn: Any) -> None:
    """Run ``fn`` when the interpreter starts to shut down, before ``concurrent.futures`` refuses new work (a private
    hook of Python's ``threading``, the one ``concurrent.futures`` itself registers with; hooks run in reverse order
    of registration). ``atexit`` handlers would run too late. Where the hook is missing, or shutdown has begun,
    ``atexit`` is the next best."""
    import atexit
    import threading

    try:
        threading._register_atexit(fn)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):
        atexit.register(fn)
