"""Cached preprocessing stages (lightning_ckpt.stages): resume after SIGKILL, recompute exactly what changed,
detect corruption, never unpickle."""
from __future__ import annotations

import json
import os
import pickle
import runpy
import signal
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_ckpt import verify_checkpoint
from lightning_ckpt.extras import fingerprint
from lightning_ckpt.store.base import host_id
from lightning_ckpt.store import fs
from lightning_ckpt.errors import CheckpointCorruptError
from lightning_ckpt.format import manifest as mf
from lightning_ckpt.format.checksum import crc32c
from lightning_ckpt.extras.stages import StageCache, StageCacheWarning, UncacheableValueError, checkpointed_stage

from support import run_python, start_python

REPO = Path(__file__).resolve().parents[1]


def statuses(cache: StageCache, start: int = 0) -> list[tuple[str, str]]:
    return [(e.stage, e.status) for e in cache.history[start:]]


def make_pipeline(cache: StageCache, calls: list[str], b_variant: int = 0, b_version: str = "0"):
    """a -> b -> c; ``calls`` records every real computation."""

    @cache.stage(name="a")
    def a(n: int, seed: int = 0) -> torch.Tensor:
        calls.append("a")
        return torch.randn(n, generator=torch.Generator().manual_seed(seed))

    if b_variant == 0:
        @cache.stage(name="b", version=b_version)
        def b(x: torch.Tensor, k: float = 2.0) -> torch.Tensor:
            calls.append("b")
            return x * k
    else:
        @cache.stage(name="b", version=b_version)
        def b(x: torch.Tensor, k: float = 2.0) -> torch.Tensor:
            calls.append("b")
            return x * k + 1.0  # changed code

    @cache.stage(name="c")
    def c(y: torch.Tensor) -> dict:
        calls.append("c")
        return {"sum": float(y.sum()), "y": y}

    return a, b, c


def run_pipeline(stages_abc, k: float = 2.0):
    a, b, c = stages_abc
    return c(b(a(100), k=k))


# ------------------------------------------------------------------ round trip
def test_outputs_of_every_supported_kind_load_back_identical(tmp_path):
    cache = StageCache(tmp_path)
    calls = []

    @cache.stage
    def produce(n: int) -> dict:
        calls.append(1)
        return {
            "t": torch.arange(n, dtype=torch.float32).reshape(2, -1),
            "bf16": torch.ones(3, dtype=torch.bfloat16),
            "bool": torch.tensor([True, False]),
            "empty": torch.zeros(0, 4),
            "np": np.arange(n, dtype=np.int16),
            "np_scalar": np.float32(1.5),
            "nested": [(1, "two", 3.0, None, b"\x00\xff"), {"k": [torch.tensor(7)]}],
            "keys": {1: "int key", (2, 3): "tuple key"},
            "floats": [float("nan"), float("inf")],
            "set": {1, 2, 3},
        }

    first = produce(6)
    second = produce(6)
    assert calls == [1] and statuses(cache) == [("produce", "computed"), ("produce", "loaded")]
    for key in ("t", "bf16", "bool", "empty"):
        assert second[key].dtype == first[key].dtype and torch.equal(second[key], first[key])
    assert isinstance(second["np"], np.ndarray) and second["np"].dtype == np.int16
    assert np.array_equal(second["np"], first["np"])
    assert second["np_scalar"] == np.float32(1.5) and type(second["np_scalar"]) is np.float32
    assert second["nested"][0] == (1, "two", 3.0, None, b"\x00\xff")
    assert torch.equal(second["nested"][1]["k"][0], torch.tensor(7))
    assert second["keys"] == {1: "int key", (2, 3): "tuple key"}
    assert np.isnan(second["floats"][0]) and second["floats"][1] == float("inf")
    assert second["set"] == {1, 2, 3}

    (entry,) = cache.entries()
    verify_checkpoint(entry.path)  # a result folder is a valid lightning_ckpt checkpoint
    from safetensors.torch import load_file

    assert torch.equal(load_file(os.path.join(entry.path, "output.safetensors"))["v/t"], first["t"])


