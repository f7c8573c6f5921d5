"""The folder lock: one run writes a folder at a time.

``<folder>/.lock`` is held with ``flock`` by the one process that writes the folder (rank 0, or each node-local
folder's leader). The kernel releases it when that process dies, so a crashed run never leaves a stale lock; on NFS,
Linux maps ``flock`` to the server's byte-range locks. The file records who holds it, for the error message a second
run gets. Where the filesystem refuses locks, taking it fails with an error that says how to opt out
(``LIGHTNING_CKPT_LOCK=0``: then nothing stops two runs from sharing the folder).
"""
from __future__ import annotations

import errno
import json
import os
import stat
import time

from ..errors import CheckpointWriteError
from .base import LOCK_FILE, owner_token


class FolderBusyError(CheckpointWriteError):
    """Another live process holds the folder's lock: two runs must not write into one folder."""


class LockFileError(CheckpointWriteError):
    """``<folder>/.lock`` is not a regular file (a directory, a symbolic link, a FIFO, ...): the lock cannot be taken
    or read through it, and it is never followed. Remove it; a lock file is made again by the next run."""


def check_lock_file(path: str) -> bool:
    """Whether the lock file ``path`` exists; raises :class:`LockFileError` when it is anything but a regular file
    (checked with ``lstat``: a link is never followed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise LockFileError(f"cannot check the folder lock {path} ({e.strerror or e})") from None
    if stat.S_ISREG(st.st_mode):
        return True
    what = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode)
            else "not a regular file")
    raise LockFileError(f"{path} is {what}, not the folder's lock file: nothing was written or deleted. Remove it "
                        f"(`rm -r {path}`; a new lock file is made by the next run) and start again.")


class FolderLock:
    """``<folder>/.lock``, held with ``flock`` by the one process that writes the folder (rank 0, or each node-local
    folder's leader). The kernel releases it when that process dies, so a crashed run never leaves a stale lock; on
    NFS, Linux maps ``flock`` to the server's byte-range locks. The file records who holds it, for the error message
    a second run gets. Where the filesystem refuses locks, taking it fails with an error that says how to opt out
    (``LIGHTNING_CKPT_LOCK=0``: then nothing stops two runs from sharing the folder)."""

    _held: dict[str, "FolderLock"] = {}  # path -> lock held by this process (never opened twice: see release)

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LOCK_FILE)
        self.fd: int | None = None
        self.info: dict = {}

    @staticmethod
    def enabled() -> bool:
        return os.environ.get("LIGHTNING_CKPT_LOCK", "1").strip().lower() not in ("0", "false", "no", "off")

    def acquire(self, info: dict) -> None:
        import fcntl

        if not self.enabled():
            return
        held = FolderLock._held.get(self.path)
        if held is not None:
            raise FolderBusyError(self._busy_message(held.info, same_process=True))
        os.makedirs(self.folder, exist_ok=True)
        check_lock_file(self.path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0),
                         0o644)
        except OSError as e:  # replaced between the check and the open, or not writable
            check_lock_file(self.path)
            raise LockFileError(f"cannot open the folder lock {self.path} ({e.strerror or e}); check the folder's "
                                "permissions, or remove the file and start again") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            check_lock_file(self.path)
            raise LockFileError(f"{self.path} is not a regular file; remove it and start again")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_lock_info(fd)
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise FolderBusyError(self._busy_message(holder)) from None
            raise CheckpointWriteError(
                f"cannot lock {self.folder} ({e.strerror or e}): this filesystem does not support file locks, so two "
                "runs writing into this folder could not be told apart. Use a folder on a filesystem with locks, or "
                "set LIGHTNING_CKPT_LOCK=0 if you make sure only one run writes into it.") from None
        self.info = {"host": os.uname().nodename if hasattr(os, "uname") else "?", "pid": os.getpid(),
                     "owner": owner_token(), "since": time.time(), **info}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.info).encode(), 0)
        self.fd = fd
        FolderLock._held[self.path] = self

    def release(self) -> None:
        if self.fd is None:
            return
        FolderLock._held.pop(self.path, None)
        os.close(self.fd)  # closing the only descriptor of the file releases the lock
        self.fd = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock for real (False when locks are disabled: ``LIGHTNING_CKPT_LOCK=0``).
        Only a real holder may treat every writer's leftovers in the folder as its own."""
        return self.fd is not None

    def mine(self) -> bool:
        """Whether this process holds the lock."""
        return self.path in FolderLock._held

    def holder(self) -> dict | None:
        """The holder's details when the lock is held (by anyone), else None. Never blocks."""
        import fcntl

        held = FolderLock._held.get(self.path)
        if held is not None:
            return held.info
        if not check_lock_file(self.path):
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            check_lock_file(self.path)
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise LockFileError(f"{self.path} is not a regular file; remove it and start again")
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    return _read_lock_info(fd) or {"pid": "?", "host": "?"}
                return None
            return None
        finally:
            os.close(fd)

    def _busy_message(self, holder: dict | None, same_process: bool = False) -> str:
        h = holder or {}
        who = "this same process" if same_process else f"process {h.get('pid', '?')} on {h.get('host', '?')}"
        since = h.get("since")
        when = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if isinstance(since, (int, float)) else ""
        run = f" (run {h['run_id']})" if h.get("run_id") else ""
        return (f"{self.folder} is being written by another run: {who}{run} holds its lock{when}. Two runs in one "
                "folder would delete each other's saves. Wait for that run to end, give this run another dirpath, "
                "or, if it is a run you meant to continue, stop the other one first and resume this one "
                "(resume='auto' or ckpt_path).")


def _read_lock_info(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 4096, 0)
        d = json.loads(raw) if raw else None
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None
