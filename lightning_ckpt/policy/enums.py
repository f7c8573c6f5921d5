"""The package's names for training hooks, stages of a training step, save positions and checkpoint kinds, defined
once (pure: no I/O, nothing of the package).

Each is a ``str`` enum: a member *is* its old string (``Kind.FULL == "full"``, same hash, ``isinstance(.., str)``),
and ``str()``, ``format()``, ``repr()`` and ``json.dumps`` give the plain string, so messages, manifests and the
checkpoint's own entry stay byte-identical to what the literals wrote, and code that still compares with the
literals keeps working.
"""
from __future__ import annotations

from enum import Enum


class Name(str, Enum):
    """A string enum that prints, formats and serializes as its value (``enum.StrEnum`` with a plain ``repr``)."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return str.__repr__(self.value)

    def __format__(self, spec: str) -> str:
        return str.__format__(self.value, spec)


class Hook(Name):
    """The training hooks at which the saving callbacks act (and the session counts arrivals, ``arrive``)."""

    BATCH_START = "batch_start"  # on_train_batch_start: a step boundary, the previous step's save may commit
    BATCH_END = "batch_end"  # on_train_batch_end
    VALIDATION_END = "validation_end"  # on_validation_end (in fit, not the sanity check)
    EPOCH_END = "epoch_end"  # on_train_epoch_end
    TRAIN_END = "train_end"  # on_train_end: the requests of the end of fit
    TRAIN_END_FINISH = "train_end.finish"  # on_train_end, once every saving callback requested: the last wait
    EXCEPTION = "exception"  # on_exception


class Position(Name):
    """Where in training the state of a full checkpoint was taken (the ``position`` of its resume record)."""

    BATCH_END = "batch_end"
    VALIDATION_END = "validation_end"
    EPOCH_END = "epoch_end"
    TRAIN_END = "train_end"
    AFTER_STEP = "after_step"  # after the end of its training step (a later hook of the same step)
    LATE = "late"  # at the next step's start: the hook that was to take it never came


MID_EPOCH = (Position.BATCH_END, Position.VALIDATION_END)  # positions of a save in the middle of an epoch


class StepEnd(Name):
    """Which of our hooks ends the current training step (the step plan), or that the step does not end here."""

    BATCH_END = "batch_end"
    VALIDATION_END = "validation_end"
    EPOCH_END = "epoch_end"
    ACCUMULATING = "accumulating"  # gradient accumulation: this batch ends no optimizer step


class Stage(Name):
    """Where a hook stands in the current training step (``resume_exact.stage_of``)."""

    WAIT = "wait"  # the step goes on to a later hook of ours: requests wait for it
    END = "end"  # the step's last hook: its save takes the state here
    AFTER = "after"  # past the step's end: requests add their tags to the step's save


class Kind(Name):
    """What a checkpoint holds (the manifest's ``kind``; the ``content`` option takes the first three)."""

    FULL = "full"  # everything to resume training
    WEIGHTS = "weights"  # model weights, loops, hparams
    LIGHT = "light"  # no tensors of the model
    PARTIAL = "partial"  # a selection of tensors (include / exclude)
    STAGE = "stage"  # the cached result of a pipeline stage (extras.stages), not a training state


CONTENTS = (Kind.FULL, Kind.WEIGHTS, Kind.LIGHT)  # the values of the ``content`` option
# what a checkpoint of each kind can stand for: a full one serves a weights or light request made at the same step
# (the session then saves once; the writer merges such a request's tags into it)
COVERS = {Kind.FULL: frozenset((Kind.FULL, Kind.WEIGHTS, Kind.LIGHT)),
          Kind.WEIGHTS: frozenset((Kind.WEIGHTS, Kind.LIGHT)),
          Kind.LIGHT: frozenset((Kind.LIGHT,)), Kind.PARTIAL: frozenset()}
