"""Safetensors files written and read with checksums, without extra copies.

A file is the standard safetensors layout (8-byte little-endian header length, a JSON header padded with spaces
to 8 bytes, then the tensor bytes back to back), so ``safetensors.torch.load_file`` reads every file this package
writes. Encoding hands the store views of each tensor's memory (written straight to the file descriptor, no copy) and
computes a CRC32C of the header and of every tensor's bytes; the checksums of all regions together cover every byte
of the file. No I/O here except checking an open file against its record (``check_file``).
"""
from __future__ import annotations

import json
import os
import struct
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from ..errors import CheckpointCorruptError, CheckpointError
from .checksum import content_hasher, crc32c, crc32c_and_hash, crc32c_combine
from .views import byte_view, byte_views, nbytes_of  # noqa: F401 (re-exported: readers import them from here)

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


@dataclass
class TensorRecord:
    """Where one tensor lives inside a file, and the checksum of its bytes."""

    name: str
    dtype: str
    shape: list[int]
    begin: int  # absolute byte offset in the file
    end: int
    crc32c: int
    xxh128: str | None = None  # content hash (identity), when computed

    def to_json(self) -> dict:
        d = {"dtype": self.dtype, "shape": self.shape, "begin": self.begin, "end": self.end, "crc32c": self.crc32c}
        if self.xxh128 is not None:
            d["xxh128"] = self.xxh128
        return d


@dataclass
class FileRecord:
    """A written file: its size and the checksums that cover all of its bytes."""

    name: str
    size: int
    header_end: int  # bytes [0, header_end) are the length prefix + JSON header
    header_crc32c: int
    tensors: list[TensorRecord] = field(default_factory=list)


def header_bytes(items: Sequence[tuple[str, torch.dtype, Sequence[int], int]], metadata: dict | None,
                 data_phase: tuple[int, int] | None = None) -> tuple[bytes, list[tuple[int, int]]]:
    """The safetensors header (length prefix + JSON padded to 8 bytes) of ``(name, dtype, shape, nbytes)`` items, and
    each item's ``[begin, end)`` relative to the end of the header. ``data_phase=(phase, align)``: pad the JSON (with
    spaces, as the format allows) so that the tensor data starts at an offset that is ``phase`` modulo ``align``."""
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
    if data_phase is not None:
        phase, align = data_phase
        pad = (phase - 8 - len(raw)) % align
    raw += b" " * pad
    return struct.pack("<Q", len(raw)) + raw, offsets


@dataclass
class EncodedFile:
    """A file ready to be written: its bytes as ``pieces`` (views, no copies), and its record (checksums), which may
    still be computed in another thread while the pieces are written."""

    name: str
    pieces: list
    _finish: Callable[[], FileRecord]

    def record(self) -> FileRecord:
        return self._finish()


CHECKSUM_SECONDS = [0.0]  # time spent computing checksums and content hashes (the benchmarks' save breakdown)


def _timed(fn: Callable) -> Callable:
    def run(v):
        t0 = time.perf_counter()
        try:
            return fn(v)
        finally:
            CHECKSUM_SECONDS[0] += time.perf_counter() - t0
    return run


def _sums(views: list) -> list[tuple[int, None]]:
    return [(crc32c(v), None) for v in views]


def _sums_hashed(views: list) -> list[tuple[int, str]]:
    return [crc32c_and_hash(v) for v in views]


CRC_BATCH_BYTES = 4 << 20  # a checksum task covers tensors of about this many bytes (or one larger tensor)


def _batches(sizes: list[int]) -> list[tuple[int, int]]:
    out, start, acc = [], 0, 0
    for i, n in enumerate(sizes):
        acc += n
        if acc >= CRC_BATCH_BYTES:
            out.append((start, i + 1))
            start, acc = i + 1, 0
    if start < len(sizes):
        out.append((start, len(sizes)))
    return out


