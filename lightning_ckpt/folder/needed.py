"""What no deletion may take, and which runs failed: the one answer every deletion path asks (``lightning-ckpt prune``
with rules or ``--failed``, ``RetentionPolicy``, best-k eviction, retention at a backup location, ``remove_checkpoint``).

A checkpoint is **needed** (:func:`needed`) when it is, from the folder's manifests alone:

- the newest of the folder, or the newest of one of the runs that share it by name (``resume="auto"`` and
  ``ckpt_path="last"`` of that run resume from it);
- a current best: among the checkpoints tagged ``best``, the top-k of a ranking rule recorded in the manifests
  (``best_rule``; ``ckpt_path="best"`` picks from them);
- a checkpoint another run started from (``resumed_from`` or ``lineage.parent`` of a manifest of another lineage
  run: a branch, a rewind, a new run), so that no run's history loses its starting point and ``lightning-ckpt
  lineage`` stays connected. A relaunch that continues a run (same ``lineage.run``) does not pin where it resumed:
  that checkpoint is then an older one of the same line (a preempted week-long run would otherwise keep one full
  checkpoint per relaunch, forever); until the relaunch's first commit it is the line's newest, and the live run's
  note holds it too.

A live run's own protections (its resume point before its first commit, uploads in flight, in-memory best-k) are added
by its session; a live writer's partial save is never debris (its owner token names a running process).

**Failed runs** are noted in ``<dirpath>/.runs/<run_id>.json`` by the session of a run that ended in an exception. A
relaunch that resumes or branches from one of that run's checkpoints supersedes the note when it resumes
(``status: "resumed"``), and :func:`failed_runs` also counts as not failed any run one of whose checkpoints another
run resumed from, or whose run (``lineage.run``) a later process went on with (a note left by an older release).
Every entry read here is checked for its type first (``lstat``): ``.runs`` must be a real folder and each note a
regular file, else :class:`RunNotesError` says what to remove.
"""
from __future__ import annotations

import json
import os
import stat
import time
from typing import Any, Optional

from ..errors import CheckpointError
from ..read import run_name_of
from ..store import LocalStore
from ..store.base import owner_gone, owner_token
from ..store.fs import OPS, read_member
from .best import rank_best

RUNS_DIR = ".runs"  # <dirpath>/.runs/<run_id>.json: a note left by a run that ended in an exception
MAX_NOTE_BYTES = 1 << 16


class CheckpointProtectedError(CheckpointError):
    """A deletion named a checkpoint a run needs (the newest, a current best, a resume or branch point)."""


class RunNotesError(CheckpointError):
    """``<dirpath>/.runs`` or one of its notes is not what this package writes there (a link, a file, a FIFO...)."""


def checkpoint_ref(path: Any) -> Optional[str]:
    return os.path.basename(os.path.normpath(path)) if isinstance(path, str) and path else None


def needed(ckpts: list, live_rules: list = (), copy: bool = False) -> dict[str, str]:
    """The checkpoints (``CheckpointInfo`` of one listing of a folder, oldest first) that no deletion may take, with
    the reason of each (see the module's docstring). ``live_rules``: ranking rules (``best_rule`` dicts) of a live
    run's callbacks, whose current best that run protects itself (it also knows its saves still in flight).
    ``copy=True``: a backup location, a copy of a run folder kept by its own rules (the run's folder keeps the best
    and the history): only the newest of each run."""
    names = {c.name for c in ckpts}
    out: dict[str, str] = {}

    def add(name: Optional[str], why: str) -> None:
        if name in names:
            out.setdefault(name, why)

    if ckpts:
        add(ckpts[-1].name, "the folder's newest checkpoint")
    lines: dict[Optional[str], list] = {}
    for c in ckpts:
        lines.setdefault(run_name_of(c.summary), []).append(c)
    for line, cs in lines.items():
        add(cs[-1].name, f"the newest checkpoint of run {line!r}" if line else "the newest checkpoint of the main line")
        for rule in recorded_best_rules(cs) if not copy else ():
            if rule in live_rules:
                continue
            for c in rank_best(cs, rule["monitor"], rule.get("mode", "min"), rule.get("top_k")):
                add(c.name, f"a current best by {rule['monitor']}")
    by_name = {c.name: c for c in ckpts}
    for c in ckpts if not copy else ():
        m = c.summary
        lin = m.get("lineage") if isinstance(m.get("lineage"), dict) else {}
        for ref, why in ((checkpoint_ref(m.get("resumed_from")), f"the checkpoint {c.name} resumed from"),
                         (checkpoint_ref(lin.get("parent")), f"the checkpoint the run of {c.name} started from")):
            parent = by_name.get(ref) if ref else None
            if parent is not None and not continues(parent.summary, m):
                add(ref, why)
    return out