def test_plain_tensor_output_and_the_module_level_decorator(tmp_path):
    calls = []

    @checkpointed_stage(tmp_path / "c", version="3")
    def square(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x**2

    x = torch.arange(5.0)
    assert torch.equal(square(x), x**2) and torch.equal(square(x), x**2)
    assert calls == [1] and square.last_event.status == "loaded"
    assert square.version == "3" and square.__name__ == "square"


# ------------------------------------------------------------------ what is recomputed
def test_code_change_recomputes_that_stage_and_later_ones_only(tmp_path):
    calls: list[str] = []
    out0 = run_pipeline(make_pipeline(StageCache(tmp_path), calls))
    assert calls == ["a", "b", "c"]

    calls.clear()
    run_pipeline(make_pipeline(StageCache(tmp_path), calls))
    assert calls == []  # same code, same params: everything loaded

    calls.clear()
    cache = StageCache(tmp_path)
    out1 = run_pipeline(make_pipeline(cache, calls, b_variant=1))
    assert calls == ["b", "c"]
    assert statuses(cache) == [("a", "loaded"), ("b", "computed"), ("c", "computed")]
    assert out1["sum"] == pytest.approx(out0["sum"] + 100.0, rel=1e-5)

    calls.clear()
    run_pipeline(make_pipeline(StageCache(tmp_path), calls, b_variant=0))
    assert calls == []  # the old results are still there


def test_param_change_recomputes_that_stage_and_later_ones_only(tmp_path):
    calls: list[str] = []
    run_pipeline(make_pipeline(StageCache(tmp_path), calls), k=2.0)
    calls.clear()
    cache = StageCache(tmp_path)
    out = run_pipeline(make_pipeline(cache, calls), k=3.0)
    assert calls == ["b", "c"]
    assert statuses(cache) == [("a", "loaded"), ("b", "computed"), ("c", "computed")]
    x = torch.randn(100, generator=torch.Generator().manual_seed(0))
    assert out["sum"] == pytest.approx(float((x * 3.0).sum()), rel=1e-5)
    # defaults are applied before fingerprinting: k=2.0 spelled out is the same call as the default
    calls.clear()
    a, b, c = make_pipeline(StageCache(tmp_path), calls)
    c(b(a(100)))
    assert calls == []


def test_version_bump_recomputes_the_stage_and_identical_output_keeps_later_stages(tmp_path):
    calls: list[str] = []
    run_pipeline(make_pipeline(StageCache(tmp_path), calls))
    calls.clear()
    run_pipeline(make_pipeline(StageCache(tmp_path), calls, b_version="2"))
    # b recomputed; its output is byte-identical, so c (keyed by the content of its input) is loaded
    assert calls == ["b"]


def test_inputs_are_keyed_by_content_even_after_in_place_changes(tmp_path):
    cache = StageCache(tmp_path)
    calls: list[str] = []
    a, b, c = make_pipeline(cache, calls)
    x = a(10)
    b(x)
    b(x)
    assert calls == ["a", "b"]
    x.add_(1.0)  # an in-place change of a stage output: the remembered checksum must not be used
    b(x)
    assert calls == ["a", "b", "b"]
    arr = np.zeros(4, dtype=np.float32)
    fp0 = b.fingerprint(torch.from_numpy(arr))
    arr[0] = 1.0
    assert b.fingerprint(torch.from_numpy(arr)) != fp0


def test_chaining_a_stage_output_costs_no_hashing(tmp_path, monkeypatch):
    cache = StageCache(tmp_path)
    calls: list[str] = []
    a, b, _ = make_pipeline(cache, calls)
    x = a(1000)
    hashed = []
    real = fingerprint.crc32c
    monkeypatch.setattr(fingerprint, "crc32c", lambda data, value=0: hashed.append(len(memoryview(data))) or real(data, value))
    b.fingerprint(x)
    assert hashed == []  # the output's checksum is known from writing it
    b.fingerprint(x.clone())
    assert hashed == [4000]
    hashed.clear()
    monkeypatch.setattr(fingerprint, "crc32c", real)
    y = StageCache(tmp_path).stage(name="a")(a.__wrapped__)(1000)  # loaded (and verified) in a fresh cache
    assert calls == ["a"]
    monkeypatch.setattr(fingerprint, "crc32c", lambda data, value=0: hashed.append(len(memoryview(data))) or real(data, value))
    assert b.fingerprint(y) == b.fingerprint(x)
    assert hashed == []  # checksums verified on load are reused too


def test_uncacheable_outputs_and_arguments_give_specific_errors(tmp_path):
    cache = StageCache(tmp_path)

    class Thing:
        pass

    @cache.stage
    def bad_output(n: int):
        return {"obj": Thing()}

    with pytest.raises(UncacheableValueError, match="cannot be stored or fingerprinted without pickle"):
        bad_output(1)
    assert cache.entries() == []
    assert not any(p.name.startswith(".partial") for p in (tmp_path / "bad_output").iterdir())

    @cache.stage(ignore=("logger",))
    def uses_logger(n: int, logger=None) -> int:
        return n + 1

    assert uses_logger(1, logger=Thing()) == 2 and uses_logger(1, logger=Thing()) == 2
    assert uses_logger.last_event.status == "loaded"

    @cache.stage
    def takes_obj(o) -> int:
        return 1

    with pytest.raises(UncacheableValueError, match="ignore="):
        takes_obj(Thing())
    with pytest.raises(ValueError, match="names no parameter"):
        cache.stage(ignore=("nope",))(lambda x: x)


# ------------------------------------------------------------------ corruption
def _entry(cache: StageCache, stage: str) -> Path:
    (e,) = cache.entries(stage)
    return Path(e.path)


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def _manifest(entry: Path) -> dict:
    return json.loads((entry / "manifest.json").read_text())


def _corrupt(entry: Path, how: str) -> None:
    st = entry / "output.safetensors"
    m = _manifest(entry)
    rec = m["files"]["output.safetensors"]["tensors"]["v"]
    if how == "tensor byte":
        _flip(st, rec["begin"] + 5)
    elif how == "last byte":
        _flip(st, st.stat().st_size - 1)
    elif how == "header byte":
        _flip(st, 12)
    elif how == "value.json byte":
        _flip(entry / "value.json", 2)
    elif how == "truncated":
        st.write_bytes(st.read_bytes()[:-3])
    elif how == "manifest dtype":  # F32 -> I32: same size, other meaning; caught against the checksummed header
        rec["dtype"] = "I32"
        m["tensors"]["v"]["dtype"] = "I32"
        (entry / "manifest.json").write_bytes(mf.dumps(m))  # digest recomputed: only the header check catches it
    elif how == "manifest garbage":
        (entry / "manifest.json").write_bytes(b"{not json")
    elif how == "manifest missing":
        (entry / "manifest.json").unlink()
    elif how == "tensor file missing":
        st.unlink()
    else:  # pragma: no cover
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    ["tensor byte", "last byte", "header byte", "value.json byte", "truncated", "manifest dtype",
     "manifest garbage", "manifest missing", "tensor file missing"],
)
def test_corrupt_result_is_detected_warned_and_recomputed(tmp_path, how):
    calls: list[str] = []
    good = run_pipeline(make_pipeline(StageCache(tmp_path), calls))
    b_entry = _entry(StageCache(tmp_path), "b")
    _corrupt(b_entry, how)

    calls.clear()
    cache = StageCache(tmp_path)
    with pytest.warns(StageCacheWarning, match=r"stage 'b' .* unusable"):
        out = run_pipeline(make_pipeline(cache, calls))
    assert calls == ["b"]  # recomputed to the same bytes, so c stays cached
    assert statuses(cache) == [("a", "loaded"), ("b", "recomputed"), ("c", "loaded")]
    assert torch.equal(out["y"], good["y"])
    verify_checkpoint(str(b_entry))  # the replacement is intact

    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_pipeline(make_pipeline(StageCache(tmp_path), calls))
    assert calls == []


