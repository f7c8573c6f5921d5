"""Safetensors files written and read with checksums, without extra copies.

A file is the standard safetensors layout (8-byte little-endian header length, a JSON header padded with spaces
to 8 bytes, then the tensor bytes back to back), so ``safetensors.torch.load_file`` reads every file this module
writes. Writing streams each tensor's memory straight to the file descriptor and computes a CRC32C of the header
and of every tensor's bytes; the checksums of all regions together cover every byte of the file.
"""
from __future__ import annotations

import json
import os
import struct
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from ..errors import CheckpointCorruptError, CheckpointError
from .checksum import crc32c

DTYPE_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
}
ST_TO_DTYPE: dict[str, torch.dtype] = {v: k for k, v in DTYPE_TO_ST.items()}

# A header larger than this is refused before it is read (safetensors itself uses 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
_WRITE_CHUNK = 1 << 30


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_TO_ST[dtype]
    except KeyError:
        raise CheckpointError(
            f"tensors of dtype {dtype} cannot be stored in a safetensors checkpoint; supported dtypes are "
            f"{sorted(str(d) for d in DTYPE_TO_ST)}. Convert the tensor (for example with .to(torch.float32)) "
            "or keep it out of the checkpointed state."
        ) from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return ST_TO_DTYPE[name]
    except KeyError:
        raise CheckpointCorruptError(f"unknown tensor dtype {name!r} in a checkpoint file") from None


def byte_view(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor."""
    if t.device.type != "cpu":
        raise ValueError(f"byte_view needs a CPU tensor, got one on {t.device}")
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    flat = t.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def nbytes_of(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class TensorRecord:
    """Where one tensor lives inside a file, and the checksum of its bytes."""

    name: str
    dtype: str
    shape: list[int]
    begin: int  # absolute byte offset in the file
    end: int
    crc32c: int

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "shape": self.shape, "begin": self.begin, "end": self.end, "crc32c": self.crc32c}


@dataclass
class FileRecord:
    """A written file: its size and the checksums that cover all of its bytes."""

    name: str
    size: int
    header_end: int  # bytes [0, header_end) are the length prefix + JSON header
    header_crc32c: int
    tensors: list[TensorRecord] = field(default_factory=list)


def _header_bytes(items: Sequence[tuple[str, torch.dtype, Sequence[int], int]], metadata: dict | None) -> tuple[bytes, list[tuple[int, int]]]:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offsets = []
    pos = 0
    for name, dtype, shape, nbytes in items:
        if name == "__metadata__":
            raise CheckpointError("a tensor may not be named '__metadata__' in a safetensors file")
        header[name] = {"dtype": dtype_name(dtype), "shape": [int(s) for s in shape], "data_offsets": [pos, pos + nbytes]}
        offsets.append((pos, pos + nbytes))
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    pad = (8 - (8 + len(raw)) % 8) % 8
    raw += b" " * pad
    return struct.pack("<Q", len(raw)) + raw, offsets


def _write_all(fd: int, mv: memoryview) -> None:
    off, n = 0, len(mv)
    while off < n:
        off += os.write(fd, mv[off : off + _WRITE_CHUNK])


def write_tensor_file(
    path: str,
    tensors: Sequence[tuple[str, torch.Tensor]],
    metadata: dict | None = None,
    *,
    fsync: bool = True,
    crc_executor: Executor | None = None,
) -> FileRecord:
    """Write ``tensors`` (CPU tensors) to ``path`` as a safetensors file and return its record.

    With ``crc_executor`` the checksums are computed in that executor while the main thread writes, so the
    checksum costs no wall time when the disk is the bottleneck.
    """
    prepared = []
    for name, t in tensors:
        if t.device.type != "cpu":
            t = t.cpu()
        if t.layout != torch.strided:
            raise CheckpointError(f"tensor {name!r} has layout {t.layout}; only dense tensors can be checkpointed")
        if not t.is_contiguous():
            t = t.contiguous()
        prepared.append((name, t))
    header, offsets = _header_bytes([(n, t.dtype, t.shape, nbytes_of(t)) for n, t in prepared], metadata)
    views = [byte_view(t) for _, t in prepared]
    if crc_executor is not None:
        futures = [crc_executor.submit(crc32c, v) for v in views]
        crcs = None
    else:
        futures = None
        crcs = [crc32c(v) for v in views]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, memoryview(header))
        for v in views:
            _write_all(fd, v)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    if futures is not None:
        crcs = [f.result() for f in futures]
    base = len(header)
    records = [
        TensorRecord(name, dtype_name(t.dtype), [int(s) for s in t.shape], base + b, base + e, c)
        for (name, t), (b, e), c in zip(prepared, offsets, crcs)
    ]
    return FileRecord(
        name=os.path.basename(path),
        size=base + (offsets[-1][1] if offsets else 0),
        header_end=base,
        header_crc32c=crc32c(header),
        tensors=records,
    )


def write_bytes_file(path: str, data: bytes, *, fsync: bool = True) -> FileRecord:
    """Write a small non-tensor file; its whole content is one checksummed region."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, memoryview(data))
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return FileRecord(name=os.path.basename(path), size=len(data), header_end=len(data), header_crc32c=crc32c(data))


def header_end_from_prefix(raw_prefix: bytes, file_size: int, where: str) -> int:
    """Validate the 8-byte length prefix of a safetensors file and return where its header ends."""
    if file_size < 8 or len(raw_prefix) < 8:
        raise CheckpointCorruptError(f"{where} is truncated ({file_size} bytes): restore it or use an earlier checkpoint")
    (n,) = struct.unpack("<Q", raw_prefix[:8])
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise CheckpointCorruptError(f"{where} has an invalid header length {n}: the file is corrupt or truncated")
    return 8 + n


def read_header(path: str) -> tuple[int, dict]:
    """Read the JSON header of a safetensors file. Returns (header_end, header dict)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        end = header_end_from_prefix(prefix, size, path)
        raw = f.read(end - 8)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointCorruptError(f"{path} has a header that is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise CheckpointCorruptError(f"{path} has a header that is not a JSON object; the file is corrupt")
    return end, header


def readinto_exact(f, mv: memoryview, where: str) -> None:
    got = 0
    n = len(mv)
    while got < n:
        k = f.readinto(mv[got:])
        if not k:
            raise CheckpointCorruptError(f"{where} ended after {got} of {n} bytes: the file is truncated")
        got += k


def iter_regions(record_like: dict) -> Iterable[tuple[int, int, int]]:
    """(begin, end, crc) of every checksummed region of a file entry in a manifest, header first."""
    yield 0, int(record_like["header_end"]), int(record_like["header_crc32c"])
    for t in record_like.get("tensors", {}).values():
        yield int(t["begin"]), int(t["end"]), int(t["crc32c"])
