"""Damaged, hostile or mismatched input: a specific error with a helpful message, and the other checkpoints in the
same folder stay intact and are still found by ``latest_checkpoint``."""
from __future__ import annotations

import functools
import json
import os
import pickle
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lightning_ckpt import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CheckpointWriter,
    PeriodicCheckpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    verify_checkpoint,
)
from lightning_ckpt.format import manifest as mf
from lightning_ckpt.format.checksum import crc32c

import support

MODEL = "model-rank00000.safetensors"
OPTIM = "optim-rank00000.safetensors"
EXTRA = "extra-rank00000.safetensors"
STATE = "state-rank00000.json"
MANIFEST = "manifest.json"


# ------------------------------------------------------------------ helpers
def make_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "global_step": seed,
        "state_dict": {"layer.weight": torch.randn(4, 3, generator=g), "layer.bias": torch.randn(4, generator=g)},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.randn(4, 3, generator=g)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}],
        "loops": {"rng": torch.randint(0, 255, (32,), dtype=torch.uint8, generator=g), "position": seed},
    }


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


class Run:
    """A run folder with two good checkpoints, ``step=000001`` (kept pristine) and ``step=000002`` (damaged)."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "ckpts"
        w = CheckpointWriter(str(self.dir), async_save=False, fsync=False)
        try:
            w.save(make_state(1), step=1)
            w.save(make_state(2), step=2)
        finally:
            w.close()
        self.good = self.dir / "step=000001"
        self.bad = self.dir / "step=000002"
        self.good_bytes = tree_bytes(self.good)

    def manifest(self) -> dict:
        return json.loads((self.bad / MANIFEST).read_text())

    def write_manifest(self, m: dict) -> None:
        """Write an edited manifest as an attacker would: with its own digest recomputed (see dumps)."""
        (self.bad / MANIFEST).write_bytes(mf.dumps(m))

    def replace_state(self, raw: bytes) -> None:
        """Replace the state file and fix up its size and checksum, so only the content is hostile."""
        (self.bad / STATE).write_bytes(raw)
        m = self.manifest()
        m["files"][STATE].update(size=len(raw), header_end=len(raw), header_crc32c=crc32c(raw))
        self.write_manifest(m)

    def assert_good_untouched_and_found(self, *, expect_skip_warning: bool = True) -> None:
        assert tree_bytes(self.good) == self.good_bytes, "the earlier checkpoint was modified"
        out = load_checkpoint(str(self.good))
        assert torch.equal(out["state_dict"]["layer.weight"], make_state(1)["state_dict"]["layer.weight"])
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            found = latest_checkpoint(str(self.dir))  # verifies every byte of what it returns
        assert found == str(self.good), f"latest_checkpoint returned {found}, not the previous valid checkpoint"
        if expect_skip_warning:
            assert any(str(self.bad) in str(w.message) for w in rec), "skipping a damaged checkpoint should warn"


@pytest.fixture
def run(tmp_path) -> Run:
    return Run(tmp_path)


def flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))


# Files opened by this process while `_OPENED` is a list; used to prove that a hostile manifest is refused before
# anything it names is read.
_OPENED: list | None = None


def _audit(event, args):
    if event == "open" and _OPENED is not None and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


class record_opens:
    def __enter__(self):
        global _OPENED
        _OPENED = []
        return _OPENED

    def __exit__(self, *exc):
        global _OPENED
        _OPENED = None


# ------------------------------------------------------------------ truncation and flipped bytes
@pytest.mark.parametrize("fname", [MODEL, OPTIM, EXTRA, STATE])
@pytest.mark.parametrize("keep", ["all-but-1", "3-bytes"])
def test_truncated_file_is_corrupt(run, fname, keep):
    p = run.bad / fname
    raw = p.read_bytes()
    n = {"all-but-1": len(raw) - 1, "3-bytes": 3}[keep]
    p.write_bytes(raw[:n])
    with pytest.raises(CheckpointCorruptError) as ei:
        verify_checkpoint(str(run.bad))
    assert fname in str(ei.value)
    with pytest.raises(CheckpointCorruptError) as ei:
        load_checkpoint(str(run.bad))
    assert fname in str(ei.value)
    # listing reads manifests only, so the checkpoint is still listed; latest_checkpoint verifies and skips it
    assert [c.name for c in list_checkpoints(str(run.dir))] == ["step=000001", "step=000002"]
    run.assert_good_untouched_and_found()


def _offset(run: Run, where: str) -> tuple[str, int]:
    m = run.manifest()
    if where == "state":
        return STATE, m["files"][STATE]["size"] // 2
    fname = {"model": MODEL, "optim": OPTIM, "extra": EXTRA, "header": MODEL, "length-prefix": MODEL}[where]
    entry = m["files"][fname]
    if where == "header":
        return fname, entry["header_end"] // 2  # inside the JSON header of the safetensors file
    if where == "length-prefix":
        return fname, 0
    return fname, entry["size"] - 1  # the last tensor byte


@pytest.mark.parametrize("where", ["model", "optim", "extra", "state", "header", "length-prefix"])
def test_one_flipped_byte_is_corrupt(run, where):
    fname, off = _offset(run, where)
    flip(run.bad / fname, off)
    with pytest.raises(CheckpointCorruptError) as ei:
        verify_checkpoint(str(run.bad))
    msg = str(ei.value)
    assert fname in msg and "corrupt" in msg
    with pytest.raises(CheckpointCorruptError) as ei:
        load_checkpoint(str(run.bad))
    assert fname in str(ei.value)
    run.assert_good_untouched_and_found()


def test_every_single_flipped_byte_is_detected(tmp_path):
    d = tmp_path / "tiny"
    w = CheckpointWriter(str(d), async_save=False, fsync=False)
    w.save({"state_dict": {"w": torch.arange(3.0)}, "optimizer_states": [{"m": torch.tensor([True])}],
            "extra": torch.tensor(7, dtype=torch.int16), "step": 1}, step=1)
    w.close()
    ck = d / "step=000001"
    files = json.loads((ck / MANIFEST).read_text())["files"]
    for fname in (MODEL, OPTIM, EXTRA, STATE):
        p = ck / fname
        original = p.read_bytes()
        hend = files[fname]["header_end"]
        check_verify = {0, 7, hend - 1, hend, len(original) - 1}  # verify is slower: boundaries only
        for i in range(len(original)):
            bad = bytearray(original)
            bad[i] ^= 0x01
            p.write_bytes(bytes(bad))
            try:
                with pytest.raises(CheckpointCorruptError):
                    load_checkpoint(str(ck))
                if i in check_verify:
                    with pytest.raises(CheckpointCorruptError):
                        verify_checkpoint(str(ck))
            except BaseException as e:
                raise AssertionError(f"flipping bit 0 of byte {i} of {fname} was not reported as corrupt: {e!r}") from e
        p.write_bytes(original)
    verify_checkpoint(str(ck))


def test_missing_file_is_corrupt(run):
    os.unlink(run.bad / OPTIM)
    with pytest.raises(CheckpointCorruptError, match=OPTIM):
        verify_checkpoint(str(run.bad))
    with pytest.raises(CheckpointCorruptError, match=OPTIM):
        load_checkpoint(str(run.bad))
    run.assert_good_untouched_and_found()


# ------------------------------------------------------------------ manifest problems
def test_missing_manifest_means_not_a_checkpoint(run):
    os.unlink(run.bad / MANIFEST)
    assert [c.name for c in list_checkpoints(str(run.dir))] == ["step=000001"]
    with pytest.raises(CheckpointNotFoundError) as ei:
        load_checkpoint(str(run.bad))
    assert "manifest.json" in str(ei.value) and str(run.bad) in str(ei.value)
    with pytest.raises(CheckpointNotFoundError):
        verify_checkpoint(str(run.bad))
    run.assert_good_untouched_and_found(expect_skip_warning=False)


def test_not_found_errors_are_also_file_not_found_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointNotFoundError, match="is a file"):
        load_checkpoint(str(tmp_path / "f"))


@pytest.mark.parametrize("target", ["parent", "absolute", "nested"])
@pytest.mark.parametrize("which", ["state", "model"])
def test_manifest_naming_a_file_outside_the_folder_is_refused_before_reading(run, tmp_path, target, which):
    fname = STATE if which == "state" else MODEL
    secret = tmp_path / "secret" / fname
    secret.parent.mkdir()
    secret.write_bytes((run.bad / fname).read_bytes())  # a valid file: reading it would "work"
    name = {"parent": f"../../secret/{fname}", "absolute": str(secret), "nested": f"sub/{fname}"}[target]
    if target == "nested":
        (run.bad / "sub").mkdir()
        (run.bad / "sub" / fname).write_bytes(secret.read_bytes())
    m = run.manifest()
    m["files"][name] = m["files"].pop(fname)
    if which == "state":
        m["state_files"] = {"0": name}
    else:
        for t in m["tensors"].values():
            for c in t["chunks"]:
                if c["file"] == fname:
                    c["file"] = name
    run.write_manifest(m)
    with record_opens() as opened:
        with pytest.raises(CheckpointCorruptError) as ei:
            load_checkpoint(str(run.bad))
    assert name in str(ei.value) or repr(name) in str(ei.value)
    touched = [p for p in opened if os.path.basename(p) == fname]
    assert touched == [], f"files were opened before the manifest was refused: {touched}"
    with pytest.raises(CheckpointCorruptError):
        verify_checkpoint(str(run.bad))
    with pytest.warns(UserWarning, match="skipping"):
        assert [c.name for c in list_checkpoints(str(run.dir))] == ["step=000001"]
    run.assert_good_untouched_and_found()


def test_newer_format_version_says_to_upgrade(run):
    m = run.manifest()
    m["format_version"] = mf.FORMAT_VERSION + 1
    run.write_manifest(m)
    with pytest.raises(CheckpointFormatError) as ei:
        load_checkpoint(str(run.bad))
    msg = str(ei.value)
    assert "upgrade" in msg.lower() and str(mf.FORMAT_VERSION + 1) in msg
    with pytest.raises(CheckpointFormatError):
        verify_checkpoint(str(run.bad))
    with pytest.warns(UserWarning, match="newer"):
        assert [c.name for c in list_checkpoints(str(run.dir))] == ["step=000001"]
    run.assert_good_untouched_and_found()


@pytest.mark.parametrize(
    "mutate",
    [
        "not-json",
        "json-list",
        "not-our-format",
        "no-step",
        "step-is-string",
        "version-is-string",
        "size-grown",
        "tensor-range-gap",
        "negative-shape",
        "chunk-points-nowhere",
        "state-file-unlisted",
        "unknown-dtype",
    ],
)
def test_malformed_manifest_is_reported_not_crashing(run, mutate):
    m = run.manifest()
    model = m["files"][MODEL]
    tname = next(iter(model["tensors"]))
    text = None
    if mutate == "not-json":
        text = (run.bad / MANIFEST).read_text()[:-10]
    elif mutate == "json-list":
        text = "[1, 2]"
    elif mutate == "not-our-format":
        m["format"] = "something-else"
    elif mutate == "no-step":
        del m["step"]
    elif mutate == "step-is-string":
        m["step"] = "2"
    elif mutate == "version-is-string":
        m["format_version"] = "1"
    elif mutate == "size-grown":
        model["size"] += 8
    elif mutate == "tensor-range-gap":
        model["tensors"][tname]["begin"] += 4
    elif mutate == "negative-shape":
        model["tensors"][tname]["shape"] = [-4, 3]
    elif mutate == "chunk-points-nowhere":
        next(iter(m["tensors"].values()))["chunks"][0]["name"] = "no-such-tensor"
    elif mutate == "state-file-unlisted":
        m["state_files"] = {"0": "state-rank00009.json"}
    elif mutate == "unknown-dtype":
        model["tensors"][tname]["dtype"] = "Q99"
        for t in m["tensors"].values():
            for c in t["chunks"]:
                if c["name"] == tname:
                    t["dtype"] = "Q99"
    if text is None:
        text = mf.dumps(m).decode()  # as an attacker would: the digest recomputed, only the structure is wrong
    (run.bad / MANIFEST).write_text(text)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(str(run.bad))
    assert isinstance(ei.value, (CheckpointCorruptError, CheckpointFormatError))
    with pytest.raises((CheckpointCorruptError, CheckpointFormatError)):
        verify_checkpoint(str(run.bad)) if mutate != "unknown-dtype" else load_checkpoint(str(run.bad))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = [c.name for c in list_checkpoints(str(run.dir))]  # must not raise
    assert "step=000001" in names
    if mutate != "unknown-dtype":  # an unknown dtype passes the byte checks; it fails when loaded
        run.assert_good_untouched_and_found()


# ------------------------------------------------------------------ hostile state content
class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_pickle_payload_in_state_file_is_refused_and_never_run(run, tmp_path, protocol):
    marker = tmp_path / "PWNED"
    payload = pickle.dumps({"global_step": 2, "x": _Evil(str(marker))}, protocol=protocol)
    run.replace_state(payload)
    # the bytes match the (rewritten) manifest, only the content is hostile: verification parses the state too
    with pytest.raises(CheckpointCorruptError, match="JSON"):
        verify_checkpoint(str(run.bad))
    with pytest.raises(CheckpointCorruptError) as ei:
        load_checkpoint(str(run.bad))
    assert STATE in str(ei.value) and "JSON" in str(ei.value)
    assert not marker.exists(), "the pickle payload was executed"
    assert tree_bytes(run.good) == run.good_bytes
    assert torch.equal(load_checkpoint(str(run.good))["state_dict"]["layer.bias"], make_state(1)["state_dict"]["layer.bias"])


def test_torch_save_payload_in_state_file_is_refused_and_never_run(run, tmp_path):
    import io

    marker = tmp_path / "PWNED"
    buf = io.BytesIO()
    torch.save({"x": _Evil(str(marker))}, buf)
    run.replace_state(buf.getvalue())
    with pytest.raises(CheckpointCorruptError):
        load_checkpoint(str(run.bad))
    assert not marker.exists()


def test_unknown_tag_in_state_is_corrupt_and_names_the_tag(run):
    run.replace_state(json.dumps({"global_step": 2, "callbacks": {"$__reduce__": ["os.system", ["touch x"]]}}).encode())
    with pytest.raises(CheckpointCorruptError, match=r"\$__reduce__"):
        load_checkpoint(str(run.bad))


def test_repr_and_type_tags_load_as_plain_strings(run):
    doc = {
        "global_step": 2,
        "a": {"$repr": ["subprocess.Popen", "Popen(['rm', '-rf', '/'])"]},
        "b": {"$type": "os.system"},
        "c": {"$enum": ["os.EX_OK", 0]},
    }
    run.replace_state(json.dumps(doc).encode())
    out = load_checkpoint(str(run.bad))
    assert out == {"global_step": 2, "a": "Popen(['rm', '-rf', '/'])", "b": "os.system", "c": 0}


def test_state_referring_to_a_tensor_the_manifest_does_not_list_is_corrupt(run):
    run.replace_state(json.dumps({"w": {"$t": "state_dict/not-there"}}).encode())
    with pytest.raises(CheckpointCorruptError, match="not-there"):
        load_checkpoint(str(run.bad))


@pytest.mark.parametrize("payload", [b"\xff\xfe\x00garbage", b"", b"{", b'{"a": NaN}' * 0 + b'{"a": 1} trailing'])
def test_state_file_that_is_not_json_is_corrupt(run, payload):
    run.replace_state(payload)
    with pytest.raises(CheckpointCorruptError, match=STATE):
        load_checkpoint(str(run.bad))


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 200_000 + b"]" * 200_000,  # too deep for the JSON parser
        b'{"$tuple": [' * 450 + b"1" + b"]}" * 450,  # parses, but too deep to decode recursively
        b'{"a": ' * 900 + b"1" + b"}" * 900,
    ],
    ids=["json-depth", "tag-depth", "dict-depth"],
)
def test_deeply_nested_state_is_corrupt_not_a_recursion_error(run, raw):
    import sys

    run.replace_state(raw)
    with pytest.raises(CheckpointCorruptError):
        load_checkpoint(str(run.bad))
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))  # another library raised it: the depth bound must not depend on it
    try:
        with pytest.raises(CheckpointCorruptError, match="nests deeper"):
            load_checkpoint(str(run.bad))
    finally:
        sys.setrecursionlimit(limit)


def test_a_state_too_deep_to_load_is_refused_when_it_is_saved(tmp_path):
    from lightning_ckpt import CheckpointError, CheckpointWriter

    deep: dict = {}
    node = deep
    for _ in range(300):
        node["x"] = {}
        node = node["x"]
    w = CheckpointWriter(str(tmp_path), async_save=False)
    with pytest.raises(CheckpointError, match="nests deeper"):
        w.save({"state_dict": {"w": torch.ones(2)}, "deep": deep}, step=1)
    w.close()
    assert list_checkpoints(str(tmp_path)) == []


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param("pickle", id="pickle"),
        pytest.param("unknown-tag", id="unknown-tag"),
        pytest.param("not-json", id="not-json"),
    ],
)
def test_latest_checkpoint_skips_a_checkpoint_whose_state_cannot_be_loaded(run, tmp_path, payload):
    """Resuming with ``ckpt_path=latest_checkpoint(dir)`` must not pick a checkpoint that cannot be loaded."""
    raw = {
        "pickle": pickle.dumps({"x": _Evil(str(tmp_path / "PWNED"))}),
        "unknown-tag": json.dumps({"x": {"$evil": 1}}).encode(),
        "not-json": b"\x00\x01\x02",
    }[payload]
    run.replace_state(raw)
    with pytest.raises(CheckpointCorruptError):
        load_checkpoint(str(run.bad))
    run.assert_good_untouched_and_found()
    assert not (tmp_path / "PWNED").exists()


# ------------------------------------------------------------------ Lightning: resume into a different model, bad dirpath
_trainer = functools.partial(support.trainer, val_every=None, num_sanity_val_steps=0, accelerator="cpu", devices=1)


def test_resume_into_a_model_with_other_shapes_names_the_tensor(tmp_path):
    from lightning_ckpt.demo import DemoDataModule, DemoModel

    d = tmp_path / "ckpts"
    torch.manual_seed(0)
    _trainer([PeriodicCheckpoint(str(d), every_n_train_steps=2, async_save=False)], max_steps=2).fit(
        DemoModel(hidden=8), DemoDataModule(n_train=64, n_val=16, batch_size=16)
    )
    ckpt = latest_checkpoint(str(d))
    assert ckpt is not None
    before = {c.name: tree_bytes(Path(c.path)) for c in list_checkpoints(str(d))}

    other = DemoModel(hidden=16)
    weights_before = {k: v.clone() for k, v in other.state_dict().items()}
    trainer = _trainer([PeriodicCheckpoint(str(d), every_n_train_steps=2, async_save=False)], max_steps=4)
    with pytest.raises(CheckpointMismatchError) as ei:
        trainer.fit(other, DemoDataModule(n_train=64, n_val=16, batch_size=16), ckpt_path=ckpt)
    msg = str(ei.value)
    assert "net.0.weight" in msg and "[8, 16]" in msg and "[16, 16]" in msg
    assert trainer.global_step == 0
    for k, v in other.state_dict().items():
        assert torch.equal(v, weights_before[k]), f"{k} was changed by a refused load"
    after = {c.name: tree_bytes(Path(c.path)) for c in list_checkpoints(str(d))}
    assert after == before, "the failed resume changed or added checkpoints"
    verify_checkpoint(ckpt)


@pytest.mark.parametrize("kind", ["existing-file", "not-writable"])
def test_bad_dirpath_fails_at_setup_naming_the_path(tmp_path, kind):
    from lightning_ckpt.demo import DemoDataModule, DemoModel

    if kind == "existing-file":
        dirpath = tmp_path / "ckpts"
        dirpath.write_text("not a folder")
    else:
        dirpath = Path("/proc/lightning_ckpt_nope/ckpts")
    model = DemoModel(hidden=8)
    w0 = model.net[0].weight.detach().clone()
    trainer = _trainer([PeriodicCheckpoint(str(dirpath), every_n_train_steps=1)], max_steps=3)
    with pytest.raises(CheckpointWriteError) as ei:
        trainer.fit(model, DemoDataModule(n_train=64, n_val=16, batch_size=16))
    assert str(dirpath) in str(ei.value)
    assert trainer.global_step == 0, "training ran before the bad dirpath was reported"
    assert torch.equal(model.net[0].weight.detach(), w0)
    if kind == "existing-file":
        assert dirpath.read_text() == "not a folder"


def test_writer_refuses_an_unwritable_dirpath(tmp_path):
    w = CheckpointWriter("/proc/lightning_ckpt_nope/ckpts", async_save=False)
    try:
        with pytest.raises(CheckpointWriteError, match="/proc/lightning_ckpt_nope/ckpts"):
            w.prepare_dir()
        with pytest.raises(CheckpointWriteError, match="/proc/lightning_ckpt_nope/ckpts"):
            w.save(make_state(1), step=1)
    finally:
        w.close()
