"""A hostile-input fuzzer: real checkpoints mutated the way a corrupt disk, a careless user or an attacker would
(manifest fields and types, index shapes, dtypes and chunks, file bytes, file types, links, sizes, state documents),
then read by every public reader and every CLI verb.

Each reader must either succeed with the right data or raise a ``CheckpointError`` subclass, within a time bound, with
bounded memory, and without ever opening anything outside the checkpoint folder. Mutated manifests are written with
their digest recomputed (an attacker can do that), so the structural checks are what is tested; bit flips that leave
a stale digest are a strategy of their own.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_ckpt import (
    CheckpointError,
    CheckpointWriter,
    diff_checkpoints,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    merge_checkpoint,
    resume_path,
    verify_checkpoint,
)
from lightning_ckpt.cli import main
from lightning_ckpt.folder.best import best_checkpoints
from lightning_ckpt.format import manifest as mf
from lightning_ckpt.format.checksum import crc32c
from lightning_ckpt.read import read_checkpoint_manifest

SECRET = b"TOP-SECRET-outside-the-checkpoint-folder"
TIME_BOUND_S = 10.0
MEMORY_BOUND_BYTES = 768 << 20  # growth of the process's peak RSS over the whole campaign


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "state_dict": {"layer.weight": torch.randn(4, 3, generator=g), "layer.bias": torch.randn(4, generator=g),
                       "emb": torch.randint(0, 9, (5, 2), generator=g)},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 3, generator=g)}},
                              "param_groups": [{"lr": 0.1, "params": [0]}]}],
        "epoch": 1, "global_step": 7, "callbacks": {"x": {"best": 0.5, "seen": [1, 2, (3, 4)]}},
        "extra": torch.arange(6, dtype=torch.int16),
    }


def _model() -> torch.nn.Module:
    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3, 4)
            self.register_buffer("emb", torch.zeros(5, 2, dtype=torch.int64))

    return M()


@pytest.fixture(scope="module")
def world():
    """A run folder with a good checkpoint (step 3) and the one the fuzzer copies and mutates (step 7), plus a
    secret file next to the run folder that no reader may ever open."""
    root = tempfile.mkdtemp(prefix="lc-fuzz-")
    run = os.path.join(root, "run")
    w = CheckpointWriter(run, async_save=False)
    try:
        # the records the session writes beside the data (lineage, ranking rule, resume source), for the fuzzer
        rec = {"lineage": {"run": "a1b2c3d4e5f6", "run_name": None, "parent": None, "branch": False},
               "best_rule": [{"monitor": "val_loss", "mode": "min", "top_k": 2}], "resumed_from": None}
        w.save(_state(1), step=3, metrics={"val_loss": 0.5}, tags=["best"], meta=rec)
        rec = dict(rec, lineage=dict(rec["lineage"], run="0f9e8d7c6b5a", parent="step=000003", branch=True),
                   resumed_from=os.path.join(run, "step=000003"))
        w.save(_state(0), step=7, metrics={"val_loss": 0.25}, tags=["best"], meta=rec)
    finally:
        w.close()
    pristine = os.path.join(root, "pristine")
    os.rename(os.path.join(run, "step=000007"), pristine)
    secret = os.path.join(root, "secret.bin")
    with open(secret, "wb") as f:
        f.write(SECRET * 64)
    outside = os.path.join(root, "outside")  # where a link planted for a whole checkpoint folder points
    yield {"root": root, "run": run, "good": os.path.join(run, "step=000003"), "pristine": pristine, "secret": secret,
           "outside": outside, "members": set(os.listdir(pristine))}
    shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ guards
_OPENED: list[tuple[str, int]] = []  # (path, flags) of every open; flags -1 when unknown (builtins.open)


def _audit(event: str, args: tuple) -> None:
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        flags = args[2] if len(args) > 2 and isinstance(args[2], int) else -1
        _OPENED.append((os.fsdecode(args[0]), flags))


sys.addaudithook(_audit)


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout(f"a reader took longer than {TIME_BOUND_S} s (blocked on a FIFO, or unbounded work)")


@contextlib.contextmanager
def _bounded():
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, TIME_BOUND_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _call(name: str, fn, *args, **kwargs):
    """Run one reader: its result, or the CheckpointError it raised; anything else fails the test."""
    with _bounded(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn(*args, **kwargs)
        except CheckpointError as e:
            return e
        except _Timeout as e:
            pytest.fail(f"{name}: {e}")
        except BaseException as e:  # noqa: BLE001
            pytest.fail(f"{name} raised {type(e).__name__}: {e} (expected a CheckpointError subclass)")


def _cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with _bounded(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = main(argv)
        except _Timeout as e:
            pytest.fail(f"lightning-ckpt {' '.join(argv)}: {e}")
        except BaseException as e:  # noqa: BLE001
            pytest.fail(f"lightning-ckpt {argv[0]} crashed with {type(e).__name__}: {e}")
    assert code in (0, 1, 2), f"lightning-ckpt {argv[0]} exited {code}"
    return code, out.getvalue()


# ------------------------------------------------------------------------------------------------ the readers
def _tensors(x, prefix=""):
    """Every tensor of a nested state, by path."""
    out = {}
    if isinstance(x, torch.Tensor):
        out[prefix] = x
    elif isinstance(x, dict):
        for k, v in x.items():
            out.update(_tensors(v, f"{prefix}/{k}"))
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            out.update(_tensors(v, f"{prefix}/{i}"))
    return out


def _read_everything(world: dict, bad: str, data_intact: bool) -> None:
    """Every public reader and CLI verb on the mutated checkpoint ``bad`` (inside ``world['run']``)."""
    expected = _tensors(_state(0))
    _OPENED.clear()
    _call("read_checkpoint_manifest", read_checkpoint_manifest, bad)
    _call("verify_checkpoint", verify_checkpoint, bad)
    got = _call("load_checkpoint", load_checkpoint, bad)
    if not isinstance(got, CheckpointError) and data_intact:
        loaded = _tensors(got)
        for k, t in loaded.items():
            if k in expected:
                assert torch.equal(t, expected[k]), f"load_checkpoint returned wrong data for {k}"
    m = _model()
    got = _call("load_weights", load_weights, bad, m, strict=False)
    if not isinstance(got, CheckpointError) and data_intact:
        assert torch.equal(m.layer.weight.detach(), expected["/state_dict/layer.weight"])
    listed = _call("list_checkpoints", list_checkpoints, world["run"])
    assert not isinstance(listed, CheckpointError), f"list_checkpoints raised on one bad checkpoint: {listed}"
    assert world["good"] in [c.path for c in listed], "one bad checkpoint hid a good one from list_checkpoints"
    latest = _call("latest_checkpoint", latest_checkpoint, world["run"])
    assert isinstance(latest, CheckpointError) or latest in (world["good"], bad)
    out = os.path.join(tempfile.mkdtemp(prefix="lc-merge-", dir=world["root"]), "model.safetensors")
    _call("merge_checkpoint", merge_checkpoint, bad, out)
    _call("diff_checkpoints", diff_checkpoints, world["good"], bad)
    for argv in (["show", bad], ["show", bad, "--json"], ["verify", bad], ["diff", world["good"], bad],
                 ["merge", bad, out + ".cli"]):
        _cli(argv)
    code, text = _cli(["ls", world["run"], "--json"])
    json.loads(text)  # valid JSON, whatever the metrics hold
    code, text = _cli(["lineage", world["run"], "--json"])
    assert code == 0 and world["good"].rsplit("/", 1)[1] in text, "one bad checkpoint broke lineage"
    _cli(["lineage", world["run"]])
    best = _call("best_checkpoints", best_checkpoints, world["run"])
    assert not isinstance(best, CheckpointError), f"one bad checkpoint broke best_checkpoints: {best}"
    if bad not in [c.path for c in listed]:  # skipped as corrupt: the good one's rule and rank stand
        assert [c.path for c in best] == [world["good"]], "a skipped checkpoint changed the ranking"
    _call("resume_path", resume_path, world["run"])
    outside = _opened_outside(world)
    assert not outside, f"a reader opened a file outside the checkpoint folder: {outside}"


def _opened_outside(world: dict) -> list[str]:
    """Opens that followed a link out of the run folder. A link planted in the folder (a member, or the checkpoint
    folder itself) may be looked at, but only without following it (O_NOFOLLOW); a member opened relative to its
    folder's descriptor (``dir_fd``: the audit sees its bare name) must be opened with O_NOFOLLOW."""
    out = []
    for p, flags in _OPENED:
        nofollow = flags != -1 and bool(flags & os.O_NOFOLLOW)
        if not os.path.isabs(p):
            if p in world["members"] and not nofollow:
                out.append(p)
            continue
        real = os.path.realpath(p)
        for target in (os.path.realpath(world["secret"]), os.path.realpath(world["outside"])):
            if (real == target or real.startswith(target + os.sep)) and (not nofollow or real == os.path.abspath(p)):
                out.append(p)
    return out