def test_without_verification_a_flipped_byte_goes_unnoticed(tmp_path):
    """Guards the test above: the checksum comparison is what catches a flipped data byte."""
    calls: list[str] = []
    run_pipeline(make_pipeline(StageCache(tmp_path), calls))
    _corrupt(_entry(StageCache(tmp_path), "b"), "tensor byte")
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_pipeline(make_pipeline(StageCache(tmp_path, verify=False), calls))
    assert calls == ["c"]  # b loaded the damaged bytes; c saw a different input


# ------------------------------------------------------------------ hostile content
class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _replace_value_json(entry: Path, raw: bytes) -> None:
    """Swap value.json and fix up its size and checksum, as an attacker with write access could."""
    (entry / "value.json").write_bytes(raw)
    m = _manifest(entry)
    m["files"]["value.json"].update(size=len(raw), header_end=len(raw), header_crc32c=crc32c(raw))
    (entry / "manifest.json").write_bytes(mf.dumps(m))


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("something tried to unpickle cached content")

    for mod, attr in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, attr, refuse)


@pytest.mark.parametrize("kind", ["pickle", "type tag", "repr tag", "unknown tag", "escaping file name"])
def test_hostile_content_is_refused_never_unpickled(tmp_path, kind, no_unpickling):
    calls: list[str] = []
    run_pipeline(make_pipeline(StageCache(tmp_path), calls))
    entry = _entry(StageCache(tmp_path), "c")
    marker = tmp_path / "pwned"
    if kind == "pickle":
        _replace_value_json(entry, pickle.dumps(_Payload(str(marker))))
    elif kind == "type tag":
        _replace_value_json(entry, json.dumps({"sum": {"$type": "os.system"}, "y": {"$t": "v/y"}}).encode())
    elif kind == "repr tag":
        _replace_value_json(entry, json.dumps({"sum": {"$repr": ["x", "y"]}, "y": {"$t": "v/y"}}).encode())
    elif kind == "unknown tag":
        _replace_value_json(entry, json.dumps({"sum": {"$pickle": "gASV"}, "y": {"$t": "v/y"}}).encode())
    else:
        (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_Payload(str(marker))))
        m = _manifest(entry)
        m["files"]["../../evil.pkl"] = m["files"].pop("value.json")
        m["state_files"] = {"0": "../../evil.pkl"}
        (entry / "manifest.json").write_bytes(mf.dumps(m))
    (entry / "extra.pkl").write_bytes(pickle.dumps(_Payload(str(marker))))  # stray files are never opened

    calls.clear()
    cache = StageCache(tmp_path)
    with pytest.warns(StageCacheWarning, match="unusable"):
        out = run_pipeline(make_pipeline(cache, calls))
    assert calls == ["c"] and isinstance(out["sum"], float)
    assert not marker.exists()


