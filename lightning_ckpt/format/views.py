"""Views of a save's tensors: :func:`dense_views`, the values to store (checked in bulk, resolved where a view's
memory does not hold its values), and :func:`byte_views`, byte views of CPU tensors' memory (no copies), what files
are written from and checksummed over."""
from __future__ import annotations

from operator import attrgetter, is_ as _is
from typing import Any, Sequence

import torch

from .. import compat

# one property of many tensors is read with one C-level map (no Python frame per tensor)
_type, get_cpu, get_layout = type, attrgetter("is_cpu"), attrgetter("layout")
get_dtype, get_shape = attrgetter("dtype"), attrgetter("shape")
_is_neg, _is_conj, _is_nested = torch.Tensor.is_neg, torch.Tensor.is_conj, torch.Tensor.is_nested.__get__
_STRIDED = frozenset((torch.strided,))
_COMPLEX = frozenset(dt for dt in vars(torch).values() if isinstance(dt, torch.dtype) and dt.is_complex)


def dense_views(tensors: dict[str, Any], memo: "DenseMemo | None" = None) -> dict[str, Any]:
    """The tensors of a save as the values to store, alike in every mode (sync or in the background, dedup on or
    off), checked before anything is snapshotted or written: a conjugate or negative view (``z.conj()`` of a complex
    tensor, ``z.conj().imag``) is resolved into a copy of its values, since its memory holds the values before the
    conjugation or negation (read as bytes, the save would fail or store the wrong values); a nested or sparse tensor
    is refused with a ValueError that says what to save instead. Sharded tensors and DTensors are left as they are.

    When every value is a plain tensor and none needs a change (the common case), the check is made in bulk, one
    C-level ``map`` per property, and the result is a :class:`Checked` dict that carries the properties it read, so
    that the bulk snapshot (``writer/snapshot.SmallSlabs.select``) does not read them again.

    ``memo`` (one per writer): what the last saves' bulk check found, and guards over it that check the same state
    again in one C++ pass per chunk of tensors (:class:`DenseMemo`)."""
    vals = list(tensors.values())
    if set(map(_type, vals)) <= PLAIN_TYPES:
        if memo is not None and memo.checks is not None:
            hit = memo.recall(tensors, vals)
            if hit is not None:
                return hit
        try:
            shapes = list(map(get_shape, vals))  # a nested tensor has no shape: it raises (refused below)
        except RuntimeError:
            shapes = None
        if shapes is not None and set(map(get_layout, vals)) <= _STRIDED:
            dtypes = list(map(get_dtype, vals))
            # a conjugate bit only changes the values of a complex tensor; a negative bit those of any dtype
            if not any(map(_is_neg, vals)) and (_COMPLEX.isdisjoint(dtypes) or not any(map(_is_conj, vals))):
                checked = Checked(tensors, vals, dtypes, shapes)
                if memo is not None:
                    memo.remember(checked)
                return checked
    return _dense_views_each(tensors)


class DenseMemo:
    """The bulk check of :func:`dense_views` for a state seen before, in one C++ pass per chunk (one memo per writer).

    After a save whose state passed the bulk check with the same keys, dtypes and shapes as the save before it (a
    state that keeps its shape across saves: a model's or an optimizer's), guards are built over that state, one per
    :data:`CHUNK` tensors (``compat.tensor_guard``: torch's own check of type, dispatch keys, dtype, device, sizes and
    strides). At the next save, a state with the same keys whose tensors are none of them nested (read with one
    ``map``: the guard must not see one) and all pass the guards has, tensor for tensor, the dtypes and shapes
    remembered, is dense and strided, and has neither a conjugate nor a negative bit: exactly what the bulk check
    would have found, so :meth:`recall` returns the same ``Checked`` dict, reusing the remembered lists, without
    reading them again. Any difference (a tensor swapped through ``.data =``, resized, transposed, made a negative
    view; another key) fails a guard, and the bulk check runs as before.

    With ``signatures`` (a writer that deduplicates), the same pass also reads what deduplication must read at
    ``save()``: each tensor's version counter and data pointer (``Checked.signals``). Every property of a chunk is
    read while its tensors are in the CPU's cache: with the tensor objects of an optimizer's state spread over the
    heap, one pass per property over all of them costs about twice as much (each pass misses the cache on every
    tensor).

    Guards that fail while the bulk check then finds the same state (a change they see and the save does not care
    about: ``requires_grad``, strides, one tensor object under two keys) are built again only after a wait that doubles
    with each such miss in a row (1, 2, 4, ... saves; a hit ends the row): building them costs about two bulk checks,
    so a state that keeps changing that way costs next to nothing more. Nothing here holds a tensor: a guard keeps
    metadata only."""

    MIN_TENSORS = 1024  # fewer tensors: the bulk check costs about a millisecond, no guard
    CHUNK = 1024

    def __init__(self, signatures: bool = False) -> None:
        self.signatures = signatures
        self.keys: list[str] | None = None
        self.dtypes: list | None = None
        self.shapes: list | None = None
        self.checks: list | None = None  # one guard per chunk of the remembered state, or None
        self.misses = 0  # guards that failed on a state the bulk check found unchanged, in a row
        self.wait = 0  # saves to wait before building guards again
        self._missed = False  # the last save's guards failed: is the state the bulk check finds the same one?

    def recall(self, tensors: dict, vals: list) -> "Checked | None":
        """The ``Checked`` dict of ``tensors`` if the guards prove it has the state remembered; else None (and the
        guards are dropped)."""
        if len(vals) == len(self.keys) and list(tensors) == self.keys:
            sig = self.signatures
            versions: list | None = [] if sig else None
            ptrs: list | None = [] if sig else None
            step = self.CHUNK
            for i, check in enumerate(self.checks):
                part = vals[i * step:(i + 1) * step]
                if any(map(_is_nested, part)) or not check(*part):
                    break
                if sig:
                    try:
                        versions += map(VERSION_OF, part)
                        ptrs += map(DATA_PTR_OF, part)
                    except (RuntimeError, NotImplementedError):  # an inference tensor (no version counter): the
                        sig = False                              # deduplicator reads them its own way
                        versions = ptrs = None
            else:
                self.misses = 0
                hit = Checked(tensors, vals, self.dtypes, self.shapes, order=self.keys)
                hit.signals = (versions, ptrs) if sig else None
                return hit
        self.checks, self._missed = None, True
        return None

    def remember(self, checked: "Checked") -> None:
        """Called with each state the bulk check passed: guards are built over it when it equals the last one."""
        same = (checked.order == self.keys and checked.dtypes == self.dtypes and checked.shapes == self.shapes)
        if same and self._missed:
            self.misses += 1
            self.wait = 2 ** (self.misses - 1)
        self._missed = False
        self.keys, self.dtypes, self.shapes = checked.order, checked.dtypes, checked.shapes
        vals, n, step = checked.vals, len(checked.vals), self.CHUNK
        if same and self.wait:
            self.wait -= 1
        elif same and n >= self.MIN_TENSORS:
            checks = [compat.tensor_guard(vals[i:i + step], checked.shapes[i:i + step]) for i in range(0, n, step)]
            self.checks = None if None in checks else checks


