"""Checksums: hardware CRC32C (SSE4.2 / ARMv8 CRC instructions through the ``crc32c`` package, ~16 GB/s here).

The ``crc32c`` package releases the GIL for large buffers, so checksums can overlap file I/O in another thread.
"""
from __future__ import annotations

import crc32c as _crc32c

ALGORITHM = "crc32c"


def crc32c(data, value: int = 0) -> int:
    """CRC32C of ``data`` (any buffer), continuing from ``value``."""
    return _crc32c.crc32c(data, value=value)


def hardware_accelerated() -> bool:
    return bool(getattr(_crc32c, "hardware_based", False))


_POLY = 0x82F63B78  # CRC32C (Castagnoli), reflected


def _gf2_times(mat: list[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_square(mat: list[int]) -> list[int]:
    return [_gf2_times(mat, mat[n]) for n in range(32)]


_ZEROS: list[list[int]] = []  # _ZEROS[k]: the operator that appends 2**k zero bytes to a CRC


def _zero_operators() -> list[list[int]]:
    if not _ZEROS:
        op = [_POLY] + [1 << n for n in range(31)]  # one zero bit
        for _ in range(3):  # -> one zero byte
            op = _gf2_square(op)
        for _ in range(64):
            _ZEROS.append(op)
            op = _gf2_square(op)
    return _ZEROS


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC32C of ``A + B`` from ``crc32c(A)``, ``crc32c(B)`` and ``len(B)`` (zlib's ``crc32_combine`` for the
    Castagnoli polynomial): a whole file's checksum from its regions' checksums, without reading it."""
    ops = _zero_operators()
    k = 0
    while len2 > 0:
        if len2 & 1:
            crc1 = _gf2_times(ops[k], crc1)
        len2 >>= 1
        k += 1
    return crc1 ^ crc2
