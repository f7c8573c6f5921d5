"""Reading one tensor's bytes from an open member file into memory, verified: into host memory in pieces, each
checksummed right after it was read (while it is still in the CPU's cache: one pass over memory, not two), or onto a
GPU through two pinned staging pieces whose host-to-device copies overlap the disk reads. A tensor whose record carries
a content hash (each tensor of a pack of the content store) is also hashed (XXH3-128) in the same pass and checked
against it: the hash is what a deduplicated save finds the tensor by, so a record that lies about it is refused."""
from __future__ import annotations

import threading
from typing import Callable

import torch

from ..errors import CheckpointCorruptError
from ..format.checksum import content_hasher, crc32c
from ..format.tensorfile import byte_view, content_mismatch, readinto_exact

PIECE = 8 << 20  # bytes read, then checksummed, at a time into host memory
GPU_PIECE = 64 << 20  # bytes per pinned staging piece on the way to a GPU


def mismatch(where: str, name: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"{where}: checksum mismatch in tensor {name!r}; the file is corrupt. "
        "Use an earlier checkpoint (latest_checkpoint skips corrupt ones).")


def read_to_host(f, where: str, t: dict, buf: torch.Tensor, verify: bool,
                 gate: Callable[[int], None] | None = None) -> None:
    """Read the tensor record ``t`` (begin, end, crc32c) of the open file ``f`` into the CPU tensor ``buf``, checking
    its CRC32C. ``gate(upto)`` is called before bytes ``[.., upto)`` of ``buf`` are written (the prefetcher may still
    be faulting that memory in)."""
    n = t["end"] - t["begin"]
    if buf.numel() * buf.element_size() != n:
        raise CheckpointCorruptError(f"{where}: a tensor's byte range does not match its shape and dtype")
    mv = byte_view(buf)
    f.seek(t["begin"])
    h = content_hasher() if verify and t.get("xxh128") is not None else None
    crc, pos = 0, 0
    while pos < n:
        k = min(PIECE, n - pos)
        if gate is not None:
            gate(pos + k)
        piece = mv[pos:pos + k]
        readinto_exact(f, piece, where)
        if verify:
            crc = crc32c(piece, crc)
            if h is not None:
                h.update(piece)
        pos += k
    if verify and crc != t["crc32c"]:
        raise mismatch(where, t.get("_name", ""))
    if h is not None and h.hexdigest() != t["xxh128"]:
        raise content_mismatch(where, t.get("_name", ""))


def read_to_cuda(f, where: str, t: dict, target: torch.Tensor, verify: bool, tls: threading.local) -> None:
    """Disk -> pinned staging piece -> GPU, two pieces in flight: the host-to-device copy of one piece overlaps the
    read of the next, so a restore onto the GPU runs at disk speed. The checksum covers every byte read. ``tls``: the
    calling thread's staging buffers, stream and events (kept between calls)."""
    n = t["end"] - t["begin"]
    if target.numel() * target.element_size() != n:
        raise CheckpointCorruptError(f"{where}: a tensor's byte range does not match its shape and dtype")
    if not hasattr(tls, "staging"):
        tls.staging = [torch.empty(GPU_PIECE, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        tls.events = [None, None]
        tls.stream = torch.cuda.Stream(device=target.device)
    staging, events, stream = tls.staging, tls.events, tls.stream
    dst = target.reshape(-1).view(torch.uint8) if n else target
    f.seek(t["begin"])
    h = content_hasher() if verify and t.get("xxh128") is not None else None
    crc, pos, i = 0, 0, 0
    while pos < n:
        k = min(GPU_PIECE, n - pos)
        buf = staging[i % 2]
        ev = events[i % 2]
        if ev is not None:
            ev.synchronize()  # the copy that used this staging buffer is done
        mv = memoryview(buf.numpy()).cast("B")[:k]
        readinto_exact(f, mv, where)
        if verify:
            crc = crc32c(mv, crc)
            if h is not None:
                h.update(mv)
        with torch.cuda.stream(stream):
            dst[pos : pos + k].copy_(buf[:k], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
        events[i % 2] = ev
        pos += k
        i += 1
    for ev in events:
        if ev is not None:
            ev.synchronize()
    torch.cuda.current_stream(target.device).wait_stream(stream)
    if verify and crc != t["crc32c"]:
        raise mismatch(where, t.get("_name", ""))
    if h is not None and h.hexdigest() != t["xxh128"]:
        raise content_mismatch(where, t.get("_name", ""))