def direct_io_layout(prepared: list[tuple[str, torch.Tensor]], align: int) -> tuple[list, tuple[int, int] | None]:
    """The order of ``prepared`` (name, CPU tensor) in a file written with direct I/O, and where its data must start
    (``(phase, align)`` for :func:`header_bytes`): the tensors whose size is a multiple of ``align`` and whose memory has
    the most common phase modulo ``align`` first, in memory order (neighbours in memory are neighbours in the file),
    the others after them in their own order. Each of the first then sits in the file at its memory's phase, so a
    direct write takes its bytes straight from its memory (``store/direct.py``). Only the order of the tensors in the
    file changes: readers find every tensor by its offsets."""
    sizes = [nbytes_of(t) for _, t in prepared]
    phases = [t.data_ptr() % align if n else 0 for (_, t), n in zip(prepared, sizes)]
    by_phase: dict[int, int] = {}
    for n, ph in zip(sizes, phases):
        if n >= align and n % align == 0 and ph % 8 == 0:
            by_phase[ph] = by_phase.get(ph, 0) + n
    if not by_phase:
        return prepared, None
    phase = max(sorted(by_phase), key=lambda ph: by_phase[ph])
    first = [i for i, (n, ph) in enumerate(zip(sizes, phases)) if n >= align and n % align == 0 and ph == phase]
    first.sort(key=lambda i: prepared[i][1].data_ptr())
    chosen = set(first)
    order = first + [i for i in range(len(prepared)) if i not in chosen]
    return [prepared[i] for i in order], (phase, align)


def encode_tensors(name: str, tensors: Sequence[tuple[str, torch.Tensor]], metadata: dict | None = None,
                   crc_executor: Executor | None = None, content_hash: bool = True,
                   align: int | None = None) -> EncodedFile:
    """A safetensors file of ``tensors`` (CPU tensors). With ``crc_executor`` the checksums (and with
    ``content_hash`` each tensor's XXH3-128, in the same pass) are computed in that executor while the caller writes,
    so they cost no wall time when the disk is the bottleneck. ``align``: lay the file out for direct I/O with that
    alignment (:func:`direct_io_layout`)."""
    prepared = []
    for tname, t in tensors:
        if t.device.type != "cpu":
            t = t.cpu()
        if t.layout != torch.strided:
            raise CheckpointError(f"tensor {tname!r} has layout {t.layout}; only dense tensors can be checkpointed")
        if not t.is_contiguous():
            t = t.contiguous()
        prepared.append((tname, t))
    data_phase = None
    if align:
        prepared, data_phase = direct_io_layout(prepared, align)
    header, offsets = header_bytes([(n, t.dtype, t.shape, nbytes_of(t)) for n, t in prepared], metadata, data_phase)
    views, pieces = byte_views([t for _, t in prepared])
    fn = _timed(_sums_hashed) if content_hash else _timed(_sums)
    if crc_executor is not None:  # one task per batch of tensors, not one per tensor
        futures = [crc_executor.submit(fn, views[a:b]) for a, b in _batches([len(v) for v in views])]
    else:
        crcs = fn(views)

    def finish() -> FileRecord:
        got = [x for f in futures for x in f.result()] if crc_executor is not None else crcs
        base = len(header)
        return FileRecord(
            name=name,
            size=base + (offsets[-1][1] if offsets else 0),
            header_end=base,
            header_crc32c=crc32c(header),
            tensors=[TensorRecord(n, dtype_name(t.dtype), [int(s) for s in t.shape], base + b, base + e, c, h)
                     for (n, t), (b, e), (c, h) in zip(prepared, offsets, got)],
        )

    return EncodedFile(name, [memoryview(header)] + pieces, finish)


def encode_bytes(name: str, data: bytes) -> EncodedFile:
    """A small non-tensor file; its whole content is one checksummed region."""
    rec = FileRecord(name=name, size=len(data), header_end=len(data), header_crc32c=crc32c(data))
    return EncodedFile(name, [memoryview(data)], lambda: rec)


def header_end_from_prefix(raw_prefix: bytes, file_size: int, where: str) -> int:
    """Validate the 8-byte length prefix of a safetensors file and return where its header ends."""
    if file_size < 8 or len(raw_prefix) < 8:
        raise CheckpointCorruptError(f"{where} is truncated ({file_size} bytes): restore it or use an earlier checkpoint")
    (n,) = struct.unpack("<Q", raw_prefix[:8])
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise CheckpointCorruptError(f"{where} has an invalid header length {n}: the file is corrupt or truncated")
    return 8 + n


