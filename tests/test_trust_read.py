"""The read side against a hostile folder (issue 19): links anywhere on the path to a member, names that only look
whole, output paths under a file, state values that decode into huge or broken objects, and recorded text that
would steer the terminal."""
from __future__ import annotations

import io
import contextlib
import json
import logging
import os
import shutil
import sys
import warnings

import pytest
import torch

from lightning_ckpt import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointWriter,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_into,
    load_weights,
    merge_checkpoint,
    verify_checkpoint,
)
from lightning_ckpt.cli import main
from lightning_ckpt.cli.text import escaped_diagnostics, shown
from lightning_ckpt.format import manifest as mf
from lightning_ckpt.format.checksum import crc32c
from lightning_ckpt.format.codec import decode
from lightning_ckpt.session.options import SaveOptions
from lightning_ckpt.store import LocalStore
from lightning_ckpt.store.base import host_id, owner_gone
from lightning_ckpt.tools.standalone import export_standalone

STATE = "state-rank00000.json"


def _state(scale: float, frozen: torch.Tensor) -> dict:
    return {"state_dict": {"frozen": frozen, "head": torch.full((4,), float(scale))},
            "global_step": int(scale), "loops": {"pos": int(scale)}}


def _run(root, steps=(1, 2), **save) -> list[str]:
    """A run folder whose checkpoints share ``state_dict/frozen`` through the content store (``.blobs``)."""
    w = CheckpointWriter(str(root), async_save=False, fsync=False)
    frozen = torch.arange(64, dtype=torch.float32)  # the same tensor at every save: the writer shares it
    try:
        paths = [w.save(_state(s, frozen), step=s, stable=["state_dict/frozen"], **save).result().path for s in steps]
    finally:
        w.close()
    return paths


def _cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("always")
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _readers(path: str, tmp_path) -> dict:
    """Every reader of one checkpoint: name -> a call."""
    model = torch.nn.Module()
    model.frozen = torch.nn.Parameter(torch.zeros(64))
    model.head = torch.nn.Parameter(torch.zeros(4))
    return {
        "verify": lambda: verify_checkpoint(path),
        "load": lambda: load_checkpoint(path),
        "load_weights": lambda: load_weights(path, model),
        "load_into": lambda: load_into(path, {"state_dict": {"frozen": torch.zeros(64), "head": torch.zeros(4)}}),
        "merge": lambda: merge_checkpoint(path, tmp_path / "merged.safetensors"),
        "export": lambda: export_standalone(path, tmp_path / "exported"),
    }


