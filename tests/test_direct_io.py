"""Direct I/O on the write path (``store/direct.py``) and the read path's prefetch (``store/prefetch.py``,
``store/chunkread.py``): files written with ``O_DIRECT`` read back byte-identical and verify, whatever the sizes,
offsets and memory of their pieces; a filesystem that refuses ``O_DIRECT`` and ``LIGHTNING_CKPT_DIRECT_IO=0`` fall
back to the page cache; a kill point wrapped around ``OPS.write_all`` still fires inside a direct write; a restore
with the prefetcher gives the same tensors and still fails on a flipped byte."""
from __future__ import annotations

import errno
import mmap
import os
import shutil
import tempfile

import pytest
import torch

from lightning_ckpt import CheckpointCorruptError, CheckpointWriter, load_checkpoint, verify_checkpoint
from lightning_ckpt.store import direct, fs
from lightning_ckpt.writer.snapshot import aligned_empty


def _direct_ok(folder: str) -> bool:
    """Whether ``folder``'s filesystem takes an aligned ``O_DIRECT`` write."""
    if not direct.O_DIRECT:
        return False
    path = os.path.join(folder, ".odirect-probe")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | direct.O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        os.write(fd, mmap.mmap(-1, direct.ALIGN))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(path)


DIRECT_OK: list[bool] = []  # whether the folder the current test got from ``ddir`` takes O_DIRECT


@pytest.fixture
def ddir(tmp_path):
    """A folder on a filesystem that takes ``O_DIRECT``: the test's tmp_path, else one on a disk-backed filesystem
    (``/var/tmp``, the home folder, the folder above the repository); where none does, tmp_path (the writes then take
    the fallback, and the tests check what they can: ``direct_taken()`` says which; ``test_real_o_direct_path`` fails on Linux then)."""
    DIRECT_OK[:] = [True]
    if _direct_ok(str(tmp_path)):
        yield str(tmp_path)
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for cand in ("/var/tmp", os.path.expanduser("~"), os.path.dirname(here)):
        if os.path.isdir(cand) and os.access(cand, os.W_OK):
            d = tempfile.mkdtemp(prefix="lc-odirect-", dir=cand)
            if _direct_ok(d):
                try:
                    yield d
                finally:
                    shutil.rmtree(d, ignore_errors=True)
                return
            shutil.rmtree(d, ignore_errors=True)
    DIRECT_OK[:] = [False]
    yield str(tmp_path)


def direct_taken() -> bool:
    return bool(DIRECT_OK and DIRECT_OK[0])


def test_real_o_direct_path(ddir):
    """An aligned file goes to the disk straight from memory. On Linux some filesystem here must take O_DIRECT (ext4,
    xfs, btrfs do): else the package's main write path would go untested. Where the system has no O_DIRECT at all,
    the same write goes through the page cache, whole."""
    pieces = [_aligned(8 * MB)]
    path = os.path.join(ddir, "f.bin")
    nbytes, direct_bytes = _write(path, pieces)
    if direct.O_DIRECT:
        assert direct_taken(), ("no filesystem tried here (the test's tmp folder, /var/tmp, the home folder, the "
                                "folder above the repository) accepts O_DIRECT: run the tests on a disk-backed one")
        assert nbytes == direct_bytes == 8 * MB
    else:
        assert (nbytes, direct_bytes) == (8 * MB, 0)
    with open(path, "rb") as f:
        assert f.read() == _expected(pieces)


@pytest.fixture(autouse=True)
def _fresh_direct_state(monkeypatch):
    monkeypatch.delenv(direct.ENV, raising=False)
    saved = set(direct._refused)
    direct._refused.clear()
    yield
    direct._refused.clear()
    direct._refused.update(saved)


def _aligned(n: int, phase: int = 0) -> memoryview:
    """``n`` random bytes whose memory starts ``phase`` bytes past a page boundary (writable)."""
    raw = torch.empty(n + 2 * direct.ALIGN, dtype=torch.uint8)
    off = (-raw.data_ptr()) % direct.ALIGN + phase
    v = raw[off:off + n]
    v.random_(0, 256)
    return memoryview(v.numpy()).cast("B")


