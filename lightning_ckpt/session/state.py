"""What a save holds: the requests of one hook grouped into as few checkpoints as possible, the selection of tensors
for partial checkpoints, and the package's own entry in the checkpoint dictionary (content kind, RNG states)."""
from __future__ import annotations

import fnmatch
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch

from ..format.manifest import STATE_KEY
from ..policy.enums import COVERS, Kind
from .rng import capture_rng

log = logging.getLogger("lightning_ckpt")


class InexactResumeWarning(UserWarning):
    """A checkpoint was saved in a configuration where resuming from it does not reproduce the run bit for bit."""
FULL = (Kind.FULL, (), ())


@dataclass
class SaveRequest:
    """One callback's wish for a save at the current step."""

    tags: set
    content: str = Kind.FULL
    include: tuple = ()
    exclude: tuple = ()
    urgent: bool = False  # commit before the hook returns (preemption)
    sync: bool = False  # written before the hook returns (a callback with async_save=False)

    @property
    def group(self) -> tuple:
        return (self.content, self.include, self.exclude)


def group_requests(requests: list[SaveRequest]) -> dict[tuple, set]:
    """(content, include, exclude) -> union of tags; a full checkpoint also serves weights/light requests that select
    no tensors, so one full save answers them all."""
    groups: dict[tuple, set] = {}
    for r in requests:
        groups.setdefault(r.group, set()).update(r.tags)
    if FULL in groups:
        for g in list(groups):
            if g != FULL and not g[1] and not g[2] and g[0] in COVERS[Kind.FULL]:
                groups[FULL] |= groups.pop(g)
    return groups


def kind_of(group: tuple) -> Kind:
    content, include, exclude = group
    return Kind.PARTIAL if (include or exclude) else Kind(content)


def shape_checkpoint(checkpoint: dict, group: tuple, resume: Optional[dict] = None) -> dict:
    """The checkpoint dictionary of one group: tensors selected, and our own entry (with the RNG states of this
    process and what a resumed run needs besides Lightning's state, ``resume``, for a full checkpoint, the only kind
    that resumes training)."""
    content, include, exclude = group
    if content == Kind.LIGHT:
        checkpoint.pop("state_dict", None)
    if include or exclude:
        checkpoint = filter_state(checkpoint, include, exclude)
    kind = kind_of(group)
    checkpoint[STATE_KEY] = {"format": 1, "kind": kind.value}  # a plain string in the checkpoint
    if kind == Kind.FULL:
        checkpoint[STATE_KEY]["rng"] = capture_rng()
        if resume is not None:
            checkpoint[STATE_KEY]["resume"] = resume
    return checkpoint


def checkpoint_of(ctx: Any, group: tuple, after: bool, warned: Optional[set] = None) -> tuple[dict, Optional[dict]]:
    """The checkpoint dictionary of one group from the save context, and the manifest's record of whether a resume
    from it is exact (``warned``: warn now about each reason it is not, once per set; the session leaves that to
    its caller, see ``FolderSession._save``)."""
    resume = resume_of(ctx, group, after)
    checkpoint = shape_checkpoint(ctx.dump(group[0] != Kind.FULL), group, resume)
    summary = resume_summary(resume)
    if warned is not None:
        warn_inexact(warned, summary, ctx.step)
    return checkpoint, summary


def resume_of(ctx: Any, group: tuple, after: bool) -> Optional[dict]:
    """For a full checkpoint, what a resumed run needs besides the dumped state, from the save context's optional
    ``resume_state(after)`` (the callbacks': where in the step the state is taken, the reasons a resume from it would
    not be exact under ``"inexact"``); ``after``: the state is taken after its training step ended."""
    fn = getattr(ctx, "resume_state", None)
    return fn(after) if kind_of(group) == Kind.FULL and callable(fn) else None


def resume_summary(resume: Optional[dict]) -> Optional[dict]:
    """What the manifest records about resuming from a full checkpoint (``lightning-ckpt show`` prints it)."""
    if resume is None:
        return None
    why = list(resume.get("inexact") or [])
    return {"exact": not why, "why": why, "position": resume.get("position")}


def warn_inexact(seen: set, summary: Optional[dict], step: int) -> None:
    """Warn about each reason a resume would not be exact once per fit and folder, at the first save it applies to."""
    for r in (summary or {}).get("why") or ():
        if r in seen:
            continue
        seen.add(r)
        msg = f"lightning_ckpt: resuming from the checkpoint of step {step} will not reproduce this run exactly: {r}."
        log.warning(msg)
        warnings.warn(msg, InexactResumeWarning, stacklevel=3)


def filter_state(checkpoint: dict, include: tuple, exclude: tuple) -> dict:
    """Drop tensors whose flat key (``state_dict/<name>``, ``optimizer_states/0/state/3/exp_avg``) is not selected.

    Tensors inside dicts are removed; inside lists and tuples they become ``None``. Non-tensor values stay.
    """

    def selected(key: str) -> bool:
        if include and not any(fnmatch.fnmatchcase(key, p) for p in include):
            return False
        return not any(fnmatch.fnmatchcase(key, p) for p in exclude)

    drop = object()

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            return x if selected(path) else drop
        if isinstance(x, dict):
            out = type(x)() if type(x) is not dict else {}
            for k, v in x.items():
                r = walk(v, f"{path}/{k}" if path else str(k))
                if r is not drop:
                    out[k] = r
            return out
        if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
            items = [walk(v, f"{path}/{i}") for i, v in enumerate(x)]
            items = [None if r is drop else r for r in items]
            return type(x)(items) if isinstance(x, tuple) else items
        return x

    return walk(checkpoint, "")


class SaveContext(Protocol):
    """What a save needs from the training loop (the callbacks adapt Lightning's Trainer to it,
    ``callbacks.context.TrainerContext``). Two methods are optional, looked up on the object: ``resume_state(after)``
    (for a full checkpoint: what a resumed run needs besides the dumped state, see :func:`resume_of`) and
    ``resume_noted(summary, now, speaks)`` (the manifest's record of whether a resume from the state just taken is
    exact; ``now``: the state is the step's, warn now, else only if it is the one kept; ``speaks``: rank 0). The
    session keeps no warning state of its own: which reasons were already said is the caller's (per fit)."""

    step: int
    epoch: int

    def metrics(self) -> dict: ...

    def hparams(self) -> Optional[dict]: ...

    def dump(self, weights_only: bool) -> dict: ...

    def stable_keys(self) -> set[str]: ...

    def any_rank(self, flag: bool) -> bool: ...
