"""Deleting checkpoints safely: rename out of the listing first (atomic), then remove the files."""
from __future__ import annotations

import json
import os
import uuid

from .format import manifest as mf
from .storage.local import remove_tree


def committed_records(where: str) -> list:
    """Retention records (:class:`~lightning_ckpt.policy.retention.Record`) of the committed checkpoints of a folder
    or of an ``s3://`` location."""
    from .checkpoints import list_checkpoints
    from .policy.retention import Record

    return [
        Record(c.name, c.step, c.size_bytes, dict(c.metrics), tuple(c.tags), c.created_unix or 0.0)
        for c in list_checkpoints(where)
    ]


def remove_checkpoint(path: str) -> None:
    """Delete a committed checkpoint: it disappears from listings atomically, then its files are removed."""
    parent, name = os.path.split(os.path.normpath(path))
    trash = os.path.join(parent, f"{mf.TRASH_PREFIX}{name}-{uuid.uuid4().hex[:6]}")
    os.rename(path, trash)
    remove_tree(trash)


def remove_partials(dirpath: str, dry_run: bool = False) -> list[str]:
    """Folders of interrupted saves or deletions in ``dirpath``."""
    found = [os.path.join(dirpath, e) for e in sorted(os.listdir(dirpath)) if e.startswith((mf.PARTIAL_PREFIX, mf.TRASH_PREFIX))]
    if not dry_run:
        for p in found:
            remove_tree(p)
    return found


def failed_run_ids(dirpath: str) -> set[str]:
    """Runs recorded as ended in an exception (``<dirpath>/.runs/<run_id>.json``)."""
    d = os.path.join(dirpath, ".runs")
    out: set[str] = set()
    if not os.path.isdir(d):
        return out
    for e in os.listdir(d):
        try:
            with open(os.path.join(d, e)) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and rec.get("status") == "failed" and isinstance(rec.get("run_id"), str):
            out.add(rec["run_id"])
    return out
