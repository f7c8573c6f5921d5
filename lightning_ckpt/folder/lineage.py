"""The tree of runs and checkpoints of a folder: ``lightning-ckpt lineage DIR``.

Every checkpoint records its run and where that run came from (``lineage`` in the manifest: ``run``, ``run_name``,
``parent``, ``branch``): a run that resumed after a crash continues its run; a run started with ``resume_from=`` is a
new run whose parent is that checkpoint. Each checkpoint's own size is what it added to the folder: its own files
plus the packs of the content store its save wrote; what it shares with earlier checkpoints is not counted again.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import CheckpointError
from ..read import scan_checkpoints, list_checkpoints, read_checkpoint_manifest


@dataclass
class Node:
    name: str
    step: int
    metrics: dict
    own_bytes: int  # bytes this checkpoint added to the folder
    total_bytes: int  # bytes it consists of (own files + every pack it references)
    tags: list


@dataclass
class Run:
    run: str
    run_name: Optional[str]
    parent: Optional[str]  # the checkpoint it branched or resumed from (a name in the folder, or a path)
    branch: bool
    checkpoints: list = field(default_factory=list)
    children: list = field(default_factory=list)  # runs whose parent is one of this run's checkpoints


def lineage_of(m: dict) -> dict:
    """The lineage record of a manifest (older manifests: one run per process, parent from ``resumed_from``)."""
    lin = m.get("lineage")
    if isinstance(lin, dict) and isinstance(lin.get("run"), str):
        return lin
    parent = m.get("resumed_from")
    return {"run": str(m.get("run_id") or "unknown"), "run_name": None,
            "parent": os.path.basename(os.path.normpath(parent)) if isinstance(parent, str) and parent else None,
            "branch": False}


def start_lineage(parent: Optional[str], dirpath: str, *, staged: bool = False, branched: bool = False,
                  run_name: Optional[str] = None) -> dict:
    """The lineage record of a run that starts from checkpoint ``parent`` (None: fresh) and saves into ``dirpath``.
    Resuming from the newest checkpoint of a run in this folder continues that run; anything else (a fresh start,
    ``resume_from=``/``branched``, a checkpoint of another folder, rewinding to an older checkpoint) starts a new run
    whose parent is that checkpoint (its name when it is in this folder, else its path)."""
    run, ref = None, parent
    if parent:
        folder = os.path.dirname(os.path.normpath(str(parent)))
        same = not staged and os.path.realpath(folder) == os.path.realpath(dirpath)
        try:
            pm = read_checkpoint_manifest(parent)
        except (CheckpointError, OSError, ValueError):
            pm = None
        if same:
            ref = os.path.basename(os.path.normpath(str(parent)))
        if same and pm is not None and not branched and lineage_of(pm).get("run_name") == run_name:
            plin = lineage_of(pm)
            newest = max((c.step for c in scan_checkpoints(dirpath)[0] if lineage_of(c.summary)["run"] == plin["run"]),
                         default=-1)
            if int(pm["step"]) >= newest:  # a continuation after a crash or a stop
                run = plin["run"]
    return {"run": run or uuid.uuid4().hex[:12], "run_name": run_name, "parent": ref, "branch": bool(parent) and run is None}


def branch_points(dirpath: str) -> set[str]:
    """Checkpoints of the folder another run of it started from (``lineage.parent``): retention keeps them, so that
    ``lightning-ckpt lineage`` shows where each branch came from."""
    out: set[str] = set()
    if not os.path.isdir(dirpath):
        return out
    for c in scan_checkpoints(dirpath)[0]:
        parent = c.__dict__.get("_branch_parent", False)  # worked out once per listed checkpoint
        if parent is False:
            lin = c.summary.get("lineage")
            parent = lin["parent"] if (isinstance(lin, dict) and lin.get("branch")
                                       and isinstance(lin.get("parent"), str)) else None
            c.__dict__["_branch_parent"] = parent
        if parent is not None:
            out.add(parent)
    return out


def lineage(dirpath: Any) -> list[Run]:
    """The runs of ``dirpath`` as a forest: the roots (runs that started fresh, or from a checkpoint elsewhere), each
    with its checkpoints and the runs branched from them."""
    runs: dict[str, Run] = {}
    where: dict[str, str] = {}  # checkpoint name -> run
    counted: set[str] = set()
    for c in list_checkpoints(dirpath):
        m = c.summary
        lin = lineage_of(m)
        run = runs.get(lin["run"])
        if run is None:
            run = runs[lin["run"]] = Run(lin["run"], lin.get("run_name"), lin.get("parent"), bool(lin.get("branch")))
        packs = m.get("packs") or {}
        new = {p: int(e["size"]) for p, e in packs.items() if p not in counted}
        counted.update(packs)
        own = c.size_bytes + sum(new.values())
        total = c.size_bytes + sum(int(e["size"]) for e in packs.values())
        run.checkpoints.append(Node(c.name, c.step, dict(c.metrics), own, total, list(c.tags)))
        where[c.name] = run.run
    roots = []
    for run in runs.values():
        parent_run = where.get(run.parent) if run.parent else None
        if parent_run is not None and parent_run != run.run:
            runs[parent_run].children.append(run)
        else:
            roots.append(run)
    seen: set[str] = set()

    def reach(start: list[Run]) -> None:
        while start:
            r = start.pop()
            seen.add(r.run)
            start.extend(c for c in r.children if c.run not in seen)

    reach(list(roots))
    for run in runs.values():  # runs in a cycle of parents (hand-edited or hostile records): shown as roots, once
        if run.run not in seen:  # not a root, so its parent is a run of this folder: detach it from that one
            parent = runs[where[run.parent]]
            parent.children = [c for c in parent.children if c is not run]
            roots.append(run)
            reach([run])
    return roots


def as_json(roots: list[Run]) -> list[dict]:
    def one(r: Run) -> dict:
        return {"run": r.run, "run_name": r.run_name, "parent": r.parent, "branch": r.branch,
                "checkpoints": [n.__dict__ for n in r.checkpoints], "children": [one(c) for c in r.children]}

    return [one(r) for r in roots]


def format_tree(roots: list[Run], human: Any) -> list[str]:
    """Text lines of the forest (``human``: bytes -> short text)."""
    lines: list[str] = []

    def metrics_text(m: dict) -> str:
        items = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(m.items())[:4]]
        return "  ".join(items)

    def emit(r: Run, indent: str) -> None:
        label = f"run {r.run}" + (f" ({r.run_name})" if r.run_name else "")
        if r.parent:
            label += f", {'branched' if r.branch else 'resumed'} from {r.parent}"
        lines.append(f"{indent}{label}: {len(r.checkpoints)} checkpoint(s), "
                     f"{human(sum(n.own_bytes for n in r.checkpoints))} added")
        kids: dict[str, list[Run]] = {}
        for c in r.children:
            kids.setdefault(c.parent, []).append(c)
        for n in r.checkpoints:
            tags = f" [{', '.join(n.tags)}]" if n.tags else ""
            lines.append(f"{indent}  {n.name:32s} step {n.step:<8d} +{human(n.own_bytes):>9s} "
                         f"(of {human(n.total_bytes)}){tags}  {metrics_text(n.metrics)}".rstrip())
            for child in kids.get(n.name, []):
                emit(child, indent + "    ")

    for r in roots:
        emit(r, "")
    return lines