def check_header(head: bytes, entry: dict, where: str) -> None:
    """The safetensors header ``head`` (the first ``header_end`` bytes of a file) describes exactly the tensors the
    manifest ``entry`` lists: the same names, dtypes, shapes and byte ranges. (Its checksum only proves it is the
    header that was written; this proves the manifest tells the truth about it.)"""
    hend = entry["header_end"]
    if len(head) != hend or header_end_from_prefix(head, entry["size"], where) != hend:
        raise CheckpointCorruptError(f"{where} has a header that does not match the manifest; the file is corrupt")
    try:
        header = json.loads(head[8:])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        raise CheckpointCorruptError(f"{where} has a header that is not valid JSON ({str(e)[:120]})") from None
    listed = entry.get("tensors") or {}
    if not isinstance(header, dict) or set(header) - {"__metadata__"} != set(listed):
        raise CheckpointCorruptError(f"{where}: its header and the manifest list different tensors; the checkpoint "
                                     "is corrupt or hostile")
    for name, rec in listed.items():
        h = header[name]
        if (not isinstance(h, dict) or h.get("dtype") != rec["dtype"] or h.get("shape") != rec["shape"]
                or h.get("data_offsets") != [rec["begin"] - hend, rec["end"] - hend]):
            raise CheckpointCorruptError(f"{where}: tensor {name[:80]!r} is described differently by the file's header "
                                         "and the manifest; the checkpoint is corrupt or hostile")


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


VERIFY_BLOCK = 64 << 20


def check_file(f, entry: dict, where: str, progress=None, buf: memoryview | None = None) -> None:
    """Check the open file ``f`` against its manifest ``entry``: size, safetensors header length, the CRC32C of
    every region (which together cover every byte) and, in the same pass, the XXH3-128 of every tensor that has its
    content hash recorded (each tensor of a pack: the hash the content store finds it by). ``progress(n)`` is called
    after each block read."""
    size = os.fstat(f.fileno()).st_size
    if size != entry["size"]:
        raise CheckpointCorruptError(f"{where} has {size} bytes where the manifest says {entry['size']}: the file was "
                                     "truncated or replaced. Use an earlier checkpoint.")
    if entry.get("tensors"):
        f.seek(0)
        if header_end_from_prefix(f.read(8), size, where) != entry["header_end"]:
            raise CheckpointCorruptError(f"{where} has a header that does not match the manifest; it is corrupt")
        f.seek(0)
        check_header(f.read(entry["header_end"]), entry, where)
    if buf is None:
        largest = max((e - b for b, e, _ in iter_regions(entry)), default=0)
        buf = memoryview(bytearray(max(1, min(largest, VERIFY_BLOCK))))
    block = len(buf)
    hashes: dict[tuple[int, int], dict[str, str]] = {}  # a tensor's [begin, end) -> {its name: its recorded hash}
    for tname, t in (entry.get("tensors") or {}).items():
        if t.get("xxh128") is not None:
            hashes.setdefault((int(t["begin"]), int(t["end"])), {})[tname] = t["xxh128"]
    for begin, end, expected in sorted(iter_regions(entry)):
        f.seek(begin)
        claims = hashes.get((begin, end)) if begin else None  # (region 0 is the header)
        h = content_hasher() if claims else None
        crc, left = 0, end - begin
        while left:
            k = f.readinto(buf[: min(left, block)])
            if not k:
                raise CheckpointCorruptError(f"{where} ended early; it is truncated")
            crc = crc32c(buf[:k], crc)
            if h is not None:
                h.update(buf[:k])
            left -= k
            if progress is not None:
                progress(k)
        if crc != expected:
            raise CheckpointCorruptError(f"{where}: checksum mismatch in bytes [{begin}, {end}); the file is corrupt. "
                                         "Use an earlier checkpoint (latest_checkpoint skips corrupt ones).")
        if h is not None:
            got = h.hexdigest()
            for tname, want in sorted(claims.items()):
                if want != got:
                    raise content_mismatch(where, tname)


def content_mismatch(where: str, name: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"{where}: tensor {name[:80]!r} does not match the content hash (XXH3-128) its record claims, although its "
        "checksum may: the manifest is corrupt or hostile, and a deduplicated save could have referenced the wrong "
        "bytes through it. Use an earlier checkpoint (latest_checkpoint skips corrupt ones).")


def file_crc32c(entry: dict) -> int:
    """The CRC32C of a whole file, from its manifest entry's region checksums (the regions tile the file)."""
    crc = 0
    for begin, end, region_crc in sorted(iter_regions(entry)):
        crc = crc32c_combine(crc, region_crc, end - begin)
    return crc


def iter_regions(record_like: dict) -> Iterable[tuple[int, int, int]]:
    """(begin, end, crc) of every checksummed region of a file entry in a manifest, header first."""
    yield 0, int(record_like["header_end"]), int(record_like["header_crc32c"])
    for t in record_like.get("tensors", {}).values():
        yield int(t["begin"]), int(t["end"]), int(t["crc32c"])