# ------------------------------------------------------------------------------------------------ 1. links on the path
def test_a_content_store_folder_replaced_by_a_link_is_refused_by_every_reader(tmp_path):
    paths = _run(tmp_path / "run")
    blobs = tmp_path / "run" / mf.BLOBS
    assert os.listdir(blobs), "the run should share a tensor through the content store"
    shutil.move(blobs, tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", blobs)  # same bytes, but outside the run folder
    for name, read in _readers(paths[-1], tmp_path).items():
        with pytest.raises(CheckpointCorruptError, match="symbolic link"):
            read()
        assert not (tmp_path / "exported" / os.path.basename(paths[-1])).exists(), name
    with pytest.warns(UserWarning, match="symbolic link"):
        assert latest_checkpoint(tmp_path / "run") is None
    code, _, err = _cli(["verify", paths[-1]])
    assert code == 1 and "symbolic link" in err


def test_a_checkpoint_folder_swapped_for_a_link_after_its_manifest_was_read_is_refused(tmp_path, monkeypatch):
    """The window between the manifest read and the member opens: each member is opened relative to the checkpoint
    folder's own descriptor, taken without following a link."""
    path = _run(tmp_path / "run", steps=(1,))[0]
    read_manifest = LocalStore.read_manifest

    def swap_after_reading(self, name):
        got = read_manifest(self, name)
        folder = self.path(name)
        if not os.path.islink(folder):
            moved = str(tmp_path / f"moved-{len(os.listdir(tmp_path))}")
            shutil.copytree(folder, moved)
            shutil.rmtree(folder)
            os.symlink(moved, folder)
        return got

    monkeypatch.setattr(LocalStore, "read_manifest", swap_after_reading)
    for name, read in _readers(path, tmp_path).items():
        if os.path.islink(path):  # put the real folder back for the next reader
            target = os.readlink(path)
            os.unlink(path)
            shutil.copytree(target, path)
        with pytest.raises(CheckpointCorruptError, match="symbolic link"):
            read()


def test_push_refuses_a_link_on_the_path_before_a_byte_goes_up(s3, tmp_path, monkeypatch):
    from lightning_ckpt.store.s3 import S3Store
    from lightning_ckpt.folder.transfer import push_checkpoint

    paths = _run(tmp_path / "run")
    blobs = tmp_path / "run" / mf.BLOBS
    shutil.move(blobs, tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", blobs)
    sent = []
    put_file = S3Store.put_file

    def recording(self, key, path, *a, **k):
        sent.append(path)
        return put_file(self, key, path, *a, **k)

    monkeypatch.setattr(S3Store, "put_file", recording)
    with pytest.raises(CheckpointCorruptError, match="symbolic link"):
        push_checkpoint(paths[-1], s3.uri("run"))
    assert sent == [], "bytes went up through a link"


def test_a_checkpoint_folder_that_is_a_link_is_neither_listed_nor_read(tmp_path):
    path = _run(tmp_path / "run", steps=(1,))[0]
    shutil.move(path, tmp_path / "real")
    os.symlink(tmp_path / "real", path)
    assert list_checkpoints(tmp_path / "run") == []
    with pytest.raises(CheckpointError, match="symbolic link"):
        verify_checkpoint(path)
    assert _cli(["show", path])[0] != 0


def test_a_history_planted_as_a_link_is_neither_copied_into_an_export_nor_reported(tmp_path):
    from lightning_ckpt.tools.export import export_checkpoint
    from lightning_ckpt.tools.report import collect_run

    path = _run(tmp_path / "run", steps=(1,))[0]
    secret = tmp_path / "secret.jsonl"
    secret.write_text(json.dumps({"step": 1, "name": "step=000001", "metrics": {"secret": 42.0}}) + "\n")
    history = tmp_path / "run" / "metrics.jsonl"
    os.symlink(secret, history)
    out = export_checkpoint(path, tmp_path / "export", history=str(history))
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))
    assert "secret" not in json.dumps(collect_run(tmp_path / "run").__dict__, default=str)


