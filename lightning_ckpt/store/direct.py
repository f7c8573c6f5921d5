"""``O_DIRECT`` file I/O: the bytes go between the caller's memory and the disk without a copy into the page cache.

Why: on the 2-core machine this package is measured on, copying a 0.8 GB checkpoint into the page cache costs 0.5 to
1.9 s of CPU (page allocation and dirty accounting, in the writing thread), and the disk then needs 0.35 s for it;
with ``O_DIRECT`` the same bytes take 0.35 s and 0.03 s of CPU. A background save that copies into the page cache
competes with training for the cores; one that writes directly leaves them to training (issue 14, docs/DESIGN.md).

How: ``O_DIRECT`` wants the file offset, the memory address and the length of each write aligned (:data:`ALIGN`,
4096, covers every common filesystem). :func:`write_pieces` writes the file's pieces (the safetensors header, then
each tensor's bytes) in order: wherever a piece's memory has the same phase modulo :data:`ALIGN` as its place in the
file, its aligned middle is written straight from its memory; the bytes around block boundaries (and any piece whose
phase differs) go through a small aligned bounce buffer. ``format.tensorfile.encode_tensors(align=...)`` lays files
out so that the large tensors have their memory's phase (header padding, tensor order), and the writer's host
buffers are page-aligned, so nearly every byte is written without a copy. The last partial block is written after
``O_DIRECT`` is turned off on the descriptor. ``fsync`` still follows (metadata, the device's cache).

A filesystem that refuses ``O_DIRECT`` (``EINVAL`` at open or at a write: tmpfs on older kernels, some FUSE
filesystems) is remembered (by device) and written through the page cache from then on; ``LIGHTNING_CKPT_DIRECT_IO=0``
turns direct I/O off everywhere.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import threading
from typing import Any, Callable, Iterable

ALIGN = 4096
MIN_BYTES = 1 << 20  # smaller files: the page cache (a copy of a few KiB costs nothing, a direct write has latency)
BOUNCE_BYTES = 8 << 20
CHUNK = 256 << 20  # bytes per direct write from the caller's memory
O_DIRECT = getattr(os, "O_DIRECT", 0)
ENV = "LIGHTNING_CKPT_DIRECT_IO"

_refused: set[int] = set()  # st_dev of the filesystems that refused O_DIRECT in this process
_lock = threading.Lock()


class _Bounce(threading.local):
    buf: Any = None


_BOUNCE = _Bounce()


def enabled() -> bool:
    """Direct I/O is available on this system and not turned off with ``LIGHTNING_CKPT_DIRECT_IO=0``."""
    return bool(O_DIRECT) and os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def wanted(nbytes: int, folder: str | None = None) -> bool:
    """Whether a durable file of ``nbytes`` should be written directly: large enough, enabled, and (given its
    ``folder``) on a filesystem that did not refuse ``O_DIRECT`` before. The writer lays a file out for direct I/O
    by the same rule that opens it so."""
    return enabled() and nbytes >= MIN_BYTES and (folder is None or not refused(folder))


def _device_of(path: str) -> int | None:
    try:
        return os.stat(path).st_dev
    except OSError:
        return None


def refused(folder: str) -> bool:
    """Whether the filesystem of ``folder`` refused ``O_DIRECT`` before (in this process)."""
    dev = _device_of(folder)
    with _lock:
        return dev is not None and dev in _refused


def open_for_write(path: str, flags: int) -> int:
    """``os.open(path, flags | O_DIRECT)``, or -1 where the filesystem refuses it (remembered)."""
    folder = os.path.dirname(path) or "."
    if not enabled() or refused(folder):
        return -1
    try:
        return os.open(path, flags | O_DIRECT, 0o644)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        dev = _device_of(folder)
        if dev is not None:
            with _lock:
                _refused.add(dev)
        return -1


def is_direct(fd: int) -> bool:
    return bool(O_DIRECT) and bool(fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT)


def _set_direct(fd: int, on: bool) -> None:
    fl = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, (fl | O_DIRECT) if on else (fl & ~O_DIRECT))


def write_through_cache(fd: int, data: Any) -> int:
    """``os.write(fd, data)`` whatever ``fd``'s mode: ``O_DIRECT`` is turned off on it first (a write of any length
    from any memory then succeeds). For callers that write a few bytes of their own into a file being written, such
    as the fault-injection tests' kill points (a kill halfway through a file)."""
    if is_direct(fd):
        _set_direct(fd, False)
    return os.write(fd, data)


def refuse(fd: int) -> None:
    """The filesystem of ``fd`` refused an aligned direct write: remember it, and turn direct I/O off on ``fd``."""
    try:
        dev = os.fstat(fd).st_dev
        with _lock:
            _refused.add(dev)
    finally:
        _set_direct(fd, False)


def address(v: memoryview) -> int | None:
    """The memory address of a writable buffer (None for a read-only one, which is then copied)."""
    if v.readonly or not v.nbytes:
        return None
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(v))
    except (TypeError, ValueError):
        return None


def bounce() -> memoryview:
    """This thread's aligned bounce buffer (anonymous memory: page-aligned)."""
    if _BOUNCE.buf is None:
        _BOUNCE.buf = memoryview(mmap.mmap(-1, BOUNCE_BYTES))
    return _BOUNCE.buf


def write_pieces(fd: int, pieces: Iterable[Any], write_all: Callable[[int, Any], None],
                 count: Callable[[int], None] = lambda n: None) -> int:
    """Write ``pieces`` back to back from offset 0 of the ``O_DIRECT`` descriptor ``fd`` (see the module's doc).
    Every write goes through ``write_all(fd, buffer)``; ``count(n)`` is told each piece's bytes as they are written.
    Returns how many bytes went to the disk straight from the pieces' memory (the rest through the bounce buffer).
    Raises ``OSError(EINVAL)`` where the filesystem refuses an aligned write (the caller starts over buffered)."""
    a_ = ALIGN
    buf = bounce()
    cap = len(buf)
    fill = 0  # bytes waiting in the bounce buffer: the file's [pos - fill, pos), pos - fill always aligned
    pos = 0
    straight = 0
    for piece in pieces:
        v = memoryview(piece).cast("B")
        n = len(v)
        if not n:
            continue
        addr = address(v)
        i = 0
        while i < n:
            rem = n - i
            same_phase = addr is not None and (addr + i) % a_ == pos % a_
            if same_phase and pos % a_ == 0 and rem >= a_:
                if fill:  # whole blocks waiting (pos is aligned): out first, in file order
                    write_all(fd, buf[:fill])
                    fill = 0
                k = min(rem - rem % a_, CHUNK)
                write_all(fd, v[i:i + k])
                straight += k
                count(k)
                i += k
                pos += k
                continue
            # complete the current block when the rest of the piece can then go straight; else fill the buffer
            amt = min(rem, a_ - pos % a_) if (same_phase and pos % a_) else min(rem, cap - fill)
            buf[fill:fill + amt] = v[i:i + amt]
            fill += amt
            pos += amt
            i += amt
            count(amt)
            if fill == cap:
                write_all(fd, buf[:cap])
                fill = 0
    if fill:
        whole = fill - fill % a_
        if whole:
            write_all(fd, buf[:whole])
        if fill % a_:  # the last partial block: through the page cache (fsync follows)
            _set_direct(fd, False)
            write_all(fd, buf[whole:fill])
    return straight
