"""A checkpoint folder as one Lightning ``.ckpt`` file, for tools that only read those.

The file is what Lightning's ``ModelCheckpoint`` would have written for the same state (``torch.save`` of the
checkpoint dictionary), restricted to what ``torch.load(weights_only=True)`` accepts: tensors, numbers, strings,
lists, tuples and dicts. This package's own entry (RNG states, including numpy's, which ``weights_only`` refuses) is
left out, as are values of other types (the hyper-parameters' class, enums, paths, namespaces become plain values).
``LightningModule.load_from_checkpoint`` and ``Trainer.fit(ckpt_path=...)`` read the result.
"""
from __future__ import annotations

import argparse
import enum
import os
import pathlib
from typing import Any

import numpy as np
import torch

from ..load import load_checkpoint
from ..format.manifest import STATE_KEY
from ..store import LocalStore

_LIGHTNING_TYPE_KEY = "hparams_type"  # Lightning stores the hyper-parameters' class here; dict-like without it


def plain(x: Any) -> Any:
    """``x`` made of what ``torch.load(weights_only=True)`` reads: tensors, numbers, strings, None, lists, tuples,
    dicts (dict subclasses become dicts)."""
    if isinstance(x, torch.Tensor):
        return x
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, enum.Enum):
        return plain(x.value)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (pathlib.PurePath, torch.dtype, torch.device)):
        return str(x)
    if isinstance(x, argparse.Namespace):
        return plain(vars(x))
    if isinstance(x, dict):
        return {plain(k): plain(v) for k, v in x.items()}
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(plain(v) for v in x)
    if isinstance(x, (list, tuple, set, frozenset)):
        return [plain(v) for v in x]
    if isinstance(x, (bytes, bytearray)):
        return torch.frombuffer(bytearray(x), dtype=torch.uint8) if x else torch.empty(0, dtype=torch.uint8)
    return str(x)


def convert_to_lightning(path: Any, out: Any) -> str:
    """Write the checkpoint at ``path`` (a folder or ``s3://`` URI) as a Lightning ``.ckpt`` file ``out`` (replaced
    atomically); returns its path. The file is checked to load with ``torch.load(weights_only=True)``."""
    ckpt = load_checkpoint(path)
    ckpt.pop(STATE_KEY, None)
    ckpt.pop(_LIGHTNING_TYPE_KEY, None)
    ckpt = plain(ckpt)
    out = os.path.abspath(os.fspath(out))
    if os.path.isdir(out):
        raise ValueError(f"{out} is a folder; give the .ckpt file to write, e.g. {os.path.join(out, 'model.ckpt')}")
    store = LocalStore(os.path.dirname(out))
    with store.replacing(os.path.basename(out)) as tmp:
        torch.save(ckpt, tmp)
        torch.load(tmp, map_location="cpu", weights_only=True)  # what a strict reader will do
    return out
