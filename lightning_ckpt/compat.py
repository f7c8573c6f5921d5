"""Every private torch attribute this package touches, in one place (the Lightning ones are in
``callbacks/compat.py``). Each is used through a function here; :func:`check` raises a
:class:`~lightning_ckpt.CheckpointError` naming the supported torch versions when one is missing, never a silent
fallback. The one exception is an accelerator, :func:`tensor_guard`: without it a save does the same work in Python,
so where it is missing (or fails its self-test) it is simply not used."""
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


_GUARDS: list = []  # [the TensorGuards class, or None where it is missing or failed the self-test]; decided once


def tensor_guard(tensors: list, shapes: list) -> Any:
    """One C++ check of many tensors' metadata, or None where this torch cannot give one.

    ``tensors``: plain dense tensors (``type(t)`` is ``torch.Tensor`` or ``Parameter``, not nested: a nested tensor
    aborts the process inside the check, so callers exclude those first); ``shapes``: their shapes, as read now.
    Returns a callable ``check(*tensors) -> bool`` that is True only when each tensor passed has the Python type,
    dispatch keys (device type, layout, the conjugate and negative bits), dtype, device index, ``requires_grad``,
    sizes and strides the tensor in the same position had here.

    This is torch's private ``torch._C._dynamo.guards.TensorGuards``: the check ``torch.compile`` relies on to reuse
    compiled code (its ``TensorCheck``), one C++ pass instead of one Python-level pass per property. It is an
    accelerator only: where it is missing, refuses the arguments, or fails a self-test of the changes it must catch
    (run once per process), this returns None and the caller reads the properties itself."""
    if not _GUARDS:
        _GUARDS.append(_tensor_guards_class())
    cls = _GUARDS[0]
    if cls is None:
        return None
    # The guard compares dispatch keys as the thread-local include/exclude sets make them look: with the negative
    # or conjugate key excluded (inside a dispatcher kernel), a negative view would pass for a plain tensor. So it is
    # built only where none of the keys that change what a tensor's memory means is excluded, and checks only where
    # those sets are what they were when it was built (read once per check: no cost per tensor).
    tls = _dispatch_tls()
    if tls is None or (torch._C._dispatch_tls_local_exclude_set() & _MEANINGFUL_KEYS).raw_repr():
        return None
    try:
        guard = _guard(cls, tensors, shapes)
    except Exception:  # noqa: BLE001 (an accelerator: the caller reads the properties instead)
        return None

    def check(*ts: torch.Tensor) -> bool:
        return _dispatch_tls() == tls and guard(*ts)

    return check


def _dispatch_tls() -> tuple[int, int] | None:
    """This thread's dispatch key include and exclude sets (None where torch lacks the accessors)."""
    try:
        c = torch._C
        return c._dispatch_tls_local_include_set().raw_repr(), c._dispatch_tls_local_exclude_set().raw_repr()
    except AttributeError:
        return None


def _meaningful_keys() -> Any:
    try:
        k = torch._C.DispatchKey
        keys = torch._C.DispatchKeySet(k.Negative)
        for name in ("Conjugate", "Sparse", "SparseCsr", "NestedTensor", "Python", "PythonTLSSnapshot"):
            keys = keys | torch._C.DispatchKeySet(getattr(k, name))
        return keys
    except AttributeError:  # pragma: no cover (then no guard is built: see tensor_guard)
        return None


_MEANINGFUL_KEYS = _meaningful_keys()


def _guard(cls: Any, tensors: list, shapes: list) -> Any:
    """The check of a ``cls`` (TensorGuards) built over ``tensors``: their sizes (``shapes``) and strides as they are
    now, every dimension static."""
    return cls(*tensors, dynamic_dims_sizes=list(map(list, shapes)),
               dynamic_dims_strides=list(map(list, map(torch.Tensor.stride, tensors)))).check


def _tensor_guards_class() -> Any:
    """``TensorGuards`` if it is present and catches, on this torch, each change the snapshot relies on it to see."""
    try:
        from torch._C._dynamo.guards import TensorGuards
    except ImportError:
        return None
    if _MEANINGFUL_KEYS is None or _dispatch_tls() is None:
        return None

    def guard(ts: list) -> Any:
        return _guard(TensorGuards, ts, [t.shape for t in ts])

    try:
        base = [torch.zeros(6), torch.zeros(2, 3)]
        if not guard(base)(*base):
            return None
        # each keeps the tensor object (``.data =``), its version counter and mostly its data pointer
        changes = (lambda t: t.view(3, 2), lambda t: t.reshape(-1)[:4], lambda t: t.view(torch.int32),
                   lambda t: t._neg_view(), lambda t: t.reshape(3, 2).t(), lambda t: t.to(torch.float64),
                   lambda t: torch.zeros(1).expand(t.shape), lambda t: torch.zeros(t.shape[:-1] + (2 * t.shape[-1],))[..., ::2])
        for change in changes:
            for i in range(2):
                ts = [t.clone() for t in base]
                check = guard(ts)
                ts[i].data = change(ts[i].data)
                if check(*ts):
                    return None
        z = [torch.zeros(3, dtype=torch.complex64)]
        check = guard(z)
        if check(z[0].conj()):
            return None
    except Exception:  # noqa: BLE001 (another signature or behaviour: not used)
        return None
    return TensorGuards


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