def continues(parent: dict, child: dict) -> bool:
    """``child`` goes on with the run of ``parent`` (a relaunch after a crash or a stop resumed from the run's newest:
    the same ``lineage.run``): then ``parent`` is an older checkpoint of the same line, kept or deleted by the rules
    like any other (before the relaunch's first commit, the live run's note holds it, and it is the line's newest).
    A branch, a rewind or a new run started from it keeps it: the lineage tree stays connected."""
    a, b = parent.get("lineage"), child.get("lineage")
    return (isinstance(a, dict) and isinstance(b, dict) and isinstance(a.get("run"), str)
            and a.get("run") == b.get("run"))


def recorded_best_rules(cs: list) -> list[dict]:
    """Every ranking rule the newest checkpoint with rules recorded (a folder may have several ranking callbacks)."""
    for c in reversed(cs):
        rules = c.summary.get("best_rule")
        if isinstance(rules, list) and rules:
            ok = [r for r in rules if isinstance(r, dict) and isinstance(r.get("monitor"), str)
                  and r.get("mode", "min") in ("min", "max")
                  and (r.get("top_k") is None or (isinstance(r.get("top_k"), int) and not isinstance(r["top_k"], bool)))]
            if ok:
                return ok
    return []


# ------------------------------------------------------------------------------------------------ failed-run notes
def _runs_dir(dirpath: str) -> Optional[str]:
    """``<dirpath>/.runs`` when it exists (None when not); raises RunNotesError when it is not a real folder."""
    d = os.path.join(dirpath, RUNS_DIR)
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RunNotesError(f"cannot check {d} ({e.strerror or e})") from None
    if not stat.S_ISDIR(st.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a folder"
        raise RunNotesError(f"{d} is {what}: it must be the folder of failed-run notes this package writes, and it is "
                            f"never followed. Nothing was deleted. Remove it (`rm {d}`) and run again.")
    return d


def read_notes(dirpath: str) -> dict[str, dict]:
    """run id -> its note (``.runs/<run_id>.json``). Raises RunNotesError for an entry that is not a regular file or
    not a note (nothing is deleted on a half-read folder)."""
    d = _runs_dir(dirpath)
    if d is None:
        return {}
    out: dict[str, dict] = {}
    try:
        entries = sorted(os.listdir(d))
    except OSError as err:
        raise RunNotesError(f"cannot list {d} ({err.strerror or err}): nothing was deleted") from None
    for e in entries:
        p = os.path.join(d, e)
        try:
            st = os.lstat(p)
        except FileNotFoundError:  # removed since the listing
            continue
        if e.startswith("."):  # a temp file of a note being written (its writer's owner token in the name)
            continue
        if not stat.S_ISREG(st.st_mode) or not e.endswith(".json"):
            raise RunNotesError(f"{p} is not a failed-run note (a regular .json file this package writes): nothing "
                                "was deleted. Remove it and run again.")
        try:
            rec = json.loads(read_member(d, e, MAX_NOTE_BYTES))
        except (CheckpointError, OSError, ValueError) as err:
            raise RunNotesError(f"{p} cannot be read as a failed-run note ({err}): nothing was deleted. Remove it "
                                "and run again.") from None
        if isinstance(rec, dict) and isinstance(rec.get("run_id"), str):
            out[rec["run_id"]] = rec
    return out


def failed_run_ids(dirpath: str) -> set[str]:
    """Runs noted as ended in an exception and not since resumed (``<dirpath>/.runs/<run_id>.json``)."""
    return {r for r, rec in read_notes(dirpath).items() if rec.get("status") == "failed"}


def failed_runs(dirpath: str, ckpts: list) -> set[str]:
    """The run ids ``prune --failed`` may delete checkpoints of: noted failed, and none of their checkpoints resumed or
    branched from by another process, and their run (``lineage.run``) not gone on with by a later process."""
    ids = failed_run_ids(dirpath)
    if not ids:
        return ids
    by_name = {c.name: c for c in ckpts}
    went_on: set[str] = set()
    runs: dict[str, set] = {}  # lineage run -> the process run ids that wrote it
    for c in ckpts:
        m = c.summary
        lin = m.get("lineage") if isinstance(m.get("lineage"), dict) else {}
        if isinstance(lin.get("run"), str):
            runs.setdefault(lin["run"], set()).add(m.get("run_id"))
        for ref in (checkpoint_ref(m.get("resumed_from")), checkpoint_ref(lin.get("parent"))):
            parent = by_name.get(ref) if ref else None
            if parent is not None and parent.summary.get("run_id") != m.get("run_id"):
                went_on.add(parent.summary.get("run_id"))
    for writers in runs.values():
        if len(writers) > 1:
            went_on |= writers
    return ids - went_on


def record_failed_run(dirpath: str, run_id: str, error: str, when: float) -> None:
    """Leave the note :func:`failed_run_ids` reads (``lightning-ckpt prune --failed`` removes that run's checkpoints,
    but never one a run needs)."""
    _write_note(dirpath, run_id, {"run_id": run_id, "status": "failed", "error": error[:2000], "time": when})


def settle_resumed(dirpath: str, parent: Any, by_run: str) -> Optional[str]:
    """A run of ``dirpath`` resumes or branches from checkpoint ``parent``: when ``parent`` is a
    checkpoint of this folder written by a run noted as failed, supersede that note (``status: "resumed"``, by whom).
    Returns the run id whose note was superseded, else None."""
    if not isinstance(parent, str) or not parent:
        return None
    folder = os.path.dirname(os.path.normpath(parent))
    if os.path.realpath(folder) != os.path.realpath(dirpath):
        return None
    from ..read import read_checkpoint_manifest

    try:
        run_id = read_checkpoint_manifest(parent).get("run_id")
    except (CheckpointError, OSError, ValueError):
        return None
    notes = read_notes(dirpath)
    rec = notes.get(run_id) if isinstance(run_id, str) else None
    if rec is None or rec.get("status") != "failed":
        return None
    _write_note(dirpath, run_id, {**rec, "status": "resumed", "resumed_by": by_run,
                                  "resumed_from": os.path.basename(os.path.normpath(parent)), "resumed_time": time.time()})
    return run_id


def hold_resume_point(dirpath: str, parent: Any, run_id: str) -> bool:
    """A live run of ``dirpath`` resumes or branches from checkpoint ``parent`` of the same folder: note it
    (``.runs/<run_id>.json``, ``status: "running"`` with this process's owner token) so that a deletion in another
    process keeps it before the run's first commit records it in a manifest (:func:`live_holds`; with the folder lock
    on, no deletion runs beside a live run anyway). Replaced by the failure note if the run fails, removed by
    :func:`release_resume_point` when it ends. Returns whether a note was written."""
    if not isinstance(parent, str) or not parent:
        return False
    if os.path.realpath(os.path.dirname(os.path.normpath(parent))) != os.path.realpath(dirpath):
        return False
    _write_note(dirpath, run_id, {"run_id": run_id, "status": "running", "owner": owner_token(),
                                  "resumed_from": os.path.basename(os.path.normpath(parent)), "time": time.time()})
    return True


def release_resume_point(dirpath: str, run_id: str) -> None:
    """The run ended: remove its ``running`` note (a failure note that replaced it stays)."""
    rec = read_notes(dirpath).get(run_id)
    if rec is not None and rec.get("status") == "running":
        OPS.unlink(os.path.join(dirpath, RUNS_DIR, f"{run_id}.json"))


def live_holds(dirpath: str) -> dict[str, str]:
    """Checkpoints live runs of the folder resumed from (their ``running`` notes whose process still runs; a process
    of another machine is never declared gone), with the reason."""
    out: dict[str, str] = {}
    for rec in read_notes(dirpath).values():
        owner = rec.get("owner")
        name = rec.get("resumed_from")
        if rec.get("status") == "running" and isinstance(owner, str) and isinstance(name, str) and not owner_gone(owner):
            out.setdefault(name, f"the checkpoint the live run {rec.get('run_id')} (process {owner}) resumed from")
    return out


def _write_note(dirpath: str, run_id: str, rec: dict) -> None:
    d = _runs_dir(dirpath)
    if d is None:
        d = os.path.join(dirpath, RUNS_DIR)
    target = os.path.join(d, f"{run_id}.json")
    if os.path.lexists(target) and not stat.S_ISREG(os.lstat(target).st_mode):
        raise RunNotesError(f"{target} is not a regular file; remove it")
    LocalStore(d, fsync=False).write_atomic(f"{run_id}.json", json.dumps(rec).encode())