@pytest.fixture
def victim(world):
    """``make()``: a fresh copy of the checkpoint of step 7 in the run folder (the previous copy removed)."""
    path = os.path.join(world["run"], "step=000007")

    def make() -> str:
        if os.path.islink(path):  # the checkpoint folder itself was a link
            os.unlink(path)
        if os.path.lexists(path):
            for e in os.listdir(path):  # a FIFO, link or folder left by the previous example
                p = os.path.join(path, e)
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
            os.rmdir(path)
        shutil.copytree(world["pristine"], path)
        return path

    yield make
    if os.path.islink(path):
        os.unlink(path)
    shutil.rmtree(path, ignore_errors=True)


def _paths(x, prefix=()):
    """Every path into a JSON document (dict keys and list indices)."""
    yield prefix
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _paths(v, prefix + (i,))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, -1, 7, 2**31, 2**63, 10**30])
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
    | st.sampled_from(["../secret.bin", "/etc/passwd", "F32", "Q9", "BF16", "state-rank00000.json",
                       "model-rank00000.safetensors", "..", ".", "", "x" * 300]),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=8,
)

FUZZ = settings(max_examples=int(os.environ.get("LC_FUZZ_EXAMPLES", "40")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def _set(doc, path, value):
    for p in path[:-1]:
        doc = doc[p]
    doc[path[-1]] = value


def _delete(doc, path):
    for p in path[:-1]:
        doc = doc[p]
    if isinstance(doc, dict):
        del doc[path[-1]]
    else:
        doc.pop(path[-1])


def _manifest(ckpt: str) -> dict:
    with open(os.path.join(ckpt, "manifest.json"), "rb") as f:
        return json.loads(f.read())


def _rewrite(ckpt: str, m: dict) -> None:
    """Write ``m`` as the manifest of ``ckpt``, digest recomputed as an attacker would (plain JSON where the
    package's own writer refuses the values)."""
    try:
        raw = mf.dumps(m)
    except (TypeError, ValueError):
        raw = json.dumps(m).encode()
    with open(os.path.join(ckpt, "manifest.json"), "wb") as f:
        f.write(raw)


# ------------------------------------------------------------------------------------------------ campaigns
@FUZZ
@given(data=st.data())
def test_mutated_manifests(world, victim, data):
    """Any field of the manifest replaced, deleted or retyped (digest recomputed, as an attacker would)."""
    bad = victim()
    m = _manifest(bad)
    paths = [p for p in _paths(m) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        if data.draw(st.booleans()):
            try:
                _set(m, path, data.draw(json_values))
            except (KeyError, IndexError, TypeError):
                pass
        else:
            try:
                _delete(m, path)
            except (KeyError, IndexError, TypeError):
                pass
        paths = [p for p in _paths(m) if p]
        if not paths:
            break
    _rewrite(bad, m)
    _read_everything(world, bad, data_intact=True)


def test_a_manifest_without_its_tensor_index_is_read_by_every_reader_without_a_raw_error(world, victim):
    """The example the fuzzer above found (its ``tensors`` deleted, digest recomputed): ``load_weights`` raised a raw
    KeyError in the small-tensor read path instead of loading nothing or a CheckpointError."""
    bad = victim()
    m = _manifest(bad)
    _delete(m, ("tensors",))
    _rewrite(bad, m)
    _read_everything(world, bad, data_intact=True)


@FUZZ
@given(data=st.data())
def test_mutated_lineage_ranking_and_resume_records(world, victim, data):
    """The records the tools read beside the data (``lineage``, ``best_rule``, ``resumed_from``) given any JSON value
    or any shape (digest recomputed): lineage, ls, best and resume give a CheckpointError or a correct answer."""
    bad = victim()
    m = _manifest(bad)
    records = ("lineage", "best_rule", "resumed_from")
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from([p for p in _paths(m) if p and p[0] in records]))
        try:
            _set(m, path, data.draw(json_values | st.sampled_from(["step=000003", "step=000007", "best", "min"])))
        except (KeyError, IndexError, TypeError):
            pass
    _rewrite(bad, m)
    _read_everything(world, bad, data_intact=True)


@FUZZ
@given(data=st.data())
def test_mutated_index_shapes_dtypes_and_chunks(world, victim, data):
    """The tensor index and the file records, where memory safety lives: shapes, dtypes, offsets, sizes, ranges."""
    bad = victim()
    m = _manifest(bad)
    key = data.draw(st.sampled_from(sorted(m["tensors"])))
    entry = m["tensors"][key]
    chunk = entry["chunks"][0]
    rec = m["files"][chunk["file"]]["tensors"][chunk["name"]]
    small = st.integers(-3, 12)
    what = data.draw(st.sampled_from(["shape", "dtype", "offsets", "sizes", "rec-shape", "rec-range", "split",
                                      "duplicate", "both-shapes"]))
    if what == "shape":
        entry["shape"] = data.draw(st.lists(small, max_size=4))
    elif what == "dtype":
        entry["dtype"] = rec["dtype"] = data.draw(st.sampled_from(sorted(mf.ITEMSIZE) + ["Q9", ""]))
    elif what == "offsets":
        chunk["offsets"] = data.draw(st.lists(small, min_size=len(entry["shape"]), max_size=len(entry["shape"])))
    elif what == "sizes":
        chunk["sizes"] = data.draw(st.lists(small, min_size=len(entry["shape"]), max_size=len(entry["shape"])))
    elif what == "rec-shape":
        rec["shape"] = data.draw(st.lists(small, max_size=4))
    elif what == "rec-range":
        rec["end"] += data.draw(st.integers(-16, 16))
    elif what == "split" and entry["shape"]:  # two chunks that overlap or leave a gap
        half = dict(chunk, offsets=[data.draw(small)] + chunk["offsets"][1:])
        entry["chunks"].append(half)
    elif what == "duplicate":
        entry["chunks"].append(dict(chunk))
    else:  # a consistent-looking lie: [2, 3] read as [2, 7]
        grown = [s + data.draw(st.integers(0, 5)) for s in entry["shape"]]
        entry["shape"] = chunk["sizes"] = rec["shape"] = grown
    _rewrite(bad, m)
    _read_everything(world, bad, data_intact=True)


@FUZZ
@given(data=st.data())
def test_mutated_file_bytes_types_links_and_sizes(world, victim, data):
    """Bit flips, truncation, growth, and members that are links (outside the folder, /dev/zero), FIFOs, folders,
    or missing; also bit flips in the manifest itself (its digest then no longer matches)."""
    bad = victim()
    names = sorted(os.listdir(bad))
    fname = data.draw(st.sampled_from(names))
    path = os.path.join(bad, fname)
    what = data.draw(st.sampled_from(["flip", "truncate", "grow", "link-out", "link-zero", "fifo", "folder",
                                      "missing", "link-folder"]))
    if what == "link-folder":  # the checkpoint folder itself a link to a copy outside the run folder
        shutil.rmtree(world["outside"], ignore_errors=True)
        shutil.copytree(bad, world["outside"])
        shutil.rmtree(bad)
        os.symlink(world["outside"], bad)
        _read_everything(world, bad, data_intact=True)
        return
    raw = open(path, "rb").read()
    if what == "flip" and raw:
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw = raw[:pos] + bytes([raw[pos] ^ (1 << data.draw(st.integers(0, 7)))]) + raw[pos + 1:]
        open(path, "wb").write(raw)
    elif what == "truncate":
        open(path, "wb").write(raw[: data.draw(st.integers(0, max(0, len(raw) - 1)))])
    elif what == "grow":
        open(path, "ab").write(b"\0" * data.draw(st.integers(1, 64)))
    elif what in ("link-out", "link-zero"):
        os.unlink(path)
        os.symlink(world["secret"] if what == "link-out" else "/dev/zero", path)
    elif what == "fifo":
        os.unlink(path)
        os.mkfifo(path)
    elif what == "folder":
        os.unlink(path)
        os.mkdir(path)
    else:
        os.unlink(path)
    _read_everything(world, bad, data_intact=True)


state_docs = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(
        st.sampled_from(["$t", "$np", "$npscalar", "$dtype", "$tuple", "$dict", "$set", "$bytes", "$float", "$size",
                         "$device", "$path", "$namespace", "$type", "$enum", "$repr", "$evil", "state_dict", "w"]),
        c, max_size=2),
    max_leaves=10,
)


@FUZZ
@given(doc=state_docs | st.sampled_from([
    {"w": {"$t": "state_dict/not-there"}}, {"w": {"$npscalar": ["V99999999999", 1]}},
    {"w": {"$size": [10**30]}}, {"w": {"$bytes": "!!!"}}, {"w": {"$type": "os.system"}},
    {"w": {"$dict": [[{"$t": "state_dict/emb"}, 1]]}}, {"w": {"$device": "cuda:99"}},
    {"w": {"$npscalar": ["float64", 1e308]}}, {"w": {"$np": "state_dict/layer.weight"}}]))
def test_mutated_state_documents(world, victim, doc):
    """The non-tensor state replaced by hostile JSON (size and checksum fixed up, as someone with write access could):
    never unpickled, never code run; a reference to a tensor the manifest does not list is corrupt."""
    bad = victim()
    raw = json.dumps(doc).encode()
    with open(os.path.join(bad, "state-rank00000.json"), "wb") as f:
        f.write(raw)
    m = _manifest(bad)
    m["files"]["state-rank00000.json"].update(size=len(raw), header_end=len(raw), header_crc32c=crc32c(raw))
    _rewrite(bad, m)
    _read_everything(world, bad, data_intact=False)


_HOSTILE_NUMBERS = st.sampled_from([0, 1, -1, 7, 2**31 - 1, 2**31, 2**63, 2**64, 10**30, 1e300, 1.5, True,
                                    float("inf"), float("-inf"), float("nan")])
_HOSTILE_DTYPES = st.sampled_from(["V8", "V2147483647", "V", "float16", "int8", "uint64", "i4,i4", "(4096,4096)f8",
                                   "O", "S3", "U3", "M8[s]", "c16", "bool", "float64", "", "x" * 40])
_TAGS = ["$t", "$np", "$npscalar", "$dtype", "$tuple", "$dict", "$set", "$bytes", "$float", "$size", "$device",
         "$path", "$namespace", "$type", "$enum", "$repr", "$evil"]
_ANY_SMALL = _HOSTILE_NUMBERS | st.text(max_size=6) | st.lists(_HOSTILE_NUMBERS | st.text(max_size=4), max_size=3)
hostile_entries = st.one_of(
    st.builds(lambda d, v: {"$npscalar": [d, v]}, _HOSTILE_DTYPES,
              _HOSTILE_NUMBERS | st.text(max_size=4) | st.just({"$bytes": "AAAA"}) | st.just({"$float": "inf"})),
    st.builds(lambda v: {"$size": v}, st.lists(_HOSTILE_NUMBERS, max_size=3) | _HOSTILE_NUMBERS),
    st.builds(lambda t, v: {t: v}, st.sampled_from(_TAGS), _ANY_SMALL | st.dictionaries(st.text(max_size=3), _ANY_SMALL,
                                                                                         max_size=2)),
    st.sampled_from([{"$t": "state_dict/layer.weight"}, {"$np": "state_dict/emb"}, {"$t": "state_dict/missing"}]),
)


def _footprint(x, depth=0) -> int:
    """Bytes held by a decoded state (numpy values, bytes, strings, tensors counted once per storage)."""
    if depth > 500:
        return 0
    if isinstance(x, torch.Tensor):
        return 0  # the tensors are the checkpoint's own, read from the files (bounded by their sizes)
    if isinstance(x, (bytes, str)):
        return len(x)
    if hasattr(x, "nbytes"):
        return int(x.nbytes)
    if isinstance(x, dict):
        return sum(_footprint(k, depth + 1) + _footprint(v, depth + 1) for k, v in x.items())
    if isinstance(x, (list, tuple, set, frozenset)):
        return sum(_footprint(v, depth + 1) for v in x)
    return 0


@settings(FUZZ, max_examples=max(1, FUZZ.max_examples // 2))  # the decoding readers only: a cheap campaign
@given(data=st.data())
def test_mutated_state_entries(world, victim, data):
    """One entry of the real state document (at any depth) replaced by a hostile tagged value, sometimes repeated
    hundreds of times (a 10 KB file of 2 GiB values): a CheckpointError, or a state whose values are no bigger than
    their text."""
    bad = victim()
    path = os.path.join(bad, "state-rank00000.json")
    with open(path, "rb") as f:
        doc = json.loads(f.read())
    value = data.draw(hostile_entries)
    if data.draw(st.booleans()):
        value = [value] * data.draw(st.sampled_from([2, 300]))
    where = data.draw(st.sampled_from([p for p in _paths(doc) if p]))
    _set(doc, where, value)
    raw = json.dumps(doc).encode()
    with open(path, "wb") as f:
        f.write(raw)
    m = _manifest(bad)
    m["files"]["state-rank00000.json"].update(size=len(raw), header_end=len(raw), header_crc32c=crc32c(raw))
    _rewrite(bad, m)
    _OPENED.clear()
    got = _call("load_checkpoint", load_checkpoint, bad)
    if not isinstance(got, CheckpointError):
        assert _footprint(got) <= 64 * len(raw) + (1 << 20), "a decoded value is far bigger than its text"
    _call("verify_checkpoint", verify_checkpoint, bad)
    _call("load_weights", load_weights, bad, _model(), strict=False)
    latest = _call("latest_checkpoint", latest_checkpoint, world["run"])  # resume="auto": skips it, never raises
    assert latest in (world["good"], bad), f"latest_checkpoint gave {latest!r}"
    _cli(["verify", bad])
    _cli(["show", bad])
    assert not _opened_outside(world)


def test_the_campaign_stayed_within_its_memory_bound(world):
    """Runs after the campaigns above (file order): no reader allocated from a declared size it did not check."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert peak < _START_RSS + MEMORY_BOUND_BYTES, f"peak RSS grew by {(peak - _START_RSS) >> 20} MiB"


_START_RSS = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
