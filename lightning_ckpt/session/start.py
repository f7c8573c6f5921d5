"""Where a ``fit`` starts, decided in one place. No Lightning.

The inputs: what the user asked for (:class:`Ask`: the ``ckpt_path`` given to ``fit``, ``resume="auto"``,
``resume_from``, ``allow_existing``, and under Ray the checkpoint Ray hands the attempt) and the folder (:class:`Place`:
where it commits, the ``s3://`` location a staged folder uploads to, its backup locations, its run, node-local or
shared). The answer: a :class:`Start` (where the fit starts, why, whether it branches, whether a backup was pulled into
the folder for it, and the line to print). The I/O goes through ``read``, ``store``, ``folder`` and the searches of
:mod:`lightning_ckpt.session.resume`.

The decision, first match wins (:func:`decide`):

======================================  ==========================================================================
input                                   where the fit starts
======================================  ==========================================================================
``ckpt_path`` given (a path)            that path (``"last"``/``"best"`` are resolved before: :func:`newest`,
                                        :func:`best`)
``resume="auto"`` under Ray             Ray's checkpoint: this run's -> it, or a newer commit of the same lineage
                                        run; another run's -> a branch of it (:func:`from_reference`)
``resume="auto"``                       the newest valid checkpoint of the run among the folder and its backups
                                        (a newer backup is pulled in; a staged folder: the newer of the staged and
                                        the uploaded one; node-local folders: the newest one every folder holds)
``resume_from``                         that checkpoint (a name in the folder, a path, a URI): a branch
nothing                                 fresh; refused (:class:`FolderNotEmptyError`) when the folder already holds
                                        the run's checkpoints, unless ``allow_existing``
======================================  ==========================================================================

Ranks: :func:`decide` is collective (every rank calls it with the same inputs): node-local folders first gather
every folder's checkpoint names, then rank 0 decides and ``broadcast`` hands its answer (or its error, as the same
:mod:`errors` class) to every rank; a checkpoint in a node-local folder travels as its name, and each rank reads its
own folder's copy. :func:`newest` and :func:`best` (``ckpt_path="last"``/``"best"``) run on each rank that calls them.

A backup that cannot be read is never taken for "no checkpoint": with nothing local the error is raised (a fresh
start would silently drop the run); with a local checkpoint that one is used, with a warning naming the failure.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterable, Optional

import torch.distributed as dist

from .. import errors
from ..errors import CheckpointError, CheckpointNotFoundError, FolderNotEmptyError
from ..folder.best import best_checkpoints
from ..folder.lineage import lineage_of
from ..read import scan_checkpoints, list_checkpoints, of_run, read_checkpoint_manifest, reference_target, verify_checkpoint
from ..store import folder_key, open_store
from .resume import common_local_names, find_newest, newest_for_auto

log = logging.getLogger("lightning_ckpt")



class Reason(str, Enum):
    """Why a fit starts where it does (``Start.reason``); each value is the option that decided it."""

    GIVEN = "ckpt_path"
    LAST = "last"
    BEST = "best"
    AUTO = "auto"
    RAY = "ray"
    BRANCH = "resume_from"
    FRESH = "fresh"


GIVEN, LAST, BEST, AUTO, RAY, BRANCH, FRESH = (Reason.GIVEN, Reason.LAST, Reason.BEST, Reason.AUTO, Reason.RAY,
                                               Reason.BRANCH, Reason.FRESH)


@dataclass(frozen=True)
class Place:
    """A checkpoint folder as the start decision sees it (see :meth:`of` for a session's)."""

    key: str  # the folder as named: an absolute path, or the s3:// URI a staged folder uploads to
    dirpath: str = ""  # where this rank's writer commits (the local staging folder of an s3:// key); default: key
    staged_for: Optional[str] = None  # the s3:// location the staged folder at dirpath is uploaded to
    backups: tuple[str, ...] = ()  # the backup locations every commit is uploaded to, in order
    run_name: Any = None  # the run (None: the folder's main line; read.ANY_RUN: every run)
    node_local: bool = False  # each node commits its own copy of the folder
    commits_here: bool = True  # this rank commits into dirpath (the folder's leader)
    gather: Optional[Callable[[Any], list]] = field(default=None, compare=False)  # node-local: all_gather_object

    def __post_init__(self) -> None:
        if not self.dirpath:
            object.__setattr__(self, "dirpath", self.key)

    @classmethod
    def of(cls, session: Any) -> "Place":
        """The folder of a :class:`~lightning_ckpt.session.session.FolderSession` (every rank)."""
        w = session.writer
        staged_for = session.staged_for

        def gather(obj: Any) -> list:
            out: list = [None] * w.world_size
            dist.all_gather_object(out, obj, group=w.pg)
            return out

        return cls(key=session.key, dirpath=session.dirpath, staged_for=staged_for, run_name=session.run_name,
                   backups=tuple(u for u in session.uploaders if u != staged_for), node_local=bool(w.node_local),
                   commits_here=bool(w.is_leader and w.folder_written), gather=gather if w.node_local else None)


@dataclass(frozen=True)
class Ask:
    """What the user asked for (the saving callbacks of a folder together)."""

    ckpt_path: Any = None  # what fit() was given, "last"/"best" already resolved (None: nothing)
    auto: bool = False  # resume="auto" on any saving callback of the folder
    resume_from: Optional[str] = None  # a branch point: a checkpoint name in the folder, a path or a URI
    allow_existing: bool = False  # a fresh start may add to a folder that holds the run's checkpoints
    ray: Optional[Callable[[], Optional[dict]]] = field(default=None, compare=False)  # under Ray: Ray's reference


@dataclass(frozen=True)
class Start:
    """Where a fit starts."""

    path: Optional[str] = None  # the checkpoint to restore (None: a fresh start)
    reason: Reason = Reason.FRESH
    branch: bool = False  # a new run starts from another run's checkpoint (resume_from, a Ray clone)
    pulled_from: Optional[str] = None  # path is a local copy just pulled from this backup checkpoint
    message: Optional[str] = None  # the line to print on rank 0 (None: nothing to say)


# ---------------------------------------------------------------------- the decision (collective)
def decide(ask: Ask, place: Place, *, rank_zero: bool = True, broadcast: Callable[[Any], Any] = lambda obj: obj
           ) -> Start:
    """Where a fit into ``place`` starts (see the module's table). Collective: every rank calls it with the same
    inputs; rank 0 decides, ``broadcast(obj)`` hands rank 0's object to every rank. Raises on every rank what rank 0
    raised (a :class:`CheckpointError` subclass)."""
    if ask.ckpt_path:
        return Start(ask.ckpt_path, GIVEN)
    if ask.auto:
        if ask.ray is not None:
            got = _agree(place, rank_zero, broadcast, lambda: _from_ray(ask.ray, place))
            if got is not None:
                path, branched = got
                return Start(path, RAY, branch=branched, message=(
                    f"lightning_ckpt: resume='auto': {'branching' if branched else 'resuming'} from {path} (the "
                    "checkpoint Ray hands this attempt)"))
        common, only_some = (None, [])
        if place.node_local:
            assert place.gather is not None, "node-local folders need a gather function"
            common, only_some = common_local_names(place.dirpath, place.run_name, place.commits_here, place.gather)
        got = _agree(place, rank_zero, broadcast, lambda: newest_for_auto(
            place.dirpath, place.backups, place.run_name, staged_for=place.staged_for, among=common,
            only_some=only_some))
        if got is not None and got[0]:
            return Start(got[0], AUTO, pulled_from=got[1],
                         message=f"lightning_ckpt: resume='auto': resuming from {got[0]}")
    got = _agree(place, rank_zero, broadcast, lambda: _branch_or_fresh(ask, place))
    if got is not None:
        run = place.run_name if isinstance(place.run_name, str) else None
        return Start(got[0], BRANCH, branch=True,
                     message=f"lightning_ckpt: starting run {run or '(main)'} from {got[0]} (resume_from)")
    if ask.auto:
        return Start(None, FRESH, message=f"lightning_ckpt: resume='auto': no checkpoint in {place.key} or its "
                                          "backups; starting fresh")
    return Start(None, FRESH)


def _agree(place: Place, rank_zero: bool, broadcast: Callable[[Any], Any], choose: Callable[[], Any]) -> Any:
    """Rank 0 runs ``choose()`` -> ``(path, in_own_folder, *more)`` or None; every rank gets it, a path in a node-local
    folder as its name joined to the rank's own folder. Rank 0's CheckpointError is raised on every rank."""
    answer, error = None, None
    if rank_zero:
        try:
            answer = choose()
            if answer is not None:
                answer = (*shared(place, answer[0], answer[1]), *answer[2:])
        except CheckpointError as e:
            error = (type(e).__name__, str(e))
    answer, error = broadcast((answer, error))
    if error is not None:
        cls = getattr(errors, error[0], CheckpointError)
        raise (cls if isinstance(cls, type) and issubclass(cls, CheckpointError) else CheckpointError)(error[1])
    if answer is None:
        return None
    path, relative, *more = answer
    return (os.path.join(place.dirpath, path) if relative else path, *more)


def shared(place: Place, path: str, own: bool) -> tuple[str, bool]:
    """``(what rank 0 broadcasts, relative)`` for a checkpoint at ``path``: in node-local folders a checkpoint of the
    folder itself (``own``) travels as its name, and each rank reads its own folder's copy; anything else as is."""
    if own and place.node_local:
        return os.path.relpath(path, place.dirpath), True
    return path, False


# ---------------------------------------------------------------------- ckpt_path="last" and "best"
def newest(places: Iterable[Place], warn: Callable[[str], Any] = warnings.warn) -> Start:
    """``ckpt_path="last"``: the newest committed, verified checkpoint of the places' runs among their folders and
    backups (a newer backup is pulled into its folder); a fresh start, with a warning, when there is none."""
    places = list(places)
    top: tuple = (-1, 0.0, None, None)
    for place in places:
        path, pulled_from = find_newest(place.key, list(place.backups), run_name=place.run_name)
        if path is None:
            continue
        man = read_checkpoint_manifest(path)
        key = (int(man["step"]), float(man.get("created_unix") or 0.0), path, pulled_from)
        if key[:2] > top[:2]:
            top = key
    if top[2] is None:
        warn(f"ckpt_path='last': no committed checkpoint in {', '.join(sorted({p.key for p in places}))}"
             "; no checkpoint is loaded (a fit starts fresh)")
        return Start(None, FRESH)
    return Start(top[2], LAST, pulled_from=top[3])


def best(candidates: Iterable[tuple[Place, Optional[str], Optional[str]]],
         warn: Callable[[str], Any] = warnings.warn) -> Start:
    """``ckpt_path="best"``: the best committed, verified checkpoint by the monitored metric; ``candidates``:
    ``(place, monitor, mode)``, a place's own rule (None: the rule recorded in its manifests), those with a rule
    first. Raises :class:`CheckpointNotFoundError` when no checkpoint is tagged best."""
    tried = []
    for place, monitor, mode in sorted(candidates, key=lambda c: c[1] is None):
        for c in best_checkpoints(place.key, monitor=monitor, mode=mode, run_name=place.run_name):
            try:
                verify_checkpoint(c.path)
                return Start(c.path, BEST)
            except CheckpointError as e:
                warn(f"ckpt_path='best': skipping corrupt {c.path}: {e}")
        tried.append(place.key)
    raise CheckpointNotFoundError(
        f"ckpt_path='best': no checkpoint tagged best in {', '.join(sorted(set(tried)))} (a BestMetricCheckpoint or "
        "EarlyStopAndSave tags them). Pass ckpt_path='last' or the path of a checkpoint.")


# ---------------------------------------------------------------------- under Ray (rank 0 decides)
def _from_ray(read_reference: Callable[[], Optional[dict]], place: Place) -> Optional[tuple[str, bool, bool]]:
    ref = read_reference()
    if ref is None:
        return None
    got = from_reference(place, ref)
    return got.path, in_folder(place, got), got.branch  # type: ignore[return-value]


def in_folder(place: Place, got: Start) -> bool:
    """Whether Ray's checkpoint ``got`` is one of the folder's own (this run's; the folder not staged for upload)."""
    return not got.branch and place.staged_for is None


def from_reference(place: Place, ref: dict) -> Start:
    """Where to start from the reference record ``ref`` of the checkpoint Ray hands this attempt: a reference to this
    folder's run continues it, from the referenced checkpoint or from a newer commit of the same lineage run that Ray
    was not told of (the worker died before reporting it); another run's or folder's (Tune's PBT cloning trial B
    into trial A) starts a branch of exactly that checkpoint."""
    if _same_folder(ref.get("folder"), place.key) and ref.get("run_name") == place.run_name:
        newer = [c for c in of_run(list_checkpoints(place.key), place.run_name)
                 if lineage_of(c.summary).get("run") == ref.get("lineage_run") and c.step > ref["step"]]
        for c in reversed(newer):
            try:
                verify_checkpoint(c.path)
                return Start(c.path, RAY)
            except CheckpointError as e:
                log.warning("lightning_ckpt: resume='auto' skips %s: %s", c.path, e)
        target = reference_target(ref, "Ray's checkpoint of this run")
        verify_checkpoint(target)
        return Start(target, RAY)
    target = reference_target(ref, "the checkpoint Ray hands this trial")  # another run's: a branch of it
    verify_checkpoint(target)
    return Start(target, RAY, branch=True)


def _same_folder(a: Any, b: str) -> bool:
    if not isinstance(a, str) or not a:
        return False
    try:  # the same name; or one local folder under two names (a symbolic link)
        return folder_key(a) == folder_key(b) or os.path.samefile(a, b)
    except (OSError, ValueError):  # a URI is no file; a malformed name is no folder of ours
        return False


# ---------------------------------------------------------------------- a branch, or a fresh start (rank 0)
def _branch_or_fresh(ask: Ask, place: Place) -> Optional[tuple[str, bool]]:
    if ask.resume_from is not None:
        return branch_point(ask.resume_from, place.key), False
    if not ask.allow_existing:
        refuse_existing(place)
    return None


def branch_point(resume_from: Any, folder: str) -> str:
    """The verified checkpoint ``resume_from`` names: a checkpoint name in ``folder``, a path or a URI."""
    src = os.fspath(resume_from)
    if "/" not in src and os.sep not in src:  # a checkpoint name in this folder
        src = open_store(folder).path(src)
    try:
        verify_checkpoint(src)
    except CheckpointNotFoundError as e:
        raise CheckpointNotFoundError(f"resume_from={resume_from!r}: {e}") from None
    return src


def refuse_existing(place: Place) -> None:
    """A fresh start into a folder that already holds the run's checkpoints: :class:`FolderNotEmptyError`."""
    run_name = place.run_name
    try:
        store = open_store(place.key)
        if not store.exists():
            return
        if store.newest_hinted(run_name, False) == []:
            return  # the folder's index says this run has no checkpoint there (no manifest read, no GET each)
        ckpts = of_run(scan_checkpoints(place.key)[0], run_name)
    except CheckpointError:
        raise
    except Exception:  # noqa: BLE001 - S3 unreachable: the first upload reports it
        return
    if not ckpts:
        return
    newest_ckpt = ckpts[-1]
    run = f" of run {run_name!r}" if run_name else ""
    raise FolderNotEmptyError(
        f"{place.key} already holds {len(ckpts)} checkpoint(s){run} (newest: {newest_ckpt.name}, step "
        f"{newest_ckpt.step}) and this fit starts fresh, so two runs would mix in one folder. Resume it "
        "(trainer.fit(..., ckpt_path='last') or resume='auto'), branch from one of them (resume_from=..., "
        "run_name=...), choose another dirpath, or pass allow_existing=True to add this run's checkpoints next to "
        "them.")
