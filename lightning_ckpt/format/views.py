"""Byte views of CPU tensors' memory (no copies): what files are written from and checksummed over."""
from __future__ import annotations

from typing import Sequence

import torch


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
    flat = t.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")
