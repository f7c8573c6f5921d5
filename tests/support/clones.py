"""Many committed checkpoints, fast: copies of one real checkpoint (its files hard-linked, where the filesystem
allows) under new names, each with its own manifest (step, commit time, run name; a valid digest), so that every
copy lists, reads and verifies like a checkpoint the writer committed. For the scale tests and the folder benchmark
(``benchmarks/_scale_folders.py``)."""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Iterable, Optional

from lightning_ckpt.format import manifest as mf


def manifest_for(template: dict, step: int, run_name: Optional[str] = None, created: Optional[float] = None) -> bytes:
    """The bytes of ``template``'s manifest as checkpoint ``step`` of ``run_name`` (committed at ``created``)."""
    m = json.loads(json.dumps(template))
    m["step"] = step
    m["created_unix"] = time.time() if created is None else created
    lin = dict(m.get("lineage") or {"run": "clones", "parent": None, "branch": False})
    lin["run_name"] = run_name
    m["lineage"] = lin
    return mf.dumps(m)


def clone(src: str, folder: str, steps: Iterable[int], *, run_name: Optional[str] = None,
          name: str = "step={step:06d}") -> list[str]:
    """Copy the checkpoint at ``src`` into ``folder`` once per step (named by ``name``); returns the new paths.
    Committed like the writer does: written under a partial name, then renamed."""
    with open(os.path.join(src, mf.MANIFEST), "rb") as f:
        template = json.loads(f.read())
    files = [f for f in os.listdir(src) if f != mf.MANIFEST]
    os.makedirs(folder, exist_ok=True)
    out = []
    t0 = time.time()
    for i, step in enumerate(steps):
        dst = os.path.join(folder, name.format(step=step))
        tmp = os.path.join(folder, f".partial-clone~x.0~{step}")
        os.makedirs(tmp)
        for fname in files:
            try:
                os.link(os.path.join(src, fname), os.path.join(tmp, fname))
            except OSError:
                shutil.copyfile(os.path.join(src, fname), os.path.join(tmp, fname))
        with open(os.path.join(tmp, mf.MANIFEST), "wb") as f:
            f.write(manifest_for(template, step, run_name, t0 + i * 1e-3))
        os.rename(tmp, dst)
        out.append(dst)
    return out
