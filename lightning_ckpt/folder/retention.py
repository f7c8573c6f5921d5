"""Retention over a folder's committed records: the records of listed checkpoints (a pack of the content store that
several checkpoints share counts once) and the plan of what no rule set keeps."""
from __future__ import annotations

from typing import Any

from ..policy.retention import Record, RetentionRules, plan_retention
from ..read import ANY_RUN, list_checkpoints, of_run


def committed_records(where: Any, run_name: Any = ANY_RUN) -> list[Record]:
    """Retention records of the committed checkpoints of a folder or of an ``s3://`` location (``run_name``: of that
    run only, in a folder several runs share). A pack of the content store that several checkpoints share counts once,
    in the size of the oldest of them."""
    return records_of(of_run(list_checkpoints(where), run_name))


def records_of(ckpts: list) -> list[Record]:
    """Retention records of listed checkpoints (``CheckpointInfo``, oldest first); a shared pack counts once."""
    out, counted = [], set()
    for c in ckpts:
        rec = c.__dict__.get("_record")  # made once per listed checkpoint (a run's folder is listed from memory)
        packs = c.summary.get("packs")
        if not packs:
            if rec is None:
                rec = c.__dict__["_record"] = Record(c.name, c.step, c.size_bytes, dict(c.metrics), tuple(c.tags),
                                                     c.created_unix or 0.0)
            out.append(rec)
            continue
        size = c.size_bytes + sum(int(e["size"]) for n, e in packs.items() if n not in counted)
        counted.update(packs)
        if rec is None or rec.size_bytes != size:
            rec = c.__dict__["_record"] = Record(c.name, c.step, size, dict(c.metrics), tuple(c.tags),
                                                 c.created_unix or 0.0)
        out.append(rec)
    return out


def plan_deletions(records: list[Record], rule_sets: list[RetentionRules], protected: set[str] = frozenset()) -> list[str]:
    """Names no rule set keeps (a checkpoint stays when any rule of any set keeps it). Raises ValueError (from
    ``plan_retention``) when a set ranks by a metric no checkpoint recorded."""
    keep = [False] * len(records)
    for rules in rule_sets:
        keep = [a or b for a, b in zip(keep, plan_retention(records, rules, protected))]
    return [r.name for r, k in zip(records, keep) if not k]