def _write(path: str, pieces: list) -> tuple[int, int]:
    fs.IO_TIMES.reset()
    fs.OPS.write_file(path, pieces, fsync=True)
    direct_bytes = fs.IO_TIMES.direct_bytes
    _, _, nbytes = fs.IO_TIMES.reset()
    return nbytes, direct_bytes


def _expected(pieces: list) -> bytes:
    return b"".join(bytes(memoryview(p).cast("B")) for p in pieces)


MB = 1 << 20
CASES = {
    "one aligned piece": lambda: [_aligned(4 * MB)],
    "aligned, odd tail": lambda: [_aligned(4 * MB + 13)],
    "header then same-phase data": lambda: [b"h" * 100, _aligned(3 * MB, phase=100)],
    "header then other-phase data": lambda: [b"h" * 100, _aligned(3 * MB, phase=8), _aligned(5 * MB + 7, phase=1)],
    "empty pieces": lambda: [b"", _aligned(2 * MB), b"", memoryview(b""), _aligned(0), _aligned(MB + 1)],
    "read-only pieces": lambda: [bytes(_aligned(2 * MB + 5)), bytes(_aligned(3 * MB))],
    "many small odd pieces": lambda: [bytes([i % 251]) * (i * 997 + 1) for i in range(40)] + [_aligned(MB)],
    "larger than the bounce buffer, misaligned": lambda: [_aligned(direct.BOUNCE_BYTES * 2 + 12345, phase=40)],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_direct_write_byte_identical(ddir, case):
    pieces = CASES[case]()
    path = os.path.join(ddir, "f.bin")
    nbytes, direct_bytes = _write(path, pieces)
    want = _expected(pieces)
    assert nbytes == len(want)
    with open(path, "rb") as f:
        got = f.read()
    assert len(got) == len(want) and got == want
    assert direct_bytes <= len(want)
    if direct_taken() and case in ("one aligned piece", "aligned, odd tail", "header then same-phase data", "empty pieces"):
        assert direct_bytes >= len(want) - 2 * direct.ALIGN, "the aligned bytes went through the bounce buffer"
    if case == "read-only pieces":
        assert direct_bytes == 0


def test_direct_write_small_bounce_buffer(ddir, monkeypatch):
    """Pieces of every phase through a bounce buffer of a few blocks (it fills and empties many times)."""
    monkeypatch.setattr(direct, "BOUNCE_BYTES", 3 * direct.ALIGN)
    monkeypatch.setattr(direct._BOUNCE, "buf", None)
    pieces = [b"x" * 4097, _aligned(MB, phase=1), _aligned(MB + 4096, phase=4097 % 4096), _aligned(10 * 4096),
              b"tail" * 3]
    path = os.path.join(ddir, "f.bin")
    _write(path, pieces)
    with open(path, "rb") as f:
        assert f.read() == _expected(pieces)
    monkeypatch.setattr(direct._BOUNCE, "buf", None)  # the next test gets a full-sized one


def test_small_or_buffered_files_not_direct(ddir, monkeypatch):
    path = os.path.join(ddir, "f.bin")
    assert _write(path, [_aligned(direct.MIN_BYTES - 1)])[1] == 0  # below MIN_BYTES: page cache
    fs.IO_TIMES.reset()
    fs.OPS.write_file(path, [_aligned(4 * MB)], fsync=False)  # not durable: page cache
    assert fs.IO_TIMES.direct_bytes == 0
    monkeypatch.setenv(direct.ENV, "0")
    pieces = [_aligned(4 * MB)]
    assert _write(path, pieces)[1] == 0
    with open(path, "rb") as f:
        assert f.read() == _expected(pieces)


def test_open_refused_falls_back_and_is_remembered(ddir, monkeypatch):
    real_open = os.open
    calls = []

    def open_(path, flags, mode=0o777, **kw):
        if flags & direct.O_DIRECT:
            calls.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(direct.os, "open", open_)
    pieces = [_aligned(4 * MB + 3)]
    for name in ("a.bin", "b.bin"):
        path = os.path.join(ddir, name)
        assert _write(path, pieces)[1] == 0
        with open(path, "rb") as f:
            assert f.read() == _expected(pieces)
    assert len(calls) == 1, "the refusal was not remembered"
    assert direct.refused(ddir)


def test_write_refused_starts_over_buffered(ddir, monkeypatch):
    real = fs.OPS.write_all
    refused_once = []

    def write_all(fd, data):
        if direct.is_direct(fd) and not refused_once:
            refused_once.append(1)
            real(fd, data)  # some bytes made it, then the filesystem says no
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data)

    monkeypatch.setattr(fs.OPS, "write_all", write_all)
    pieces = [b"head" * 10, _aligned(6 * MB, phase=40), _aligned(3 * MB + 1)]
    path = os.path.join(ddir, "f.bin")
    nbytes, direct_bytes = _write(path, pieces)
    assert refused_once == ([1] if direct_taken() else []) and direct_bytes == 0
    assert nbytes == len(_expected(pieces))
    with open(path, "rb") as f:
        assert f.read() == _expected(pieces)
    assert direct.refused(ddir)


