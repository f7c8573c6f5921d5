"""Host buffers that are allocated once and reused across saves.

``HostBuffers.snapshot(tensors)`` copies every tensor into a CPU buffer of the same shape and dtype (pinned
when CUDA is present, so device-to-host copies run at full bandwidth and asynchronously), allocating only for keys
whose shape or dtype changed since the last save. Training may resume as soon as it returns.

Buffers of :data:`PAGE_ALIGNED_FROM` bytes or more start on a page boundary, so that the files written from them with
``O_DIRECT`` take their bytes straight from these buffers (``store/direct.py``, ``tensorfile.direct_io_layout``).
"""
from __future__ import annotations

import concurrent.futures as cf
import math
import os
import threading
from typing import Any

import torch

from ..compat import foreach_copy, shard_types, sharded_tensor_like
from ..format.views import (PLAIN_TYPES, Checked, as_dtensor, get_cpu, get_dtype, get_layout, get_shape,
                            is_sharded_tensor)

PAGE = 4096
PAGE_ALIGNED_FROM = 64 << 10
_ALL = ("all",)  # in a scan: every tensor is a plain, strided one (dense_views checked it)



def aligned_empty(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose data starts on a page boundary (a view into a slightly larger buffer)."""
    n = shape.numel() * torch.empty(0, dtype=dtype).element_size()
    raw = torch.empty(n + PAGE, dtype=torch.uint8)
    off = (-raw.data_ptr()) % PAGE
    return raw[off:off + n].view(dtype).view(shape)


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
            if is_sharded_tensor(t):  # FSDP1's sharded state dict: one buffer per local shard
                sharded[key] = t
                for i, shard in enumerate(t.local_shards()):
                    locals_.append((f"{key}#{i}", shard.tensor.detach()))
                continue
            d = as_dtensor(t)
            locals_.append((key, (d.to_local() if d is not None else t).detach()))
        self._allocate_missing(locals_)
        for key, t in tensors.items():
            if key in sharded:
                out[key], non_blocking = self._snapshot_sharded(key, t)
                needs_sync |= non_blocking
                continue
            t = t.detach()
            dt = as_dtensor(t)
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
        self._slabs.close()
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


class SmallSlabs:
    """The small plain CPU tensors of a save, copied as a group: one buffer per dtype, a view of it per tensor, laid out
    once and reused while the state's keys, types, devices, layouts, dtypes and shapes stay the same. That check is
    made in bulk (one ``map`` per property over the state's tensors, compared with the previous save's lists: no
    Python per tensor); the split it implies is remembered with the layout. The views are consecutive in their
    buffer, in state order, so the file written from them is written in large pieces
    (``format.tensorfile.encode_tensors`` merges adjacent views)."""

    MIN_TENSORS = 64  # fewer small tensors: copied one by one as before
    TWO_THREADS_FROM = 8192  # this many tensors or more: two threads copy them (see _helper)

    def __init__(self, owner: HostBuffers) -> None:
        self.owner = owner
        self._pool: cf.ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self.clear()

    @property
    def nbytes(self) -> int:
        return sum(s.numel() for s in self.slabs)

    def clear(self) -> None:
        self.scan: tuple | None = None
        self.picked: list[int] | None = None  # positions (in state order) of the small tensors; None: all of them
        self.keys: list[str] = []
        self.views: list[torch.Tensor] = []
        self.snap: dict[str, torch.Tensor] = {}  # key -> view, copied for each save
        self.slabs: list[torch.Tensor] = []
        # per dtype: (positions in the selection, None: all of them; its runs: first, end, part of the buffer)
        self.flat_1d: list[tuple[list[int] | None, list[tuple[int, int, torch.Tensor]]]] | None = None

    def select(self, tensors: dict[str, torch.Tensor]) -> Selection:
        if type(tensors) is Checked and tensors.intact():
            # dense_views read the types, layouts, dtypes and shapes; the devices are read when laying out only:
            # a tensor that leaves the CPU later makes torch.cat refuse (SmallSlabs.copy), never convert it
            keys, vals = tensors.order, tensors.vals
            scan = (keys, _ALL, None, _ALL, tensors.dtypes, tensors.shapes)
        else:
            keys, vals = list(tensors), list(tensors.values())
            types = list(map(type, vals))
            if set(types) <= PLAIN_TYPES:
                scan = (keys, types, list(map(get_cpu, vals)), list(map(get_layout, vals)),
                        list(map(get_dtype, vals)), list(map(get_shape, vals)))
            else:  # a ShardedTensor or DTensor among them: its properties are not asked (it is never copied here)
                plain = [t in PLAIN_TYPES for t in types]
                scan = (keys, types) + tuple([f(v) if p else None for v, p in zip(vals, plain)]
                                             for f in (get_cpu, get_layout, get_dtype, get_shape))
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
        if cpu is None:
            cpu = list(map(get_cpu, vals))
        strided, limit = torch.strided, PAGE_ALIGNED_FROM
        picked = [i for i, t in enumerate(vals)
                  if (types is _ALL or types[i] in PLAIN_TYPES) and cpu[i]
                  and (layouts is _ALL or layouts[i] == strided) and t.nbytes < limit]
        self.clear()
        self.scan = scan
        if len(picked) < self.MIN_TENSORS:
            self.picked = []
            return
        self.picked = None if len(picked) == len(vals) else picked
        self._allocate([keys[i] for i in picked], [vals[i].detach() for i in picked])

    def copy(self, srcs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copies of the selected tensors (key -> view): when every one is 1-D, one ``torch.cat`` per run of about
        :data:`CAT_BYTES` into its part of the buffer (same bytes as ``_foreach_copy_`` into the views, without a
        TensorIterator per tensor); otherwise one ``_foreach_copy_``."""
        with torch.no_grad():
            if self.flat_1d is None:
                foreach_copy(self.views, srcs)
                return dict(self.snap)
            try:
                jobs = []
                for picked, runs in self.flat_1d:
                    part = srcs if picked is None else [srcs[i] for i in picked]
                    jobs.extend((part[a:b], out) for a, b, out in runs)
                half = self._halves(jobs) if len(srcs) >= self.TWO_THREADS_FROM else 0
                helper = self._helper().submit(_cat_all, jobs[half:]) if half else None
                try:
                    _cat_all(jobs[:half] if half else jobs)
                finally:
                    if helper is not None:
                        helper.result()
            except (RuntimeError, NotImplementedError):
                # a tensor left the CPU since the layout (dense_views' bulk check reads no device): cat refuses a
                # tensor of another device, it never converts one; copy_ does, and the next save lays out again
                self.scan = None
                foreach_copy(self.views, srcs)
        return dict(self.snap)  # (a dict of its own: the save's job may add to it)

    def close(self) -> None:
        """Stop the copying thread (a later copy starts another)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)

    def _helper(self) -> cf.ThreadPoolExecutor:
        """The thread that copies the second half of a large state's runs while the training thread copies the first
        (``torch.cat`` releases the GIL; its cost is per tensor, about 0.4 us each, not per byte)."""
        if self._pool is None or self._pool_pid != os.getpid():  # (a forked child has no thread behind the pool)
            self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="lightning_ckpt-copy")
            self._pool_pid = os.getpid()
        return self._pool

    @staticmethod
    def _halves(jobs: list) -> int:
        """Where to cut ``jobs`` (lists of tensors to concatenate) into two halves of about as many tensors; 0 when
        there is one job or no second core."""
        if len(jobs) < 2 or (os.cpu_count() or 1) < 2:
            return 0
        total, n = sum(len(j[0]) for j in jobs), 0
        for i, (part, _) in enumerate(jobs):
            n += len(part)
            if 2 * n >= total:
                return min(i + 1, len(jobs) - 1)
        return len(jobs) - 1

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
        self.snap = dict(zip(keys, views))
        self.owner.allocations += len(flat)
        # every tensor 1-D (biases, norms; all of a flat state): torch.cat into each dtype's buffer copies the same
        # bytes as _foreach_copy_ into the views, in about half the time (no per-tensor TensorIterator); cut into runs
        # of about CAT_BYTES, since one cat of tens of thousands of tensors costs more per tensor than several
        if all(t.dim() == 1 for t in srcs):
            self.flat_1d = []
            for dt, f in flat.items():
                picked = None if len(flat) == 1 else [i for i, t in enumerate(srcs) if t.dtype == dt]
                part = srcs if picked is None else [srcs[i] for i in picked]
                self.flat_1d.append((picked, _runs(part, f)))


CAT_BYTES = 1 << 20


def _cat_all(jobs: list) -> None:
    cat = torch.cat
    with torch.no_grad():  # (thread-local: the helper thread needs its own; cat(out=) refuses a tensor needing grad)
        for part, out in jobs:
            cat(part, out=out)


def _runs(part: list[torch.Tensor], flat: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
    """``part`` (1-D tensors of one dtype, laid out back to back in ``flat``) cut into runs of about
    :data:`CAT_BYTES`: (first, end, the run's part of ``flat``)."""
    runs, a, start, n, nb, size = [], 0, 0, 0, 0, flat.element_size()
    for b, t in enumerate(part, 1):
        n += t.numel()
        nb += t.numel() * size
        if nb >= CAT_BYTES or b == len(part):
            runs.append((a, b, flat[start:n]))
            a, start, nb = b, n, 0
    return runs


def total_nbytes(tensors: dict) -> int:
    """About how many bytes ``tensors`` take (a save's progress only: never raises; a sharded tensor counts its
    global size, whose ``numel`` it may not support)."""
    n = 0
    for t in tensors.values():
        if type(t) in PLAIN_TYPES:
            n += t.nbytes
        elif isinstance(t, torch.Tensor):
            try:
                n += math.prod(int(s) for s in t.size()) * t.dtype.itemsize
            except Exception:  # noqa: BLE001 (progress is informational)
                pass
    return n
