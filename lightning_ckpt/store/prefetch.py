"""Getting a restore's bytes and memory ready before the readers need them (issue 14, the read path).

A cold restore into freshly allocated tensors does three things per byte: the disk reads it into the page cache, the
kernel faults in a page of the destination tensor, and the reader copies it there and checksums it. Done in one
thread, one after the other, the page faults alone (0.2 to 0.5 s per 0.8 GB on the VMs this package is measured on,
and they do not get faster with more threads) add to the disk time. :class:`Prefetcher` overlaps them: it asks the
kernel to read the files ahead (``posix_fadvise(WILLNEED)``, once per file, when the files fit comfortably in free
memory) and, in one helper thread, faults in the destination memory (``madvise(MADV_POPULATE_WRITE)``, Linux 5.14+)
in the order the readers will fill it, while the readers copy and checksum what is already there. Where the system
has neither call, the readers fault in the memory themselves, as before.
"""
from __future__ import annotations

import ctypes
import os
import threading
from typing import Sequence

GRANULE = 16 << 20  # bytes of destination memory faulted in per step
MIN_BYTES = 64 << 20  # smaller restores: not worth a thread
PAGE = 4096
MADV_POPULATE_WRITE = 23

_libc = None


def _madvise():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _libc.madvise.restype = ctypes.c_int
        except (OSError, AttributeError):
            _libc = False
    return _libc.madvise if _libc else None


def populate(ptr: int, nbytes: int) -> bool:
    """Fault in ``[ptr, ptr + nbytes)`` of this process's memory for writing. False where the system cannot."""
    fn = _madvise()
    if fn is None or nbytes <= 0 or not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    start = ptr - ptr % PAGE
    return fn(start, ptr + nbytes - start, MADV_POPULATE_WRITE) == 0


def mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class Prefetcher:
    """Readahead of ``fds`` and population of each reader's destination regions, in a helper thread.

    ``regions[r]``: reader ``r``'s destination regions in the order it fills them, each ``(address, nbytes)`` or
    ``None`` (not host memory to prepare: ready at once). Readers call :meth:`wait` before they fill bytes
    ``[0, upto)`` of their region ``i``; granules are prepared round-robin across readers."""

    def __init__(self, fds: Sequence[int], regions: Sequence[Sequence[tuple[int, int] | None]], nbytes: int) -> None:
        self.fds = list(fds)
        self.regions = [list(r) for r in regions]
        self.ready = [[0] * len(rs) for rs in self.regions]
        self.cond = threading.Condition()
        self.stopped = False
        self.nbytes = nbytes
        self.thread = threading.Thread(target=self._run, name="lightning_ckpt-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            if self.nbytes <= mem_available() // 2 and hasattr(os, "posix_fadvise"):
                for fd in self.fds:  # the disk starts on everything now; the readers copy from the page cache
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                    except OSError:
                        break
            cursors = [[0, 0] for _ in self.regions]  # per reader: region index, bytes prepared
            active = True
            while active and not self.stopped:
                active = False
                for r, regs in enumerate(self.regions):
                    i, done = cursors[r]
                    while i < len(regs) and (regs[i] is None or done >= regs[i][1]):
                        i, done = i + 1, 0
                    cursors[r] = [i, done]
                    if i >= len(regs):
                        continue
                    active = True
                    addr, n = regs[i]
                    k = min(GRANULE, n - done)
                    if not populate(addr + done, k):
                        return  # not available here: the readers fault their memory in themselves
                    cursors[r][1] = done + k
                    with self.cond:
                        self.ready[r][i] = done + k
                        self.cond.notify_all()
        finally:
            with self.cond:
                self.stopped = True
                self.cond.notify_all()

    def wait(self, reader: int, i: int, upto: int) -> None:
        if self.regions[reader][i] is None:
            return
        with self.cond:
            while not self.stopped and self.ready[reader][i] < upto:
                self.cond.wait()

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.thread.join()