def test_a_checkpoint_deleted_between_the_listing_and_its_manifest_read_is_skipped_silently(tmp_path, monkeypatch):
    import lightning_ckpt.store.local as local

    first, second = _run(tmp_path / "run")
    read_member = local.read_member

    def deleted_first(folder, *a, **k):
        if folder == second:
            shutil.rmtree(folder)  # retention, in another process
        return read_member(folder, *a, **k)

    monkeypatch.setattr(local, "read_member", deleted_first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [c.path for c in list_checkpoints(tmp_path / "run")] == [first]


# ------------------------------------------------------------------------------------------------ 2. whole names
def test_name_patterns_match_the_whole_name_not_a_trailing_newline(tmp_path):
    assert mf.is_plain_name("step=000001") and not mf.is_plain_name("step=000001\n")
    pack = "pack-0123abcd-1-rank00000.safetensors"
    assert mf.PACK_RE.match(pack) and not mf.PACK_RE.match(pack + "\n")
    SaveOptions(run_name="main")
    with pytest.raises(ValueError):
        SaveOptions(run_name="main\n")
    # owner tokens from planted folder names: other digits, or a pid os.kill cannot take, are "not gone", not a crash
    for pid in ("²", "٣", "99999999999999999999", "12\n"):
        assert owner_gone(f"{host_id()}.{pid}") is False
    # a listed name must be the whole name: "step=000003\n" with a manifest is no checkpoint
    path = _run(tmp_path / "run", steps=(3,))[0]
    shutil.copytree(path, path + "\n")
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["step=000003"]


@pytest.mark.parametrize("rank", ["٠", "0\n", "²"])
def test_a_state_file_rank_that_is_not_ascii_digits_is_corrupt(tmp_path, rank):
    path = _run(tmp_path / "run", steps=(1,))[0]
    m = json.loads(open(os.path.join(path, mf.MANIFEST), "rb").read())
    m["state_files"] = {rank: STATE}
    with pytest.raises(CheckpointCorruptError, match="rank"):
        mf.parse_manifest(mf.dumps(m), "manifest.json")


# ------------------------------------------------------------------------------------------------ 3. output paths
@pytest.mark.parametrize("verb", ["merge", "export", "convert", "report", "pull"])
def test_an_output_path_under_a_regular_file_is_one_line_and_a_nonzero_exit(tmp_path, verb):
    path = _run(tmp_path / "run", steps=(1,))[0]
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    argv = {"merge": ["merge", path, afile / "out.safetensors"], "export": ["export", path, afile / "sub"],
            "convert": ["convert", path, afile / "m.ckpt"], "report": ["report", tmp_path / "run", "-o", afile / "r.html"],
            "pull": ["pull", "s3://bucket/run/step=000001", afile / "sub"]}[verb]
    code, out, err = _cli(argv)
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err and f"{afile} is a file, not a folder" in err, err
    assert afile.read_text() == "not a folder"
    with pytest.raises(ValueError, match="is a file, not a folder"):
        merge_checkpoint(path, afile / "out.safetensors")


# ------------------------------------------------------------------------------------------------ 4. the state decoder
HOSTILE = [
    {"$npscalar": ["V8", 2147483647]},  # 2 GiB from 31 bytes
    {"$npscalar": ["V2147483647", 0]}, {"$npscalar": ["(65536,65536)f8", 0]}, {"$npscalar": ["i4,i4", 5]},
    {"$npscalar": ["O", [1]]}, {"$npscalar": ["int8", 1000]}, {"$npscalar": ["u8", -1]},
    {"$npscalar": ["i4", float("inf")]}, {"$npscalar": ["float16", 1e300]}, {"$npscalar": "V8"},
    {"$size": [float("inf")]}, {"$size": [10**30]}, {"$size": [-1]}, {"$size": [1.5]}, {"$size": 7},
    {"$t": [1]}, {"$np": {"a": 1}}, {"$namespace": [1, 2]}, {"$namespace": {"$dict": [[1, 2]]}},
    {"$enum": 5}, {"$repr": 5}, {"$tuple": 5}, {"$set": 5}, {"$dict": 5}, {"$dict": [[{"a": 1}, 2]]},
    {"$bytes": 5}, {"$bytes": "é"}, {"$path": 5}, {"$device": ["cpu"]}, {"$dtype": ["float32"]},
    {"$float": [1]}, {"$evil": 1},
]


@pytest.mark.parametrize("value", HOSTILE, ids=[json.dumps(v)[:40] for v in HOSTILE])
def test_a_hostile_state_value_is_corrupt_and_never_built(value):
    with pytest.raises(CheckpointCorruptError, match="malformed"):
        decode({"loops": {"x": json.loads(json.dumps(value))}}, lambda k: torch.zeros(1))


def test_a_tensor_named_many_times_is_read_once():
    calls = []
    doc = {"a": [{"$t": "state_dict/frozen"}] * 500, "b": {"$np": "state_dict/frozen"}}
    got = decode(doc, lambda k: calls.append(k) or torch.zeros(3))
    assert calls == ["state_dict/frozen"] and all(t is got["a"][0] for t in got["a"])


@pytest.mark.parametrize("raw", [
    json.dumps({"global_step": 1, "loops": [{"$npscalar": ["V8", 2147483647]}] * 300}).encode(),  # 10 KB, 600 GiB
    b'{"global_step": ' + b"1" * 5000 + b"}",  # Python refuses to convert it (ValueError)
    json.dumps({"loops": {"$size": [float("inf")]}}).encode(),
], ids=["void-bomb", "long-int", "inf-size"])
def test_verify_load_and_latest_skip_a_state_that_decodes_badly(tmp_path, raw):
    good, bad = _run(tmp_path / "run")
    with open(os.path.join(bad, STATE), "wb") as f:
        f.write(raw)
    m = json.loads(open(os.path.join(bad, mf.MANIFEST), "rb").read())
    m["files"][STATE].update(size=len(raw), header_end=len(raw), header_crc32c=crc32c(raw))
    with open(os.path.join(bad, mf.MANIFEST), "wb") as f:
        f.write(mf.dumps(m))
    for read in (lambda: verify_checkpoint(bad), lambda: load_checkpoint(bad)):
        with pytest.raises(CheckpointCorruptError):
            read()
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint"):
        assert latest_checkpoint(tmp_path / "run") == good  # resume="auto" goes on from the one before


def test_a_state_that_would_build_more_python_objects_than_the_budget_is_refused_before_parsing(monkeypatch):
    from lightning_ckpt.format import codec

    raw = b"[" + b"{}," * 100_000 + b"0]"  # 300 KB of text, about 7 MB of Python objects
    assert 6 << 20 < codec.json_memory(raw) < 20 << 20
    monkeypatch.setattr(codec, "MAX_STATE_MEMORY", 4 << 20)  # the real bound (2 GiB) needs a 70 MB file
    monkeypatch.setattr(codec.json, "loads", lambda *a, **k: pytest.fail("parsed before the budget was checked"))
    with pytest.raises(CheckpointCorruptError, match="MiB of Python objects"):
        codec.parse_state(raw, "state.json")


# ------------------------------------------------------------------------------------------------ 5. the terminal
def test_an_entry_name_with_a_control_character_is_refused_when_written(tmp_path):
    """The writer's rule matches the reader's: a name the listing would never show ("step\n") is not written."""
    with pytest.raises(ValueError, match="control character"):
        LocalStore(tmp_path).begin("step=000001\n")


def test_warnings_and_log_messages_of_a_verb_reach_stderr_escaped(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # printed as in a shell (pytest records warnings otherwise)
        warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(m, c, f, n, line))
        with escaped_diagnostics():
            warnings.warn("skipping x\x1b[2J\ny")
            logging.getLogger("lightning_ckpt").warning("removed p\rq")
    err = capsys.readouterr().err
    assert err.splitlines() == ["lightning-ckpt: warning: skipping x\\x1b[2J\\ny", "lightning-ckpt: removed p\\rq"]
    assert warnings.formatwarning is not None and "lightning-ckpt" not in warnings.formatwarning("m", UserWarning, "f", 1)


EVIL = "\x1b[2J\x1b[31mowned\x07\r\nfake line\u202e"


def test_recorded_text_reaches_the_terminal_escaped(tmp_path):
    run = tmp_path / "run"
    a, b = _run(run, tags=[f"tag{EVIL}"], metrics={f"loss{EVIL}": 0.5}, hparams={f"lr{EVIL}": f"v{EVIL}"},
                meta={"lineage": {"run": f"r{EVIL}", "run_name": f"n{EVIL}", "parent": None, "branch": False}})
    outputs = [_cli(argv) for argv in (["ls", run], ["show", b], ["diff", a, b], ["lineage", run], ["verify", a, b],
                                       ["prune", run, "--keep-last", "1", "--dry-run"])]
    for code, out, err in outputs:
        assert code == 0, err
        text = out + err
        assert not any(c in text for c in "\x1b\x07\r\u202e"), text
        assert not any(line.startswith("fake line") for line in text.splitlines()), text
    show = outputs[1][1]
    assert f"tag{shown(EVIL)}" in show and f"lr{shown(EVIL)} = v{shown(EVIL)}" in show
    assert shown("a\x1b[0m\nb\ud800") == "a\\x1b[0m\\nb\\ud800"
    code, out, _ = _cli(["ls", run, "--json"])
    assert json.loads(out)[0]["tags"] == [f"tag{EVIL}"]  # --json keeps the value, escaped by JSON itself
