"""Tracking to real loggers, metrics history, diff, export (with MLflow's file store)."""
from __future__ import annotations

import csv
import glob
import json
import os

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import load_file

from lightning_ckpt import (
    BestMetricCheckpoint,
    ExportOnTrainEnd,
    PeriodicCheckpoint,
    diff_checkpoints,
    list_checkpoints,
    load_checkpoint,
)
from lightning_ckpt.cli import main

from support import fit


def _fit_logged(tmp_path, callbacks, loggers=False, max_steps=8):
    """8 steps of the demo model, validated every 4, every step logged to ``loggers``."""
    return fit(callbacks, val_every=4, max_steps=max_steps, logger=loggers, log_every_n_steps=1,
               default_root_dir=str(tmp_path))


def test_saves_reported_to_csv_logger_and_metrics_history(tmp_path):
    d = str(tmp_path / "ckpts")
    logger = CSVLogger(str(tmp_path / "logs"), name="run")
    _fit_logged(tmp_path, [PeriodicCheckpoint(d, every_n_train_steps=2, save_on_train_end=False)], loggers=logger)
    rows = list(csv.DictReader(open(os.path.join(logger.log_dir, "metrics.csv"))))
    ck_rows = [r for r in rows if r.get("checkpoint/bytes")]
    assert [int(float(r["checkpoint/step"])) for r in ck_rows] == [2, 4, 6, 8]
    for r in ck_rows:
        assert float(r["checkpoint/bytes"]) > 0 and float(r["checkpoint/write_s"]) > 0
        assert float(r["checkpoint/stall_s"]) > 0 and float(r["checkpoint/throughput_gbps"]) > 0
    history = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
    assert [h["step"] for h in history] == [2, 4, 6, 8]
    assert "train_loss" in history[-1]["metrics"] and "val_loss" in history[-1]["metrics"]


def test_diff_reports_metric_changes_and_tensor_differences(tmp_path, capsys):
    d = str(tmp_path / "ckpts")
    _fit_logged(tmp_path, [PeriodicCheckpoint(d, every_n_train_steps=4, save_on_train_end=False)])
    a, b = [c.path for c in list_checkpoints(d)]
    res = diff_checkpoints(a, b)
    assert res.step_a == 4 and res.step_b == 8
    assert res.metrics["train_loss"][0] != res.metrics["train_loss"][1]
    by_key = {t.key: t for t in res.tensors}
    w = by_key["state_dict/net.0.weight"]
    ck_a, ck_b = load_checkpoint(a), load_checkpoint(b)
    expected = (ck_a["state_dict"]["net.0.weight"] - ck_b["state_dict"]["net.0.weight"]).abs().max().item()
    assert w.status == "changed" and w.max_abs_diff == pytest.approx(expected)
    assert all(t.status == "same" for t in diff_checkpoints(a, a).tensors)
    assert main(["diff", a, b, "--model-only"]) == 0
    out = capsys.readouterr().out
    assert "train_loss" in out and "changed    state_dict/net.0.weight" in out and "max |A-B|" in out
    assert main(["diff", a, b, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step_b"] == 8


def test_ls_verify_column(tmp_path, capsys):
    d = str(tmp_path / "ckpts")
    _fit_logged(tmp_path, [PeriodicCheckpoint(d, every_n_train_steps=4, save_on_train_end=False)])
    assert main(["ls", d, "--verify"]) == 0
    assert capsys.readouterr().out.count(" ok") == 2
    f = os.path.join(list_checkpoints(d)[0].path, "optim-rank00000.safetensors")
    data = bytearray(open(f, "rb").read())
    data[-1] ^= 0xFF
    open(f, "wb").write(bytes(data))
    assert main(["ls", d, "--verify"]) == 1
    assert "CORRUPT" in capsys.readouterr().out


def test_export_on_train_end_with_mlflow_artifact(tmp_path, monkeypatch):
    import mlflow
    from lightning.pytorch.loggers import MLFlowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's file store: no server

    d = str(tmp_path / "ckpts")
    uri = f"file:{tmp_path / 'mlruns'}"
    logger = MLFlowLogger(experiment_name="lc", tracking_uri=uri)
    best = BestMetricCheckpoint(d, monitor="val_loss")
    _fit_logged(tmp_path, [PeriodicCheckpoint(d, every_n_train_steps=4), best, ExportOnTrainEnd(d)], loggers=logger)
    exp = os.path.join(d, "export")
    for name in ("model.safetensors", "model.safetensors.checksums.json", "metrics.json", "metrics.jsonl",
                 "metadata.json", "MODEL_CARD.md"):
        assert os.path.isfile(os.path.join(exp, name)), name
    weights = load_file(os.path.join(exp, "model.safetensors"))
    best_sd = load_checkpoint(best.best_model_path)["state_dict"]
    assert weights.keys() == best_sd.keys() and all(torch.equal(weights[k], best_sd[k]) for k in best_sd)
    meta = json.load(open(os.path.join(exp, "metadata.json")))
    assert meta["step"] == list_checkpoints(d)[-1].step or meta["name"] == os.path.basename(best.best_model_path)
    assert meta["versions"]["torch"] == torch.__version__ and meta["data_fingerprint"].startswith("sha256:")
    assert "val_loss" in open(os.path.join(exp, "MODEL_CARD.md")).read()
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    arts = {a.path for a in client.list_artifacts(logger.run_id, "export")}
    assert "export/model.safetensors" in arts and "export/MODEL_CARD.md" in arts
    hist = client.get_metric_history(logger.run_id, "checkpoint/bytes")
    assert len(hist) >= 2 and all(m.value > 0 for m in hist)


def test_saves_reported_to_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d = str(tmp_path / "ckpts")
    logger = TensorBoardLogger(str(tmp_path / "tb"), name="run")
    _fit_logged(tmp_path, [PeriodicCheckpoint(d, every_n_train_steps=4, save_on_train_end=False)], loggers=logger)
    (events,) = glob.glob(os.path.join(logger.log_dir, "events.out.tfevents.*"))
    acc = EventAccumulator(events)
    acc.Reload()
    for tag in ("checkpoint/bytes", "checkpoint/stall_s", "checkpoint/write_s", "checkpoint/throughput_gbps"):
        assert [e.step for e in acc.Scalars(tag)] == [4, 8], tag
