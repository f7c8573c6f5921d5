"""Free loopback ports for the servers and process groups the tests start."""
from __future__ import annotations

import random
import socket

_TAKEN: set[int] = set()


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port(offset: int | None = None) -> int:
    """A free loopback port, never handed out before in this process. With ``offset``: a port P below 55535 with
    P + ``offset`` free too (SeaweedFS puts each server's gRPC port at P + 10000)."""
    for _ in range(1000):
        p = random.randrange(20000, 45000)
        others = (p,) if offset is None else (p, p + offset)
        if not _TAKEN.intersection(others) and all(bindable(q) for q in others):
            _TAKEN.update(others)
            return p
    raise RuntimeError("no free loopback port")