def test_other_write_errors_propagate(ddir, monkeypatch):
    def write_all(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fs.OPS, "write_all", write_all)
    with pytest.raises(OSError) as e:
        _write(os.path.join(ddir, "f.bin"), [_aligned(4 * MB)])
    assert e.value.errno == errno.ENOSPC
    assert direct.refused(ddir) == (not direct_taken())


class Killed(BaseException):
    pass


def test_kill_point_mid_file_fires_in_direct_write(ddir, monkeypatch):
    """The kill trials' ``write.mid_file`` point (tests/faults/kill_trials.py): a wrapper of ``OPS.write_all`` that
    writes half of what it is given, then dies. With a direct write it is called, it fires, and its partial write is
    not mistaken for a refusal of ``O_DIRECT``."""
    real = fs.OPS.write_all
    seen = []

    def write_all(fd, data):
        seen.append(direct.is_direct(fd))
        if len(seen) == 2:
            mv = memoryview(data).cast("B")
            direct.write_through_cache(fd, bytes(mv[: len(mv) // 2]))  # as kill_trials does
            raise Killed()
        return real(fd, data)

    monkeypatch.setattr(fs.OPS, "write_all", write_all)
    path = os.path.join(ddir, "f.bin")
    pieces = [_aligned(8 * MB), _aligned(8 * MB + 11)]
    with pytest.raises(Killed):
        _write(path, pieces)
    assert len(seen) >= 2 and (not direct_taken() or (seen[0] and seen[1])), "the writes did not go through OPS.write_all with O_DIRECT"
    assert os.path.getsize(path) > 8 * MB
    assert direct.refused(ddir) == (not direct_taken())


def _state(misaligned: bool = True) -> dict:
    g = torch.Generator().manual_seed(0)
    big = torch.randn(1 << 20, generator=g)  # 4 MiB
    st = {
        "big": big,
        "big2": torch.randn(513, 1024, generator=g),
        "odd": torch.randn(12345, generator=g).to(torch.float16),
        "empty": torch.empty(0, 7),
        "scalar": torch.tensor(3.5),
        "int": torch.arange(100_003, dtype=torch.int64),
        "bytes": torch.randint(0, 256, (1_000_001,), dtype=torch.uint8, generator=g),
    }
    if misaligned:
        base = torch.randn(1 << 19, generator=g)
        st["view_off_by_4"] = base[1:]  # memory 4 bytes past an allocation's start
        st["noncontig"] = torch.randn(1024, 1024, generator=g).t()
    return {"state_dict": st, "global_step": 7}


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("async_save", [False, True])
def test_checkpoint_written_direct_loads_and_verifies(ddir, async_save):
    state = _state()
    w = CheckpointWriter(ddir, async_save=async_save)
    got = []
    w.on_commit.append(got.append)
    w.save(state, step=7, epoch=0)
    w.wait()
    w.close()
    # async: from the writer's page-aligned host buffers, nearly every byte; sync: from the caller's tensors, those
    # whose memory has the most common phase (here at least the largest)
    assert got and (not direct_taken() or got[0].breakdown.get("bytes_direct", 0) > (8 * MB if async_save else 2 * MB)), \
        got[0].breakdown
    path = os.path.join(ddir, "step=000007")
    verify_checkpoint(path)
    _same(state["state_dict"], load_checkpoint(path)["state_dict"])


def test_checkpoint_direct_off_same_bytes(tmp_path, monkeypatch):
    """The same state saved with and without direct I/O loads to the same tensors."""
    state = _state()
    monkeypatch.setenv(direct.ENV, "0")
    w = CheckpointWriter(str(tmp_path / "off"), async_save=False)
    got = []
    w.on_commit.append(got.append)
    w.save(state, step=1, epoch=0)
    w.close()
    assert got[0].breakdown.get("bytes_direct", 0) == 0
    _same(state["state_dict"], load_checkpoint(str(tmp_path / "off" / "step=000001"))["state_dict"])


def test_aligned_empty():
    for shape, dtype in [((0,), torch.float32), ((3, 5), torch.float16), ((1 << 16,), torch.float64)]:
        t = aligned_empty(torch.Size(shape), dtype)
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
        assert t.numel() == 0 or t.data_ptr() % 4096 == 0


# -- the read path --------------------------------------------------------------------------------------------------

def _saved(folder: str) -> tuple[dict, str]:
    state = _state()
    w = CheckpointWriter(folder, async_save=False)
    w.save(state, step=3, epoch=0)
    w.close()
    return state, os.path.join(folder, "step=000003")


def test_restore_with_prefetch_same_tensors(ddir, monkeypatch):
    from lightning_ckpt import dcp
    from lightning_ckpt.store import prefetch

    state, path = _saved(ddir)
    monkeypatch.setattr(dcp, "PREFETCH_MIN_BYTES", 0)
    populated = []
    real = prefetch.populate

    def populate(ptr, n):
        populated.append(n)
        return real(ptr, n)

    monkeypatch.setattr(prefetch, "populate", populate)
    _same(state["state_dict"], load_checkpoint(path)["state_dict"])
    assert populated, "the prefetcher did not run"

    # where the system cannot populate memory, the readers fault it in themselves: same tensors
    monkeypatch.setattr(prefetch, "populate", lambda ptr, n: False)
    _same(state["state_dict"], load_checkpoint(path)["state_dict"])


@pytest.mark.parametrize("prefetch_min", [0, 1 << 40])
def test_restore_flipped_byte_is_corrupt(ddir, monkeypatch, prefetch_min):
    from lightning_ckpt import dcp

    state, path = _saved(ddir)
    monkeypatch.setattr(dcp, "PREFETCH_MIN_BYTES", prefetch_min)
    monkeypatch.setattr("lightning_ckpt.store.chunkread.PIECE", 64 << 10)  # the bad byte is in a later piece
    files = sorted((os.path.getsize(os.path.join(path, f)), f) for f in os.listdir(path) if f.endswith(".safetensors"))
    size, name = files[-1]
    with open(os.path.join(path, name), "r+b") as f:
        f.seek(size - 1000)
        b = f.read(1)
        f.seek(size - 1000)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(CheckpointCorruptError):
        load_checkpoint(path)
    assert load_checkpoint(path, verify=False)["global_step"] == 7


def test_direct_layout_files_open_with_safetensors(ddir):
    """A file laid out for direct I/O (header padded with spaces to the data's phase, tensors reordered) is still a
    plain safetensors file."""
    from safetensors.torch import load_file

    state = _state()
    w = CheckpointWriter(ddir, async_save=True)
    w.save(state, step=2, epoch=0)
    w.close()
    path = os.path.join(ddir, "step=000002")
    seen = {}
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            seen.update(load_file(os.path.join(path, f)))
    flat = {k.rsplit("/", 1)[-1]: v for k, v in seen.items()}
    for k, v in state["state_dict"].items():
        assert torch.equal(flat[k], v.contiguous()), k
