"""Host buffers that are allocated once and reused across saves.

``HostBuffers.snapshot(tensors)`` copies every tensor into a CPU buffer of the same shape and dtype (pinned
when CUDA is present, so device-to-host copies run at full bandwidth and asynchronously), allocating only for keys
whose shape or dtype changed since the last save. Training may resume as soon as it returns.

Buffers of :data:`PAGE_ALIGNED_FROM` bytes or more start on a page boundary, so that the files written from them with
``O_DIRECT`` take their bytes straight from these buffers (``store/direct.py``, ``tensorfile.direct_io_layout``).
"""
from __future__ import annotations

import math
import threading
from typing import Any

import torch

from ..compat import foreach_copy, is_sharded_tensor, shard_types, sharded_tensor_like

PAGE = 4096
PAGE_ALIGNED_FROM = 64 << 10


def aligned_empty(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose data starts on a page boundary (a view into a slightly larger buffer)."""
    n = shape.numel() * torch.empty(0, dtype=dtype).element_size()
    raw = torch.empty(n + PAGE, dtype=torch.uint8)
    off = (-raw.data_ptr()) % PAGE
    return raw[off:off + n].view(dtype).view(shape)


def dense_views(tensors: dict[str, Any]) -> dict[str, Any]:
    """The tensors of a save as the values to store, alike in every mode (sync or in the background, dedup on or
    off), checked before anything is snapshotted or written: a conjugate or negative view (``z.conj()`` of a complex
    tensor, ``z.conj().imag``) is resolved into a copy of its values, since its memory holds the values before the
    conjugation or negation (read as bytes, the save would fail or store the wrong values); a nested or sparse tensor
    is refused with a ValueError that says what to save instead. Sharded tensors and DTensors are left as they are."""
    out = tensors
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor) or _is_sharded_tensor(t) or _as_dtensor(t) is not None:
            continue
        if t.is_nested:
            raise ValueError(f"tensor {key!r} is a nested tensor; only dense tensors can be checkpointed. Save its "
                             "components (list(t.unbind())) or a padded copy (t.to_padded_tensor(0.0)) and the "
                             "lengths instead.")
        if t.layout != torch.strided:
            raise ValueError(f"tensor {key!r} has layout {t.layout}; only dense tensors can be checkpointed. Save "
                             "t.to_dense() (or its indices and values) instead.")
        if t.is_conj() or t.is_neg():
            if out is tensors:
                out = dict(tensors)
            out[key] = t.detach().resolve_conj().resolve_neg()
    return out


class HostBuffers:
    def __init__(self, pin_memory: bool | None = None) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.allocations = 0  # how many buffers were allocated in total (tests check reuse)
        self._slabs = SmallSlabs(self)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values()) + self._slabs.nbytes

    def _buffer_for(self, key: str, t: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            pin = self._pin and t.device.type == "cuda"
            if not pin and t.numel() * t.element_size() >= PAGE_ALIGNED_FROM:
                buf = aligned_empty(t.shape, t.dtype)
            else:  # (pinned memory is page-aligned already: cudaHostAlloc)
                buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
            self._buffers[key] = buf
            self.allocations += 1
        return buf

    def _allocate_missing(self, items: list[tuple[str, torch.Tensor]]) -> None:
        """Allocate every missing pinned buffer as views of one slab: one cudaHostAlloc instead of thousands."""
        missing = [(k, t) for k, t in items if t.device.type == "cuda" and self._pin and not (
            k in self._buffers and self._buffers[k].shape == t.shape and self._buffers[k].dtype == t.dtype)]
        if len(missing) < 2:
            return
        offsets, total = [], 0
        for _, t in missing:
            n = t.numel() * t.element_size()
            align = PAGE if n >= PAGE_ALIGNED_FROM else 64  # cudaHostAlloc memory starts on a page boundary
            total = (total + align - 1) // align * align
            offsets.append(total)
            total += n
        slab = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        for (k, t), off in zip(missing, offsets):
            n = t.numel() * t.element_size()
            view = slab[off : off + n].view(t.dtype) if n else torch.empty(0, dtype=t.dtype, pin_memory=True)
            self._buffers[k] = view.view(t.shape) if n else view.reshape(t.shape)
            self.allocations += 1

    def snapshot(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copies of ``tensors`` in host buffers. A ``DTensor`` (FSDP2, tensor parallel) is copied shard-locally and
        comes back as a ``DTensor`` over the host copy of its local shard: nothing is gathered.

        Plain CPU tensors below :data:`PAGE_ALIGNED_FROM` bytes are copied as a group (:class:`SmallSlabs`): into
        views of one buffer per dtype, in one ``_foreach_copy_`` call, so a state of 50,000 small tensors is one bulk
        copy rather than 50,000 copies with Python in between."""
        small = self._slabs.take(tensors)
        if small is not None and len(small) == len(tensors):
            self._buffers = {}
            return small
        if small:
            rest = self.snapshot_each({k: v for k, v in tensors.items() if k not in small}, keep=small)
            rest.update(small)
            return {k: rest[k] for k in tensors}
        return self.snapshot_each(tensors)

    def snapshot_each(self, tensors: dict[str, torch.Tensor], keep: Any = ()) -> dict[str, torch.Tensor]:
        """Each tensor into its own buffer (large ones, device tensors, sharded ones); ``keep``: keys whose buffers
        live elsewhere (the small slabs), not to be dropped here."""
        out: dict[str, torch.Tensor] = {}
        needs_sync = False
        locals_ = []
        sharded = {}
        for key, t in tensors.items():
            if _is_sharded_tensor(t):  # FSDP1's sharded state dict: one buffer per local shard
                sharded[key] = t
                for i, shard in enumerate(t.local_shards()):
                    locals_.append((f"{key}#{i}", shard.tensor.detach()))
                continue
            d = _as_dtensor(t)
            locals_.append((key, (d.to_local() if d is not None else t).detach()))
        self._allocate_missing(locals_)
        for key, t in tensors.items():
            if key in sharded:
                out[key], non_blocking = self._snapshot_sharded(key, t)
                needs_sync |= non_blocking
                continue
            t = t.detach()
            dt = _as_dtensor(t)
            local = dt.to_local() if dt is not None else t
            if local.layout != torch.strided:
                raise ValueError(f"tensor {key!r} has layout {local.layout}; only dense tensors can be checkpointed")
            buf, non_blocking = self._copy(key, local)
            needs_sync |= non_blocking
            if dt is not None:
                from torch.distributed.tensor import DTensor

                out[key] = DTensor.from_local(buf, dt.device_mesh, dt.placements, run_check=False, shape=dt.shape, stride=dt.stride())
            else:
                out[key] = buf
        for key in list(self._buffers):
            if key.rpartition("#")[0] not in sharded and key not in tensors:
                del self._buffers[key]
        if not keep:
            self._slabs.clear()
        if needs_sync:
            torch.cuda.synchronize()
        return out

    def _copy(self, key: str, local: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Copy ``local`` into the host buffer of ``key``; also says whether the copy is asynchronous (device to
        pinned memory: the caller synchronizes before the buffers are read)."""
        buf = self._buffer_for(key, local)
        non_blocking = local.device.type == "cuda" and buf.is_pinned()
        buf.copy_(local, non_blocking=non_blocking)
        return buf, non_blocking

    def _snapshot_sharded(self, key: str, t: Any) -> tuple[Any, bool]:
        """A ``ShardedTensor`` over host copies of its local shards, with the same global layout (no communication);
        and whether any copy is asynchronous."""
        import copy

        Shard, ShardMetadata = shard_types()

        def on_host(md: Any) -> Any:  # the same shard, placed on this rank's CPU (where its copy lives)
            return ShardMetadata(list(md.shard_offsets), list(md.shard_sizes), f"rank:{md.placement.rank()}/cpu")

        shards, any_async = [], False
        for i, shard in enumerate(t.local_shards()):
            buf, non_blocking = self._copy(f"{key}#{i}", shard.tensor.detach())
            any_async |= non_blocking
            shards.append(Shard(buf, on_host(shard.metadata)))
        meta = copy.deepcopy(t.metadata())
        meta.shards_metadata = [on_host(md) for md in meta.shards_metadata]
        meta.tensor_properties.pin_memory = bool(shards) and all(s.tensor.is_pinned() for s in shards)
        return sharded_tensor_like(t, shards, meta), any_async

    def clear(self, background: bool = False) -> None:
        """Drop every buffer. ``background``: return the memory to the system in a helper thread (unmapping a
        checkpoint's worth of pages takes tens of milliseconds per GB; the end of a fit need not wait for it)."""
        old, self._buffers = self._buffers, {}
        self._slabs.clear()
        if background and old:
            threading.Thread(target=old.clear, name="lightning_ckpt-free", daemon=True).start()
        else:
            old.clear()


class SmallSlabs:
    """The small plain CPU tensors of a save, copied as a group: one buffer per dtype, a view of it per tensor, laid out
    once and reused while the keys, shapes and dtypes stay the same (the layout is checked with one comparison of a
    tuple built per save). The views are consecutive in their buffer, in state order, so the file written from them
    is written in large pieces (``format.tensorfile.encode_tensors`` merges adjacent views)."""

    MIN_TENSORS = 64  # fewer small tensors: copied one by one as before

    def __init__(self, owner: HostBuffers) -> None:
        self.owner = owner
        self.layout: tuple | None = None
        self.keys: list[str] = []
        self.views: list[torch.Tensor] = []
        self.slabs: list[torch.Tensor] = []

    @property
    def nbytes(self) -> int:
        return sum(s.numel() for s in self.slabs)

    def clear(self) -> None:
        self.layout, self.keys, self.views, self.slabs = None, [], [], []

    def take(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Copies of the small plain CPU tensors of ``tensors`` (key -> view), or None when there are too few."""
        keys, srcs, shapes = [], [], []
        strided, limit = torch.strided, PAGE_ALIGNED_FROM
        for k, t in tensors.items():
            if type(t) in _PLAIN_TYPES and t.is_cpu and t.layout == strided and t.nbytes < limit:
                keys.append(k)
                srcs.append(t)
                shapes.append((t.dtype, t.shape))
        if len(keys) < self.MIN_TENSORS:
            self.clear()
            return None
        layout = keys, shapes
        if layout != self.layout:
            self._allocate(keys, [t.detach() for t in srcs])
            self.layout = layout
        with torch.no_grad():
            foreach_copy(self.views, srcs)
        return dict(zip(self.keys, self.views))

    def _allocate(self, keys: list[str], srcs: list[torch.Tensor]) -> None:
        by_dtype: dict[torch.dtype, int] = {}
        for t in srcs:
            by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.numel()
        flat = {dt: aligned_empty(torch.Size([n]), dt) for dt, n in by_dtype.items()}
        pos = dict.fromkeys(by_dtype, 0)
        views = []
        for t in srcs:
            n, p = t.numel(), pos[t.dtype]
            views.append(flat[t.dtype][p:p + n].view(t.shape))
            pos[t.dtype] = p + n
        self.keys, self.views, self.slabs = keys, views, [f.view(torch.uint8) for f in flat.values()]
        self.owner.allocations += len(flat)


def total_nbytes(tensors: dict) -> int:
    """About how many bytes ``tensors`` take (a save's progress only: never raises; a sharded tensor counts its
    global size, whose ``numel`` it may not support)."""
    n = 0
    for t in tensors.values():
        if type(t) in _PLAIN_TYPES:
            n += t.nbytes
        elif isinstance(t, torch.Tensor):
            try:
                n += math.prod(int(s) for s in t.size()) * t.dtype.itemsize
            except Exception:  # noqa: BLE001 (progress is informational)
                pass
    return n


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)  # neither sharded nor a DTensor: decided without an import


def _is_sharded_tensor(t: Any) -> bool:
    return type(t) not in _PLAIN_TYPES and is_sharded_tensor(t)


def _as_dtensor(t: torch.Tensor):
    if type(t) in _PLAIN_TYPES:
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return None
    return t if isinstance(t, DTensor) else None