# what deduplication reads of each tensor at save() (writer/dedup.py), one map each; unbound: ~3 ms less at 50,000
# tensors than methodcaller
VERSION_OF, DATA_PTR_OF = attrgetter("_version"), torch.Tensor.data_ptr


def _dense_views_each(tensors: dict[str, Any]) -> dict[str, Any]:
    out = tensors
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor) or is_sharded_tensor(t) or as_dtensor(t) is not None:
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


class Checked(dict):
    """What :func:`dense_views` returns when every tensor is a plain dense tensor that needs no change: the same
    key -> tensor dict, with the lists it read on the way (``order``: the keys; ``vals``: the tensors; their dtypes
    and shapes), which the bulk snapshot reuses (``writer/snapshot.SmallSlabs.select``) instead of reading each tensor again.
    :meth:`intact` says whether the dict still holds exactly those tensors (nobody changed it since)."""

    __slots__ = ("order", "vals", "dtypes", "shapes", "signals")

    def __init__(self, tensors: dict, vals: list, dtypes: list, shapes: list, order: list | None = None) -> None:
        super().__init__(tensors)
        self.order = list(tensors) if order is None else order
        self.vals, self.dtypes, self.shapes = vals, dtypes, shapes
        self.signals: tuple[list, list] | None = None  # (version counters, data pointers) of vals, read with the check

    def intact(self) -> bool:
        return (len(self) == len(self.vals) and list(self) == self.order
                and all(map(_is, self.values(), self.vals)))


PLAIN_TYPES = frozenset((torch.Tensor, torch.nn.Parameter))  # neither sharded nor a DTensor: decided without an import


def is_sharded_tensor(t: Any) -> bool:
    return type(t) not in PLAIN_TYPES and compat.is_sharded_tensor(t)


def as_dtensor(t: torch.Tensor):
    if type(t) in PLAIN_TYPES:
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return None
    return t if isinstance(t, DTensor) else None


def byte_views(tensors: Sequence[torch.Tensor]) -> tuple[list[memoryview], list[memoryview]]:
    """Byte views of contiguous CPU ``tensors`` (one per tensor), and the pieces that hold them back to back: tensors
    adjacent in memory within one allocation (a snapshot's small tensors are views of one buffer,
    ``writer/snapshot.SmallSlabs``) share one piece, so a file of many small tensors is written in a few large writes
    and each tensor's view is a slice of its piece (no per-tensor NumPy view)."""
    views: list = [None] * len(tensors)
    pieces: list[memoryview] = []
    i, n = 0, len(tensors)
    while i < n:
        t = tensors[i]
        nb = nbytes_of(t)
        start = t.data_ptr()
        end, j = start + nb, i + 1
        if nb and j < n and tensors[j].data_ptr() == end:
            st = t.untyped_storage()
            limit = st.data_ptr() + st.nbytes()
            while j < n:
                m = nbytes_of(tensors[j])
                if not m or tensors[j].data_ptr() != end or end + m > limit:
                    break
                end, j = end + m, j + 1
        if j == i + 1:
            views[i] = byte_view(t)
            pieces.append(views[i])
        else:
            base = torch.empty(0, dtype=torch.uint8).set_(st, start - st.data_ptr(), (end - start,))
            run = memoryview(base.numpy()).cast("B")
            pieces.append(run)
            off = 0
            for k in range(i, j):
                m = nbytes_of(tensors[k])
                views[k] = run[off:off + m]
                off += m
        i = j
    return views, pieces


def nbytes_of(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def byte_view(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor."""
    if t.device.type != "cpu":
        raise ValueError(f"byte_view needs a CPU tensor, got one on {t.device}")
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    if t.dtype in _NUMPY_DTYPES:  # NumPy has the dtype: its bytes as they are (no reshape, no view: about 2 us less)
        return memoryview(t.numpy()).cast("B")
    flat = t.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


_NUMPY_DTYPES = frozenset((torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16,
                           torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128))
