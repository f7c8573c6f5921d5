"""Small file helpers of the test support code."""
from __future__ import annotations

import os


def tail(path: str, n: int = 3000, missing: str = "") -> str:
    """The last ``n`` bytes of the file at ``path`` as text (undecodable bytes replaced), or ``missing`` when it
    cannot be read: the end of a server's or child's log, for a failure message."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return missing
