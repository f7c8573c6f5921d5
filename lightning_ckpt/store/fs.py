"""The filesystem calls of the commit and deletion protocols, and the safe way to open a member of an entry.

Every write, fsync, rename and removal the stores make goes through :data:`OPS` (one :class:`FsOps`), so the
fault-injection tests can kill a process at each of them by replacing its methods. Readers open members with
:func:`open_member`: never through a link, never blocking on a FIFO, only a regular file of the expected size.

Durable writes of large files use ``O_DIRECT`` (see :mod:`.direct`): the bytes go from the caller's memory to the disk
without a copy into the page cache.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import threading
import time
from typing import Any

from ..errors import CheckpointCorruptError
from . import direct

_WRITE_CHUNK = 1 << 30


class IoTimes(threading.local):
    """Seconds this thread spent in ``write`` and in ``fsync`` (the save breakdown of the benchmarks), the bytes it
    wrote, and how many of them went to the disk with ``O_DIRECT`` (``direct_bytes``). ``on_bytes``: called with each
    piece's size as it is written (a save's progress)."""

    def __init__(self) -> None:
        self.write_s = 0.0
        self.fsync_s = 0.0
        self.bytes = 0
        self.direct_bytes = 0
        self.on_bytes: Any = None

    def reset(self) -> tuple[float, float, int]:
        got = (self.write_s, self.fsync_s, self.bytes)
        self.write_s = self.fsync_s = 0.0
        self.bytes = self.direct_bytes = 0
        return got

    def count(self, n: int) -> None:
        self.bytes += n
        if self.on_bytes is not None:
            self.on_bytes(n)


IO_TIMES = IoTimes()


class FsOps:
    """The filesystem calls of the commit and deletion protocols (one place to fault-inject them)."""

    def write_all(self, fd: int, data: Any) -> None:
        mv = memoryview(data).cast("B")
        off, n = 0, len(mv)
        while off < n:
            off += os.write(fd, mv[off : off + _WRITE_CHUNK])

    def write_file(self, path: str, data: Any, *, fsync: bool) -> None:
        """Create or truncate ``path`` (never through a link) and write ``data`` (bytes, or a list of buffers written
        back to back), fsynced when asked. A durable file of at least ``direct.MIN_BYTES`` is written with
        ``O_DIRECT`` where the filesystem takes it (see :mod:`.direct`), else through the page cache."""
        pieces = data if isinstance(data, list) else [data]
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        fd = -1
        if fsync and direct.wanted(sum(memoryview(p).nbytes for p in pieces)):
            fd = direct.open_for_write(path, flags)
        if fd < 0:
            fd = os.open(path, flags, 0o644)
        try:
            t0 = time.perf_counter()
            if not (direct.is_direct(fd) and self._write_direct(fd, pieces)):
                for piece in pieces:
                    self.write_all(fd, piece)
                    IO_TIMES.count(memoryview(piece).nbytes)
            t1 = time.perf_counter()
            IO_TIMES.write_s += t1 - t0
            if fsync:
                os.fsync(fd)
                IO_TIMES.fsync_s += time.perf_counter() - t1
        finally:
            os.close(fd)

    def _write_direct(self, fd: int, pieces: list) -> bool:
        """Write ``pieces`` through the ``O_DIRECT`` descriptor ``fd`` (each write goes through :meth:`write_all`).
        False when the filesystem refused an aligned write (``EINVAL``): the file is then empty again, no longer in
        direct mode, and the caller writes it through the page cache."""
        counted = [0]

        def count(k: int) -> None:
            counted[0] += k
            IO_TIMES.count(k)

        try:
            n = direct.write_pieces(fd, pieces, self.write_all, count)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            direct.refuse(fd)  # this filesystem: page cache from now on
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            IO_TIMES.count(-counted[0])  # the buffered write counts them again
            return False
        IO_TIMES.direct_bytes += n
        return True

    def fsync_file(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def exchange(self, a: str, b: str) -> bool:
        """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system cannot."""
        return _rename_exchange(a, b)

    def copy_file(self, src: str, dst: str, *, fsync: bool) -> None:
        """Copy the local file ``src`` into a new file ``dst`` (created, never through a link), fsynced when asked."""
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            with open(src, "rb") as f:
                while True:
                    chunk = f.read(8 << 20)
                    if not chunk:
                        break
                    self.write_all(fd, chunk)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def rmtree(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def unlink(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


OPS = FsOps()

_libc: Any = None


def _rename_exchange(a: str, b: str) -> bool:
    global _libc
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        fn = _libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # this filesystem cannot swap: the caller falls back to two renames
    raise OSError(err, os.strerror(err), a)


# ------------------------------------------------------------------------------------------------ reading members
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_LINK = ("is a symbolic link; a checkpoint's folders and files must be real folders and regular files inside its "
         "run folder. Do not load it; use an earlier checkpoint.")


def open_dir(folder: str, *, follow: bool = False, where: str | None = None) -> int:
    """A descriptor of the directory ``folder``, never through a link as its last component (``follow``: a store's
    root, the folder the user named, may be one). Members are then opened relative to it (``dir_fd``), so a link
    swapped in for a checkpoint folder, or for ``.blobs``, after it was listed is refused too. Raises
    CheckpointCorruptError."""
    where = where or folder
    flags = os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        return os.open(folder, flags)
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{where} is missing; the checkpoint is incomplete, use an earlier one") from None
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno == errno.ENOTDIR and os.path.islink(folder)):
            raise CheckpointCorruptError(f"{where} {_LINK}") from None
        if e.errno == errno.ENOTDIR:
            raise CheckpointCorruptError(f"{where} is not a folder; use an earlier checkpoint") from None
        raise CheckpointCorruptError(f"cannot open {where} ({e.strerror or e}); use an earlier checkpoint") from None


def open_member(folder: str, fname: str, size: int | None = None, *, where: str | None = None,
                follow_folder: bool = False) -> int:
    """Open ``folder/fname`` for reading: never through a link (neither ``folder``'s last component, unless
    ``follow_folder``, nor any component of ``fname``), never blocking on a FIFO, only a regular file, and (when
    ``size`` is given) only of exactly that size. Returns a file descriptor. Raises CheckpointCorruptError."""
    path = os.path.join(folder, fname)
    where = where or path
    dfd = open_dir(folder, follow=follow_folder)
    try:
        *subdirs, leaf = fname.split("/")
        for i, sub in enumerate(subdirs):  # a member below a subfolder: each folder on the way, no link either
            try:
                nfd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC, dir_fd=dfd)
            except OSError as e:
                raise _open_error(e, os.path.join(folder, *subdirs[: i + 1])) from None
            os.close(dfd)
            dfd = nfd
        try:
            fd = os.open(leaf, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC, dir_fd=dfd)
        except OSError as e:
            raise _open_error(e, where) from None
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointCorruptError(f"{where} is not a regular file; a checkpoint's files must be regular files "
                                         "inside its folder. Do not load it; use an earlier checkpoint.")
        if size is not None and st.st_size != size:
            raise CheckpointCorruptError(f"{where} has {st.st_size} bytes where the manifest says {size}: the file "
                                         "was truncated or replaced. Use an earlier checkpoint.")
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_error(e: OSError, where: str) -> CheckpointCorruptError:
    if isinstance(e, FileNotFoundError):
        return CheckpointCorruptError(f"{where} is missing; the checkpoint is incomplete, use an earlier one")
    if e.errno in (errno.ELOOP, errno.ENOTDIR):
        return CheckpointCorruptError(f"{where} {_LINK}" if e.errno == errno.ELOOP else
                                      f"{where} is not a folder; use an earlier checkpoint")
    return CheckpointCorruptError(f"cannot open {where} ({e.strerror or e}); use an earlier checkpoint")


def read_member(folder: str, fname: str, limit: int, *, size: int | None = None, where: str | None = None,
                follow_folder: bool = False) -> bytes:
    """The whole content of a (small) member, at most ``limit`` bytes, opened as :func:`open_member` does."""
    fd = open_member(folder, fname, size, where=where, follow_folder=follow_folder)
    with os.fdopen(fd, "rb", buffering=0) as f:
        n = os.fstat(f.fileno()).st_size
        if n > limit:
            raise CheckpointCorruptError(f"{where or os.path.join(folder, fname)} has {n} bytes, more than the "
                                         f"{limit} such a file may have; refusing to read it")
        raw = f.read(n + 1)
    if len(raw) != n:
        raise CheckpointCorruptError(f"{where or os.path.join(folder, fname)} changed size while it was read")
    return raw


def check_output_path(path: Any, what: str = "the output", *, folder: bool = False) -> str:
    """``path`` made absolute, or a ValueError when a folder on the way to it (``folder``: or ``path`` itself) is a
    file: a write there would fail deep inside with NotADirectoryError or FileExistsError."""
    p = os.path.abspath(os.fspath(path))
    parent = p if folder else os.path.dirname(p)
    while not os.path.lexists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if os.path.lexists(parent) and not os.path.isdir(parent):
        raise ValueError(f"cannot write {what} {p}: {parent} is a file, not a folder; choose another path")
    return p


def is_real_dir(path: str) -> bool:
    """``path`` is a folder itself, not a link to one (``lstat``); False when it is missing or unreadable."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def is_real_file(path: str) -> bool:
    """``path`` is a regular file itself, not a link to one (``lstat``); False when it is missing or unreadable."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
