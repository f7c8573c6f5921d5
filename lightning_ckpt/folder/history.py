"""The run history of a folder, ``<dirpath>/metrics.jsonl``: one JSON line per committed checkpoint (step, name, tags,
time, metrics), appended by the folder's session after each commit and read by ``lightning-ckpt report`` (the
checkpoints retention or best-k deleted since still show there) and copied by an export. This module owns its name,
its format and both ends: the append goes through the store's file operations (``OPS``, where the fault injection
of the tests reaches it), never through a link; a read takes at most ``MAX_HISTORY_BYTES`` from its end.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

from ..errors import CheckpointError
from ..store.fs import OPS

HISTORY = "metrics.jsonl"
MAX_HISTORY_BYTES = 64 << 20  # a longer history is read from its end
MAX_STEP = 1 << 62


def history_line(step: int, name: str, tags: Any, metrics: dict, when: Optional[float] = None) -> dict:
    """The line recorded for one commit."""
    return {"step": step, "name": name, "tags": tags, "time": time.time() if when is None else when,
            "metrics": metrics}


def history_path(dirpath: str) -> str:
    """Where the history of a local folder is (the file may not exist)."""
    return os.path.join(dirpath, HISTORY)


def append_history(dirpath: str, line: dict) -> None:
    """Append ``line`` to the history of the local folder ``dirpath`` (created when missing; never through a link:
    a link there raises OSError). Raises ValueError for a line that is not JSON (a NaN metric is written as null by
    the caller's metrics, never as NaN)."""
    data = (json.dumps(line, allow_nan=False, default=str) + "\n").encode()
    fd = os.open(history_path(dirpath), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        OPS.write_all(fd, data)
    finally:
        os.close(fd)


def parse_history(raw: bytes) -> tuple[list[dict], int]:
    """The well-formed lines of a history and how many were not."""
    lines, bad = [], 0
    for text in raw.decode("utf-8", "replace").splitlines():
        if not text.strip():
            continue
        try:
            d = json.loads(text)
        except (ValueError, RecursionError):
            bad += 1
            continue
        if (isinstance(d, dict) and isinstance(d.get("name"), str) and isinstance(d.get("step"), int)
                and not isinstance(d.get("step"), bool) and 0 <= d["step"] < MAX_STEP):
            lines.append(d)
        else:
            bad += 1
    return lines, bad


def read_history(store: Any) -> tuple[Optional[list[dict]], int]:
    """The well-formed lines of the history of the folder of ``store`` (None when it has none) and how many lines
    were not. A history that cannot be read counts as none."""
    try:
        raw = _raw(store)
    except (CheckpointError, OSError):
        return None, 0
    return (None, 0) if raw is None else parse_history(raw)


def _raw(store: Any) -> Optional[bytes]:
    # the history is a file of the folder beside its entries (Store.read_file), read from its tail: one grown past
    # the bound loses its oldest lines, from a line start
    raw = store.read_file(HISTORY, MAX_HISTORY_BYTES + 1, tail=True)
    if raw is None or len(raw) <= MAX_HISTORY_BYTES:
        return raw
    raw = raw[-MAX_HISTORY_BYTES:]
    return raw[raw.find(b"\n") + 1:]  # the first line is cut
