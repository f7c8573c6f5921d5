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
from operator import attrgetter
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
        return self.copy(self.select(tensors))

    def select(self, tensors: dict[str, torch.Tensor]) -> "Selection":
        """Which of ``tensors`` the next :meth:`copy` takes in bulk (laying the slabs out when the state changed)."""
        return self._slabs.select(tensors)

    def copy(self, sel: "Selection", rest: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The snapshot of a selection: its small tensors in bulk, ``rest`` (default: the selection's other tensors;
        the writer passes them less those deduplication leaves out) one by one; in state order."""
        rest = sel.rest if rest is None else rest
        small = self._slabs.copy(sel.srcs) if sel.keys else None
        if small is None:
            return self.snapshot_each(rest)
        if not rest:
            self._buffers = {}
            return small
        out = self.snapshot_each(rest)
        out.update(small)
        return {k: out[k] for k in sel.order if k in out}

    def snapshot_each(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each tensor into its own buffer (large ones, device tensors, sharded ones); the buffers of keys not in
        ``tensors`` are dropped."""
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


class Selection:
    """One save's split of its tensors: ``keys``/``srcs`` (state order) are copied in bulk into the slabs, ``rest``
    one by one; ``order``: every key, in state order."""

    __slots__ = ("keys", "srcs", "rest", "order")

    def __init__(self, keys: list[str], srcs: list[torch.Tensor], rest: dict, order: list[str]) -> None:
        self.keys, self.srcs, self.rest, self.order = keys, srcs, rest, order


_type, _is_cpu, _layout = type, attrgetter("is_cpu"), attrgetter("layout")
_dtype, _shape = attrgetter("dtype"), attrgetter("shape")


class SmallSlabs:
    """The small plain CPU tensors of a save, copied as a group: one buffer per dtype, a view of it per tensor, laid out
    once and reused while the state's keys, types, devices, layouts, dtypes and shapes stay the same. That check is
    made in bulk (one ``map`` per property over the state's tensors, compared with the previous save's lists: no
    Python per tensor); the split it implies is remembered with the layout. The views are consecutive in their
    buffer, in state order, so the file written from them is written in large pieces
    (``format.tensorfile.encode_tensors`` merges adjacent views)."""

    MIN_TENSORS = 64  # fewer small tensors: copied one by one as before

    def __init__(self, owner: HostBuffers) -> None:
        self.owner = owner
        self.clear()

    @property
    def nbytes(self) -> int:
        return sum(s.numel() for s in self.slabs)

    def clear(self) -> None:
        self.scan: tuple | None = None
        self.picked: list[int] | None = None  # positions (in state order) of the small tensors; None: all of them
        self.keys: list[str] = []
        self.views: list[torch.Tensor] = []
        self.slabs: list[torch.Tensor] = []
        self.flat_1d: list[tuple[list[int], torch.Tensor]] | None = None  # (positions, buffer) per dtype

    def select(self, tensors: dict[str, torch.Tensor]) -> Selection:
        keys, vals = list(tensors), list(tensors.values())
        types = list(map(_type, vals))
        if set(types) <= _PLAIN_TYPES:
            scan = (keys, types, list(map(_is_cpu, vals)), list(map(_layout, vals)), list(map(_dtype, vals)),
                    list(map(_shape, vals)))
        else:  # a ShardedTensor or DTensor among them: its properties are not asked (it is never copied here)
            plain = [t in _PLAIN_TYPES for t in types]
            scan = (keys, types) + tuple([f(v) if p else None for v, p in zip(vals, plain)]
                                         for f in (_is_cpu, _layout, _dtype, _shape))
        if scan != self.scan:
            self._lay_out(scan, vals)
        picked = self.picked
        if picked is None:
            return Selection(keys, vals, {}, keys)
        if not picked:
            return Selection([], [], tensors, keys)
        mine = set(picked)
        return Selection(self.keys, [vals[i] for i in picked],
                         {k: v for i, (k, v) in enumerate(tensors.items()) if i not in mine}, keys)

    def _lay_out(self, scan: tuple, vals: list[torch.Tensor]) -> None:
        keys, types, cpu, layouts = scan[:4]
        strided, limit = torch.strided, PAGE_ALIGNED_FROM
        picked = [i for i, t in enumerate(vals)
                  if types[i] in _PLAIN_TYPES and cpu[i] and layouts[i] == strided and t.nbytes < limit]
        self.clear()
        self.scan = scan
        if len(picked) < self.MIN_TENSORS:
            self.picked = []
            return
        self.picked = None if len(picked) == len(vals) else picked
        self._allocate([keys[i] for i in picked], [vals[i].detach() for i in picked])

    def copy(self, srcs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copies of the selected tensors (key -> view), in one ``_foreach_copy_``."""
        with torch.no_grad():
            if self.flat_1d is None:
                foreach_copy(self.views, srcs)
            elif len(self.flat_1d) == 1:  # one dtype, every tensor 1-D: one torch.cat into its buffer
                torch.cat(srcs, out=self.flat_1d[0][1])
            else:
                for picked, flat in self.flat_1d:
                    torch.cat([srcs[i] for i in picked], out=flat)
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
        # every tensor 1-D (biases, norms; all of a flat state): torch.cat into each dtype's buffer copies the same
        # bytes as _foreach_copy_ into the views, in about half the time (no per-tensor TensorIterator)
        if all(t.dim() == 1 for t in srcs):
            self.flat_1d = [([i for i, t in enumerate(srcs) if t.dtype == dt], f) for dt, f in flat.items()]


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


_PLAIN_TYPES = frozenset((torch.Tensor, torch.nn.Parameter))  # neither sharded nor a DTensor: decided without an import


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
