"""Post-training export: one folder with everything needed to use and reproduce the trained model.

    <out_dir>/
      model.safetensors            consolidated weights (clean names), + model.safetensors.checksums.json
      metrics.json                 the metrics recorded with the exported checkpoint
      metrics.jsonl                the run's metric history (one line per committed checkpoint), when there is one
      config.yaml                  the resolved LightningCLI configuration, when there is one
      metadata.json                source checkpoint, step, seeds, versions, git commit, host, data fingerprint
      MODEL_CARD.md                a short model card
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Optional

from ..read import read_checkpoint_manifest
from ..store import LocalStore, folder_key
from ..folder.history import HISTORY
from ..errors import CheckpointError
from ..store.fs import OPS, read_member
from .merge import merge_checkpoint

log = logging.getLogger("lightning_ckpt")
MAX_HISTORY_BYTES = 256 << 20  # the run history (folder/history.py) copied alongside


def data_fingerprint(datamodule: Any) -> Optional[str]:
    """A fingerprint of the data: ``datamodule.fingerprint()`` when it has one, else a hash of its class and hparams."""
    if datamodule is None:
        return None
    fp = getattr(datamodule, "fingerprint", None)
    if callable(fp):
        return str(fp())
    hp = getattr(datamodule, "hparams", None)
    payload = json.dumps({"class": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
                          "hparams": dict(hp) if hp else {}}, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()[:32]


def export_checkpoint(
    path: str,
    out_dir: str,
    *,
    config_yaml: Optional[str] = None,
    data_fp: Optional[str] = None,
    dtype: Optional[str] = None,
    history: Optional[str] = None,
) -> str:
    """Write the export folder for the checkpoint at ``path`` into ``out_dir`` (an earlier export there is replaced
    atomically; a failed export leaves it as it was). Returns it.

    Args:
        path: a checkpoint folder with model weights.
        out_dir: the export folder.
        config_yaml: the resolved configuration as YAML text (LightningCLI's), if any.
        data_fp: a fingerprint of the training data (see :func:`data_fingerprint`).
        dtype: convert floating-point weights (``"bf16"``, ``"fp16"``); ``None`` keeps them.
        history: a ``metrics.jsonl`` to copy alongside.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    m = read_checkpoint_manifest(path)
    parent = LocalStore(os.path.dirname(out_dir))
    parent.makedirs()
    tx = parent.begin(os.path.basename(out_dir)).open()
    try:
        res = merge_checkpoint(path, tx.file("model.safetensors"), dtype=dtype)
        metrics = m.get("metrics") or {}
        files: dict[str, bytes] = {"metrics.json": json.dumps(metrics, indent=1).encode()}
        if history and os.path.isfile(history):  # a regular file, never through a link, never a FIFO; bounded
            try:
                files[HISTORY] = read_member(os.path.dirname(os.path.abspath(history)),
                                                     os.path.basename(history), MAX_HISTORY_BYTES, follow_folder=True)
            except CheckpointError as e:
                log.warning("lightning_ckpt: the export of %s leaves out %s: %s", path, history, e)
        if config_yaml:
            files["config.yaml"] = config_yaml.encode()
        run = m.get("run") or {}
        meta = {
            "source_checkpoint": folder_key(path),
            "name": m.get("name"),
            "step": m.get("step"),
            "epoch": m.get("epoch"),
            "tags": m.get("tags"),
            "seed": run.get("seed"),
            "versions": run.get("versions"),
            "git_commit": run.get("git_commit"),
            "host": run.get("host"),
            "argv": run.get("argv"),
            "data_fingerprint": data_fp,
            "hparams": m.get("hparams"),
            "exported_unix": time.time(),
            "weights": {"file": "model.safetensors", "tensors": res.tensors, "bytes": res.bytes, "dtype": dtype or "as trained"},
        }
        files["metadata.json"] = json.dumps(meta, indent=1, default=str).encode()
        files["MODEL_CARD.md"] = _model_card(meta, metrics, bool(config_yaml)).encode()
        for fname, data in files.items():
            OPS.write_file(tx.file(fname), data, fsync=parent.fsync)
        tx.commit(None, if_exists="replace")  # an earlier export of the folder is swapped out atomically
    except BaseException:
        tx.abort()
        raise
    return out_dir


def _model_card(meta: dict, metrics: dict, has_config: bool) -> str:
    lines = [
        "# Model card",
        "",
        f"Exported from checkpoint `{meta['name']}` (step {meta['step']}, epoch {meta['epoch']}, tags: "
        f"{', '.join(meta.get('tags') or []) or '-'}).",
        "",
        "## Metrics",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for k, v in sorted(metrics.items()):
        lines.append(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |")
    if not metrics:
        lines.append("| (none recorded) | |")
    lines += ["", "## Hyperparameters", ""]
    for k, v in sorted((meta.get("hparams") or {}).items()):
        lines.append(f"- `{k}`: {v}")
    vers = meta.get("versions") or {}
    lines += [
        "",
        "## Reproduce",
        "",
        f"- seed: {meta.get('seed')}",
        f"- git commit: {meta.get('git_commit') or 'unknown'}",
        f"- data fingerprint: {meta.get('data_fingerprint') or 'unknown'}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in vers.items())}",
        f"- configuration: {'config.yaml' if has_config else 'not recorded (not run through LightningCLI)'}",
        "",
        "## Use",
        "",
        "```python",
        "from safetensors.torch import load_file",
        "model.load_state_dict(load_file(\"model.safetensors\"))",
        "```",
        "",
    ]
    return "\n".join(lines)


def export_hf(path: Any, out_dir: Any, model: Any, *, prefix: Optional[str] = None) -> str:
    """Write the checkpoint at ``path`` as a Hugging Face model folder (``save_pretrained`` layout: ``config.json`` and
    ``model.safetensors``), for a LightningModule that holds a ``transformers`` model.

    ``model`` is a ``transformers.PreTrainedModel`` of the run's architecture (say ``module.model``, or one built from
    the same config); its weights are read from the checkpoint (verified) under ``prefix``, the module attribute that
    holds it (``"model."``; found by itself when ``None``), then ``model.save_pretrained`` writes the folder, which
    replaces ``out_dir`` atomically. Returns ``out_dir``."""
    from ..errors import CheckpointMismatchError
    from ..load import load_tensors
    from ..read import open_checkpoint
    from ..store.fs import OPS

    ck = open_checkpoint(path)
    m = ck.m
    names = [k[len("state_dict/"):] for k in m.get("tensors", {}) if k.startswith("state_dict/") and k.count("/") == 1]
    wanted = list(model.state_dict())
    if prefix is None:
        votes: dict[str, int] = {}
        for n in names:
            for t in wanted:
                if n.endswith(t) and (len(n) == len(t) or n[-len(t) - 1] == "."):
                    votes[n[: len(n) - len(t)]] = votes.get(n[: len(n) - len(t)], 0) + 1
        prefix = max(votes, key=lambda p: (votes[p], -len(p)), default="")
    missing = [t for t in wanted if prefix + t not in names]
    if missing:
        raise CheckpointMismatchError(
            f"{path} has no weights for {len(missing)} of the model's tensors under the prefix {prefix!r} (first: "
            f"{missing[0]!r}); pass the prefix of the attribute that holds the model, e.g. prefix='model.'")
    tensors = load_tensors(ck, [f"state_dict/{prefix}{t}" for t in wanted])
    try:
        model.load_state_dict({t: tensors[f"state_dict/{prefix}{t}"] for t in wanted}, strict=True)
    except RuntimeError as e:
        raise CheckpointMismatchError(f"{path} does not fit the given model: {e}") from None
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = LocalStore(os.path.dirname(out_dir))
    parent.makedirs()
    tx = parent.begin(os.path.basename(out_dir)).open()
    try:
        model.save_pretrained(tx.path, safe_serialization=True)
        for fname in os.listdir(tx.path):
            OPS.fsync_file(os.path.join(tx.path, fname))
        tx.commit(None, if_exists="replace")
    except BaseException:
        tx.abort()
        raise
    return out_dir
