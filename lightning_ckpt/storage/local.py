"""Local filesystem primitives with the durability the commit protocol needs."""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from typing import Iterator


def fsync_dir(path: str) -> None:
    """Make a folder's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; once the block succeeds it replaces ``path`` atomically (readers see
    the old or the new file, never a part), and if the block fails it is removed."""
    parent = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(parent, f".tmp-{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_bytes(path: str, data: bytes, *, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new content, never a mix."""
    with replacing(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
    if fsync:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
