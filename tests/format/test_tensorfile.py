"""Safetensors files written by lightning_ckpt: readable by safetensors itself, checksums over every byte."""
from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lightning_ckpt import CheckpointCorruptError, CheckpointError
from lightning_ckpt.format.checksum import crc32c
from lightning_ckpt.format.tensorfile import (
    DTYPE_TO_ST,
    encode_bytes,
    encode_tensors,
    header_end_from_prefix,
    iter_regions,
    read_header,
)
from lightning_ckpt.store.fs import OPS


def write_tensor_file(path, tensors, metadata=None, crc_executor=None):
    """Encode and write a safetensors file the way a store transaction does; returns its record."""
    enc = encode_tensors(os.path.basename(path), tensors, metadata, crc_executor)
    OPS.write_file(path, enc.pieces, fsync=False)
    return enc.record()


def write_bytes_file(path, data):
    enc = encode_bytes(os.path.basename(path), data)
    OPS.write_file(path, enc.pieces, fsync=False)
    return enc.record()


def sample(dtype: torch.dtype, shape=(3, 5)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype, generator=g)
    if dtype.is_floating_point:
        x = torch.randn(shape, generator=g) * 3
        return x.to(dtype)
    info = torch.iinfo(dtype)
    # bit patterns across the whole range (including the sign bit / top bit)
    raw = torch.randint(0, 256, (int(torch.Size(shape).numel()) * (info.bits // 8),), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def entry_of(rec) -> dict:
    """The file record as the manifest stores it."""
    return {
        "size": rec.size,
        "header_end": rec.header_end,
        "header_crc32c": rec.header_crc32c,
        "tensors": {t.name: t.to_json() for t in rec.tensors},
    }


ALL_DTYPES = sorted(DTYPE_TO_ST, key=str)


@pytest.mark.parametrize("crc_pool", [False, True], ids=["inline-crc", "crc-executor"])
def test_every_supported_dtype_is_read_back_identically_by_safetensors(tmp_path, crc_pool):
    tensors = [(f"t_{str(dt).removeprefix('torch.')}", sample(dt)) for dt in ALL_DTYPES]
    path = str(tmp_path / "all.safetensors")
    if crc_pool:
        with ThreadPoolExecutor(2) as ex:
            rec = write_tensor_file(path, tensors, metadata={"format": "pt"}, crc_executor=ex)
    else:
        rec = write_tensor_file(path, tensors, metadata={"format": "pt"})
    loaded = load_file(path)
    assert set(loaded) == {n for n, _ in tensors}
    for name, t in tensors:
        assert bitwise_equal(t, loaded[name]), name
    assert rec.size == (tmp_path / "all.safetensors").stat().st_size
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}


@pytest.mark.parametrize(
    "name,tensor",
    [
        ("scalar_f32", torch.tensor(3.25)),
        ("scalar_bool", torch.tensor(True)),
        ("scalar_bf16", torch.tensor(-1.5, dtype=torch.bfloat16)),
        ("empty_1d", torch.empty(0)),
        ("empty_2d", torch.empty(0, 4, dtype=torch.int64)),
        ("empty_mid", torch.empty(3, 0, 2, dtype=torch.bfloat16)),
        ("transposed", torch.arange(12.0).reshape(3, 4).t()),
        ("strided", torch.arange(40, dtype=torch.int16).reshape(5, 8)[::2, 1::3]),
        ("expanded", torch.tensor([1.0, 2.0]).expand(3, 2)),
        ("offset_view", torch.arange(10, dtype=torch.float64)[3:7]),
        ("bool_noncontig", (torch.arange(12).reshape(3, 4) % 3 == 0).t()),
        ("bf16_noncontig", torch.randn(4, 6).to(torch.bfloat16)[:, ::2]),
    ],
)
def test_special_shapes_and_layouts_round_trip(tmp_path, name, tensor):
    path = str(tmp_path / "x.safetensors")
    other = torch.arange(5, dtype=torch.int32)  # a neighbour, so offsets matter
    rec = write_tensor_file(path, [("before", other), (name, tensor), ("after", other)])
    loaded = load_file(path)
    assert bitwise_equal(tensor.contiguous(), loaded[name])
    assert loaded[name].shape == tensor.shape
    assert torch.equal(loaded["before"], other) and torch.equal(loaded["after"], other)
    assert [t.shape for t in rec.tensors] == [[5], list(tensor.shape), [5]]


def test_input_tensors_are_not_modified(tmp_path):
    t = torch.arange(12.0).reshape(3, 4).t()
    before = t.clone()
    write_tensor_file(str(tmp_path / "x.safetensors"), [("t", t)])
    assert torch.equal(t, before) and t.stride() == (1, 4) and not t.is_contiguous()


def test_empty_file_is_valid(tmp_path):
    path = str(tmp_path / "none.safetensors")
    rec = write_tensor_file(path, [])
    assert load_file(path) == {}
    assert rec.size == (tmp_path / "none.safetensors").stat().st_size == rec.header_end


def test_header_is_aligned_and_standard(tmp_path):
    path = str(tmp_path / "x.safetensors")
    rec = write_tensor_file(path, [("a", torch.ones(3, dtype=torch.float16)), ("b", torch.ones(1, dtype=torch.int8))], metadata={"k": 1})
    raw = (tmp_path / "x.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert rec.header_end == 8 + n and rec.header_end % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    assert header["__metadata__"] == {"k": "1"}
    assert header["a"] == {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]}
    assert header["b"] == {"dtype": "I8", "shape": [1], "data_offsets": [6, 7]}
    end, parsed = read_header(path)
    assert end == rec.header_end and parsed == header


def test_checksummed_regions_cover_every_byte_exactly_once(tmp_path):
    tensors = [(f"t{i}", sample(dt, shape)) for i, (dt, shape) in enumerate(
        [(torch.float32, (4, 3)), (torch.bool, (7,)), (torch.float32, (0,)), (torch.bfloat16, ()), (torch.int64, (2, 2))])]
    path = tmp_path / "x.safetensors"
    rec = write_tensor_file(str(path), tensors, metadata={"format": "pt"})
    raw = path.read_bytes()
    assert rec.size == len(raw)
    regions = sorted(iter_regions(entry_of(rec)))
    pos = 0
    for begin, end, expected in regions:
        assert begin == pos, "regions leave a gap or overlap"
        assert crc32c(raw[begin:end]) == expected
        pos = end
    assert pos == len(raw), "the regions do not reach the end of the file"


def test_any_flipped_byte_breaks_a_checksum(tmp_path):
    path = tmp_path / "x.safetensors"
    rec = write_tensor_file(str(path), [("a", torch.arange(6.0)), ("b", torch.tensor([True, False])), ("c", torch.tensor(7))])
    raw = bytearray(path.read_bytes())
    regions = list(iter_regions(entry_of(rec)))
    for i in range(len(raw)):
        bad = bytearray(raw)
        bad[i] ^= 0x01
        assert any(crc32c(bytes(bad[b:e])) != c for b, e, c in regions), f"a flip at byte {i} went unnoticed"


def test_tensor_records_point_at_the_tensor_bytes(tmp_path):
    t = torch.arange(10, dtype=torch.int32)
    path = tmp_path / "x.safetensors"
    rec = write_tensor_file(str(path), [("w", t)])
    (tr,) = rec.tensors
    raw = path.read_bytes()
    assert raw[tr.begin : tr.end] == t.numpy().tobytes()
    assert (tr.name, tr.dtype, tr.shape) == ("w", "I32", [10])


def test_bytes_file_is_one_checksummed_region(tmp_path):
    data = b'{"global_step": 3}'
    path = tmp_path / "state.json"
    rec = write_bytes_file(str(path), data)
    assert path.read_bytes() == data
    assert (rec.size, rec.header_end, rec.header_crc32c) == (len(data), len(data), crc32c(data))
    assert [(b, e) for b, e, _ in iter_regions(entry_of(rec))] == [(0, len(data))]


def _creatable(dtypes):
    out = []
    for d in dtypes:
        try:
            torch.zeros(2, dtype=d)
            out.append(d)
        except (RuntimeError, TypeError):
            pass
    return out


@pytest.mark.parametrize(
    "dtype", _creatable([torch.complex128, torch.float8_e4m3fnuz] + ([torch.uint1] if hasattr(torch, "uint1") else []))
)
def test_unsupported_dtype_is_refused_with_a_helpful_message(tmp_path, dtype):
    t = torch.zeros(2, dtype=dtype)
    path = tmp_path / "x.safetensors"
    with pytest.raises(CheckpointError) as ei:
        write_tensor_file(str(path), [("bad", t)])
    msg = str(ei.value)
    assert str(dtype) in msg and "supported" in msg


def test_reserved_metadata_name_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="__metadata__"):
        write_tensor_file(str(tmp_path / "x.safetensors"), [("__metadata__", torch.ones(1))])


@pytest.mark.parametrize(
    "prefix,size",
    [
        (b"", 0),
        (b"\x01\x00", 2),
        (struct.pack("<Q", 10**12), 100),  # absurd header length
        (struct.pack("<Q", 200), 100),  # longer than the file
    ],
)
def test_invalid_header_length_is_reported_as_corrupt(prefix, size):
    with pytest.raises(CheckpointCorruptError):
        header_end_from_prefix(prefix, size, "some.safetensors")


def test_read_header_rejects_garbage(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 8) + b"\xff\xfe not")
    with pytest.raises(CheckpointCorruptError, match="x.safetensors"):
        read_header(str(p))
    p.write_bytes(struct.pack("<Q", 8) + b"[1,2,3] ")
    with pytest.raises(CheckpointCorruptError):
        read_header(str(p))


def test_crc32c_combine_is_safe_from_threads_the_first_time(monkeypatch):
    """Uploads compute whole-file CRC32Cs in several threads at once; the operators built on first use must never be
    seen half-built (it raised IndexError in a fresh process)."""
    import threading
    import time

    from lightning_ckpt.format import checksum

    real = checksum._gf2_square

    def slow_square(op):
        time.sleep(0.0005)  # let the other threads run while the table is being built
        return real(op)

    monkeypatch.setattr(checksum, "_ZEROS", [])
    monkeypatch.setattr(checksum, "_gf2_square", slow_square)
    a, b = b"x" * 7, b"y" * 1000
    want = checksum.crc32c(a + b)
    start = threading.Barrier(8)

    def one(_):
        start.wait()
        return checksum.crc32c_combine(checksum.crc32c(a), checksum.crc32c(b), len(b))

    with ThreadPoolExecutor(8) as ex:
        assert list(ex.map(one, range(8))) == [want] * 8
