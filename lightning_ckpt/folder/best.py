"""Which checkpoints of a folder are the best now, from the manifests alone (no Lightning).

A checkpoint is tagged ``best`` when it entered the top-k of a ranking callback (``BestMetricCheckpoint``,
``EarlyStopAndSave``), and its manifest records that callback's rule (``best_rule``: monitor, mode, top_k). Tags are
final once committed, so a checkpoint that later fell out of the top-k but is kept for another reason (the newest,
a milestone) still carries the tag: the current best are computed here, by ranking the tagged checkpoints by the
rule's metric and keeping its top-k.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from ..read import ANY_RUN, CheckpointInfo, list_checkpoints, of_run


def best_rule(ckpts: list[CheckpointInfo]) -> Optional[dict]:
    """The ranking rule recorded by the newest checkpoint that has one (``{"monitor", "mode", "top_k"}``)."""
    for c in reversed(ckpts):
        rules = c.summary.get("best_rule")
        if isinstance(rules, list) and rules and isinstance(rules[0], dict) and isinstance(rules[0].get("monitor"), str):
            return rules[0]
    return None


def rank_best(ckpts: list[CheckpointInfo], monitor: Optional[str] = None, mode: Optional[str] = None,
              top_k: Optional[int] = None) -> list[CheckpointInfo]:
    """The checkpoints tagged ``best`` ranked by ``monitor`` (best first; newest first on ties), at most ``top_k``
    (-1 or None: all). Without ``monitor`` the recorded rule is used; without any rule, nothing is ranked."""
    if monitor is None:
        rule = best_rule(ckpts)
        if rule is None:
            return []
        monitor, mode = rule["monitor"], rule.get("mode", "min")
        top_k = rule.get("top_k") if top_k is None else top_k
    sign = -1.0 if mode == "max" else 1.0
    scored = []
    for c in ckpts:
        v = c.metrics.get(monitor)
        if "best" in c.tags and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            scored.append((sign * float(v), -c.step, c))
    scored.sort(key=lambda x: (x[0], x[1]))
    out = [c for _, _, c in scored]
    return out if not isinstance(top_k, int) or top_k < 0 else out[:top_k]


def best_checkpoints(dirpath: Any, *, monitor: Optional[str] = None, mode: Optional[str] = None,
                     run_name: Any = ANY_RUN) -> list[CheckpointInfo]:
    """The current best checkpoints of ``dirpath`` (of one run, in a folder several runs share), best first."""
    return rank_best(of_run(list_checkpoints(dirpath), run_name), monitor, mode)