def test_hostile_load_raises_corrupt_error_directly(tmp_path, no_unpickling):
    calls: list[str] = []
    run_pipeline(make_pipeline(StageCache(tmp_path), calls))
    cache = StageCache(tmp_path)
    entry = _entry(cache, "c")
    _replace_value_json(entry, json.dumps({"$type": "builtins.eval"}).encode())
    with pytest.raises(CheckpointCorruptError, match="never contain"):
        cache._load(str(entry), entry.name)


# ------------------------------------------------------------------ crash and resume
PIPELINE_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    sys.path.insert(0, {repo!r})
    import torch
    from lightning_ckpt.extras.stages import StageCache
    from lightning_ckpt.store import fs

    cache_dir, log_path = sys.argv[1], sys.argv[2]
    mode = os.environ.get("PIPE_MODE", "")

    def note(s):
        with open(log_path, "a") as f:
            f.write(f"{{s}} {{os.getpid()}} {{time.time()}}\\n")
            f.flush()
            os.fsync(f.fileno())

    cache = StageCache(cache_dir)

    @cache.stage()
    def load_raw(n: int):
        note("load_raw")
        return torch.arange(n, dtype=torch.float32)

    @cache.stage()
    def scale(x, k: float = 2.0):
        note("scale")
        if mode == "hang":
            note("scale-hanging")
            time.sleep(120)
        return x * k

    @cache.stage()
    def total(x):
        note("total")
        return {{"sum": float(x.sum()), "x": x}}

    if mode == "die-at-commit":  # the complete partial folder (manifest written) is about to be renamed into place
        real_rename = fs.OPS.rename
        def die(src, dst):
            if os.sep + "scale" + os.sep + ".partial-" in src:
                note("dying-at-commit")
                os.kill(os.getpid(), signal.SIGKILL)
            return real_rename(src, dst)
        fs.OPS.rename = die

    z = total(scale(load_raw(1000)))
    print("STATUS", {{e.stage: e.status for e in cache.history}})
    print("SUM", z["sum"])
    """
)


def _log(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.usefixtures("forkserver")
def test_pipeline_killed_mid_stage_resumes_without_recomputing_finished_stages(tmp_path, monkeypatch, capsys):
    script = tmp_path / "pipe.py"
    script.write_text(PIPELINE_SCRIPT.format(repo=str(REPO)))
    cache_dir, log = tmp_path / "cache", tmp_path / "calls.log"
    env = dict(os.environ, PYTHONWARNINGS="ignore")

    # run 1: SIGKILL while stage 2 computes
    p = start_python([str(script), str(cache_dir), str(log)], env=dict(env, PIPE_MODE="hang"))
    deadline = time.time() + 60
    while "scale-hanging" not in _log(log):
        assert p.poll() is None and time.time() < deadline, "the pipeline did not reach stage 2"
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    assert p.wait(30) == -signal.SIGKILL
    assert _log(log) == ["load_raw", "scale", "scale-hanging"]
    cache = StageCache(cache_dir)
    assert [e.stage for e in cache.entries()] == ["load_raw"]
    raw_entry = cache.entries()[0]
    raw_mtime = os.stat(os.path.join(raw_entry.path, "manifest.json")).st_mtime_ns

    # run 2 (a new process): stage 1 is loaded; SIGKILL inside stage 2's commit, after its files were written
    p = run_python([str(script), str(cache_dir), str(log)], env=dict(env, PIPE_MODE="die-at-commit"), timeout=120)
    assert p.returncode == -signal.SIGKILL
    assert _log(log) == ["load_raw", "scale", "scale-hanging", "scale", "dying-at-commit"]
    partials = list((cache_dir / "scale").glob(".partial-*"))
    assert len(partials) == 1 and (partials[0] / "manifest.json").is_file()  # complete but never committed
    assert [e.stage for e in StageCache(cache_dir).entries()] == ["load_raw"]  # also removed the dead partial
    assert not list((cache_dir / "scale").glob(".partial-*"))

    # run 3 (the same script again, here in this process): only the unfinished stages run
    monkeypatch.setattr(sys, "argv", [str(script), str(cache_dir), str(log)])
    monkeypatch.delenv("PIPE_MODE", raising=False)
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "STATUS {'load_raw': 'loaded', 'scale': 'computed', 'total': 'computed'}" in out
    assert f"SUM {float(torch.arange(1000.0).sum() * 2)}" in out
    assert _log(log) == ["load_raw", "scale", "scale-hanging", "scale", "dying-at-commit", "scale", "total"]
    assert os.stat(os.path.join(raw_entry.path, "manifest.json")).st_mtime_ns == raw_mtime  # never rewritten

    # run 4: everything loaded
    runpy.run_path(str(script), run_name="__main__")
    assert "STATUS {'load_raw': 'loaded', 'scale': 'loaded', 'total': 'loaded'}" in capsys.readouterr().out
    assert _log(log)[-1] == "total" and len(_log(log)) == 7


def test_a_result_committed_concurrently_by_another_process_wins(tmp_path, monkeypatch):
    import shutil

    cache = StageCache(tmp_path)
    calls: list[str] = []
    a, _, _ = make_pipeline(cache, calls)
    final = a.path(10)
    real_rename = fs.OPS.rename

    def other_one_first(src, dst):  # another process commits the same result just before this one
        if ".partial-" in src:
            shutil.copytree(src, final)
        return real_rename(src, dst)

    monkeypatch.setattr(fs.OPS, "rename", other_one_first)
    assert torch.equal(a(10), torch.randn(10, generator=torch.Generator().manual_seed(0)))
    assert not list((tmp_path / "a").glob(".partial-*"))
    monkeypatch.undo()
    assert torch.equal(a(10), torch.randn(10, generator=torch.Generator().manual_seed(0)))
    assert calls == ["a"] and a.last_event.status == "loaded"


# ------------------------------------------------------------------ housekeeping
@pytest.mark.usefixtures("forkserver")
def test_entries_clear_and_partials_of_live_and_dead_processes(tmp_path):
    calls: list[str] = []
    cache = StageCache(tmp_path)
    run_pipeline(make_pipeline(cache, calls))
    assert sorted(e.stage for e in cache.entries()) == ["a", "b", "c"]
    assert all(e.size_bytes > 0 and e.compute_s is not None for e in cache.entries())

    host = host_id()
    dead = run_python(["-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    fp = "0123456789abcdef" * 4
    for name in (f".partial-{fp}~{host}.{dead_pid}~aaaaaa", f".partial-{fp}~{host}.{os.getpid()}~bbbbbb",
                 f".partial-{fp}~ffffffff.{dead_pid}~cccccc"):
        (tmp_path / "b" / name).mkdir()
    StageCache(tmp_path)  # cleans up on start
    left = sorted(p.name[-6:] for p in (tmp_path / "b").glob(".partial-*"))
    assert left == ["bbbbbb", "cccccc"]  # a live process's and another host's partial folders are kept

    assert cache.clear("b") == 1
    assert sorted(e.stage for e in cache.entries()) == ["a", "c"]
    calls.clear()
    run_pipeline(make_pipeline(StageCache(tmp_path), calls))
    assert calls == ["b"]
    assert cache.clear() == 3 and cache.entries() == []


def test_example_datamodule_computes_then_loads(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "examples"))
    try:
        example = runpy.run_path(str(REPO / "examples" / "preprocess_pipeline.py"), run_name="example")
    finally:
        sys.path.remove(str(REPO / "examples"))
    runs = example["main"](["--cache", str(tmp_path / "cache"), "--steps", "3"])
    first, second = runs
    assert [s for h, _, s in first if h == "prepare_data"] == ["computed"] * 3
    assert [s for h, _, s in first if h == "setup"] == ["loaded"] * 3
    assert [s for _, _, s in second] == ["loaded"] * 6
    assert "run 2" in capsys.readouterr().out
