"""The `lightning-ckpt` console script: ls, show, verify."""
from __future__ import annotations

import json
import os

import pytest
import torch

from lightning_ckpt import CheckpointWriter
from lightning_ckpt.cli import main

from support import run_python


def _make(tmp_path, steps=(5, 10)):
    w = CheckpointWriter(str(tmp_path), async_save=False)
    for s in steps:
        w.save({"state_dict": {"w": torch.full((4, 4), float(s))}, "global_step": s}, step=s, epoch=0,
               tags=["periodic"], metrics={"loss": 1.0 / s})
    w.close()
    return [os.path.join(str(tmp_path), f"step={s:06d}") for s in steps]


def test_ls_table_and_json(tmp_path, capsys):
    _make(tmp_path)
    assert main(["ls", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step=000005" in out and "step=000010" in out and "loss=0.1" in out and "periodic" in out
    assert main(["ls", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in rows] == [5, 10]


def test_show(tmp_path, capsys):
    paths = _make(tmp_path)
    assert main(["show", paths[1]]) == 0
    out = capsys.readouterr().out
    assert "step         10" in out and "model-rank00000.safetensors" in out and "loss" in out
    assert main(["show", paths[1], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 10


def test_verify_ok_and_corrupt_exit_codes(tmp_path, capsys):
    paths = _make(tmp_path)
    assert main(["verify", *paths]) == 0
    assert capsys.readouterr().out.count("OK") == 2
    f = os.path.join(paths[0], "model-rank00000.safetensors")
    data = bytearray(open(f, "rb").read())
    data[-3] ^= 0x10
    open(f, "wb").write(bytes(data))
    assert main(["verify", *paths]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.err and "checksum mismatch" in captured.err and "OK" in captured.out
    assert main(["verify", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.usefixtures("forkserver")
def test_console_script_entry_point(tmp_path):
    _make(tmp_path, steps=(3,))
    p = run_python(["-m", "lightning_ckpt.cli", "ls", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 0 and "step=000003" in p.stdout


def test_json_output_for_scripts(tmp_path, capsys):
    paths = _make(tmp_path, steps=(1, 2, 3))
    assert main(["verify", *paths, "--json"]) == 0
    assert [r["ok"] for r in json.loads(capsys.readouterr().out)] == [True, True, True]
    assert main(["merge", paths[-1], str(tmp_path / "m" / "model.safetensors"), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"] == 1
    assert main(["prune", str(tmp_path), "--keep-last", "1", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [os.path.basename(d["path"]) for d in rep["deleted"]] == ["step=000001", "step=000002"]
    assert [os.path.basename(p) for p in rep["kept"]] == ["step=000003"]


def test_help_imports_neither_torch_nor_lightning_and_reading_verbs_no_lightning(tmp_path):
    """`--help` answers at once (no torch, no Lightning: about 1 s of imports on the CI machine); ls, show, verify,
    diff and lineage read checkpoints with torch but never import Lightning (a cold interpreter, as a user runs it)."""
    import subprocess
    import sys

    a, b = _make(tmp_path)
    code = ("import sys, contextlib, io; from lightning_ckpt.cli import main\n"
            "for argv in {argvs!r}:\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try: main(argv)\n"
            "        except SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'lightning', 'pytorch_lightning') if m in sys.modules))")

    def imported(*argvs):
        out = subprocess.run([sys.executable, "-c", code.format(argvs=list(argvs))], capture_output=True, text=True,
                             check=True).stdout
        return out.strip().splitlines()[-1]

    assert imported(["--help"]) == "[]"
    assert imported(["ls", str(tmp_path)], ["show", a], ["verify", a], ["diff", a, b],
                    ["lineage", str(tmp_path)]) == "['torch']"
