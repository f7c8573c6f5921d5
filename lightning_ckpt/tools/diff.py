"""Compare two checkpoints: metric changes, and for every tensor whether it changed and by how much.

Which tensors changed is known from the manifests alone: the same stored tensor (deduplicated checkpoints reference
one pack), or equal content hashes (XXH3-128) and checksums, mean unchanged; a different checksum or hash means
changed. Only to say *by how much* are the changed tensors read, one at a time (verified), so memory stays at about
two tensors; ``values=False`` reads nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..format.manifest import chunk_record
from ..read import open_checkpoint


@dataclass
class TensorDiff:
    key: str
    status: str  # "same", "changed", "only in A", "only in B", "shape", "dtype"
    max_abs_diff: Optional[float] = None
    shape_a: Optional[list] = None
    shape_b: Optional[list] = None


@dataclass
class CheckpointDiff:
    a: str
    b: str
    step_a: int
    step_b: int
    metrics: dict = field(default_factory=dict)  # name -> (value in A, value in B)
    tensors: list = field(default_factory=list)

    @property
    def changed(self) -> list:
        return [t for t in self.tensors if t.status != "same"]


def _identity(m: dict, entry: dict) -> list:
    """Per chunk: where it is stored when in a pack (the same pack tensor is the same bytes), else its checksum and
    content hash."""
    out = []
    for c in entry["chunks"]:
        rec = chunk_record(m, c)
        out.append((rec["crc32c"], rec.get("xxh128"), c.get("pack"), c["name"] if "pack" in c else None))
    return out


def _same(ia: list, ib: list) -> bool:
    for (crc_a, h_a, p_a, n_a), (crc_b, h_b, p_b, n_b) in zip(ia, ib):
        if p_a is not None and (p_a, n_a) == (p_b, n_b):
            continue
        if crc_a != crc_b or (h_a and h_b and h_a != h_b):
            return False
    return len(ia) == len(ib)


def diff_checkpoints(a: str, b: str, *, prefix: Optional[str] = None, values: bool = True) -> CheckpointDiff:
    """Differences between checkpoints ``a`` and ``b`` (``prefix``: only tensors whose key starts with it, e.g.
    ``"state_dict/"`` for the model). ``values=False``: decide from the manifests only (changed tensors then have no
    ``max_abs_diff``)."""
    ca, cb = open_checkpoint(a), open_checkpoint(b)
    ma, mb = ca.m, cb.m
    out = CheckpointDiff(str(a), str(b), ma["step"], mb["step"])
    for k in sorted(set(ma.get("metrics") or {}) | set(mb.get("metrics") or {})):
        out.metrics[k] = ((ma.get("metrics") or {}).get(k), (mb.get("metrics") or {}).get(k))
    ta, tb = ma.get("tensors", {}), mb.get("tensors", {})
    keys = sorted(set(ta) | set(tb))
    if prefix:
        keys = [k for k in keys if k.startswith(prefix)]
    for k in keys:
        if k not in tb:
            out.tensors.append(TensorDiff(k, "only in A", shape_a=ta[k]["shape"]))
            continue
        if k not in ta:
            out.tensors.append(TensorDiff(k, "only in B", shape_b=tb[k]["shape"]))
            continue
        ea, eb = ta[k], tb[k]
        if ea["shape"] != eb["shape"]:
            out.tensors.append(TensorDiff(k, "shape", shape_a=ea["shape"], shape_b=eb["shape"]))
            continue
        if ea["dtype"] != eb["dtype"]:
            out.tensors.append(TensorDiff(k, "dtype", shape_a=ea["shape"], shape_b=eb["shape"]))
            continue
        same_layout = [(c["offsets"], c["sizes"]) for c in ea["chunks"]] == [(c["offsets"], c["sizes"]) for c in eb["chunks"]]
        if same_layout and _same(_identity(ma, ea), _identity(mb, eb)):
            out.tensors.append(TensorDiff(k, "same", 0.0, ea["shape"], eb["shape"]))
            continue
        if same_layout and not values:
            out.tensors.append(TensorDiff(k, "changed", None, ea["shape"], eb["shape"]))
            continue
        from ..load import load_tensors  # DCP's import is heavy: only when a tensor must be read

        xa = load_tensors(ca, [k])[k]
        xb = load_tensors(cb, [k])[k]
        if torch.equal(xa, xb):
            out.tensors.append(TensorDiff(k, "same", 0.0, ea["shape"], eb["shape"]))
            continue
        if xa.is_floating_point() or xa.is_complex():
            d = (xa.double() - xb.double()).abs().max().item() if xa.numel() else 0.0
        elif xa.dtype == torch.bool:
            d = float((xa != xb).sum().item())
        else:
            d = (xa.long() - xb.long()).abs().max().item() if xa.numel() else 0
        out.tensors.append(TensorDiff(k, "changed", float(d), ea["shape"], eb["shape"]))
    return out


def format_metric_change(va, vb) -> str:
    if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool):
        delta = vb - va
        rel = f" ({delta / abs(va) * 100:+.1f}%)" if va not in (0, 0.0) and math.isfinite(va) else ""
        return f"{va:.6g} -> {vb:.6g}  {delta:+.4g}{rel}"
    return f"{va} -> {vb}"
