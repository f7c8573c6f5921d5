"""Checksums and content hashes.

Integrity: hardware CRC32C (SSE4.2 / ARMv8 CRC instructions through the ``crc32c`` package, ~16 GB/s here) over every
byte of every file. Identity (which tensors are the same bytes, for deduplicated checkpoints): XXH3-128 through the
``xxhash`` package, ~12 GB/s on one core here (BLAKE3 measured 2.3 GB/s, SHA-256 0.9 GB/s on the same machine; see
docs/DESIGN.md). XXH3-128 is not cryptographic: identity is always checked together with size, dtype and shape, and
the store only ever compares hashes of bytes this package wrote itself. Both packages release the GIL for large
buffers, so checksums and hashes overlap file I/O in another thread.
"""
from __future__ import annotations

import crc32c as _crc32c
import xxhash as _xxhash

ALGORITHM = "crc32c"
CONTENT_HASH = "xxh128"
_STEP = 1 << 20  # one pass over the data: each 1 MiB piece is checksummed and hashed while it is in the cache


def crc32c(data, value: int = 0) -> int:
    """CRC32C of ``data`` (any buffer), continuing from ``value``."""
    return _crc32c.crc32c(data, value=value)


def content_hash(data) -> str:
    """The XXH3-128 of ``data`` (any buffer) as 32 hex digits."""
    return _xxhash.xxh3_128_hexdigest(data)


def content_hasher():
    """An incremental XXH3-128 (``update(piece)``, then ``hexdigest()``): the content hash of bytes read in pieces."""
    return _xxhash.xxh3_128()


def crc32c_and_hash(data) -> tuple[int, str]:
    """The CRC32C and the XXH3-128 of ``data`` in one pass over memory."""
    view = memoryview(data).cast("B")
    if len(view) <= _STEP:
        return _crc32c.crc32c(view), _xxhash.xxh3_128_hexdigest(view)
    h, crc = _xxhash.xxh3_128(), 0
    for i in range(0, len(view), _STEP):
        piece = view[i:i + _STEP]
        crc = _crc32c.crc32c(piece, value=crc)
        h.update(piece)
    return crc, h.hexdigest()


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
    if len(_ZEROS) < 64:  # built whole, then published: threads uploading a checkpoint's files call this at once
        ops = []
        op = [_POLY] + [1 << n for n in range(31)]  # one zero bit
        for _ in range(3):  # -> one zero byte
            op = _gf2_square(op)
        for _ in range(64):
            ops.append(op)
            op = _gf2_square(op)
        _ZEROS[:] = ops
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
