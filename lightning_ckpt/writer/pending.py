"""A save in flight, as its caller sees it: :class:`PendingSave` (started, sealed, abandoned, merged into, waited for)
and what it produces, :class:`SaveResult`.

The handle owns its save's lifecycle: :meth:`PendingSave.start` runs the job (in the writer's background thread, or
right here for a sync save), :meth:`~PendingSave.seal` lets it commit, :meth:`~PendingSave.abandon` drops it,
:meth:`~PendingSave.add` merges tags and metrics into it. The job it drives is a ``writer/job.py`` ``SaveJob``; this
module names only what it calls on it, so the two never import each other the other way round.
"""
from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass, field
from typing import Any, Iterable


@dataclass
class SaveResult:
    """What a finished save produced."""

    name: str
    path: str
    step: int
    bytes: int
    snapshot_s: float
    write_s: float
    tags: list[str] = field(default_factory=list)
    kind: str = "full"
    metrics: dict = field(default_factory=dict)
    breakdown: dict = field(default_factory=dict)  # where the time went (seconds): see SaveJob.write and _commit


class Abandoned(Exception):
    """A save dropped before its commit (:meth:`PendingSave.abandon`): the outcome of its future, never raised to a
    caller."""


class PendingSave:
    """Handle of a save. ``result()`` waits for the commit and returns a :class:`SaveResult` or raises.

    Until the save is committed, :meth:`add` (through :meth:`CheckpointWriter.merge`) can add tags and metrics to it
    (several callbacks asking for the same step get one checkpoint with all their tags).
    """

    def __init__(self, job: Any, future: cf.Future, step: int) -> None:
        self._job, self._future, self.step = job, future, step

    @classmethod
    def start(cls, job: Any, step: int, executor: cf.Executor | None) -> "PendingSave":
        """Run ``job``: in ``executor`` (written, then committed once sealed, in the background), or with no executor
        here (written now, and committed now if it is already sealed; else at :meth:`seal`, in the sealing thread)."""
        if executor is not None:
            return cls(job, executor.submit(job.run_logged), step)
        job.inline = True
        fut: cf.Future = cf.Future()
        try:
            job.write()
            if job.sealed.is_set():
                fut.set_result(job.commit())
        except BaseException as e:  # noqa: BLE001 - the writer re-raises it for sync saves (CheckpointWriter._collect)
            fut.set_exception(e)
        return cls(job, fut, step)

    # ----------------------------------------------------------------- what it is
    @property
    def name(self) -> str:
        """The folder name asked for (the commit may take ``name-v2`` if it is taken)."""
        return self._job.name

    @property
    def kind(self) -> str:
        return self._job.header["kind"]

    @property
    def tags(self) -> list[str]:
        return sorted(self._job.tags)

    @property
    def metrics(self) -> dict:
        """The metrics recorded so far (a copy)."""
        return dict(self._job.header.get("metrics") or {})

    @property
    def epoch(self) -> int | None:
        return self._job.header.get("epoch")

    @property
    def snapshot_s(self) -> float:
        """How long the save held the caller (its snapshot)."""
        return self._job.snapshot_s

    @property
    def inline(self) -> bool:
        """Written (and committed when sealed) in the caller's thread."""
        return self._job.inline

    @property
    def sealed(self) -> bool:
        return self._job.sealed.is_set()

    @property
    def abandoned(self) -> bool:
        return self._job.abandoned

    def progress(self) -> tuple[int, int]:
        """Bytes of this rank's files written so far, and of about how many (any thread may ask)."""
        return int(self._job.bytes_done), int(self._job.bytes_total)

    # ----------------------------------------------------------------- what it does
    def add(self, tags: Iterable[str], metrics: dict | None) -> bool:
        """Merge ``tags`` and ``metrics`` into the save; False once its commit has begun (nothing merged)."""
        return self._job.add(tags, metrics)

    def seal(self) -> bool:
        """Let the save commit. A save written inline commits now, in this thread: True when it finished here (its
        outcome is in :meth:`result`); False when it was sealed already or commits in the background."""
        job = self._job
        if job.sealed.is_set():
            return False
        job.sealed.set()
        if not job.inline or self._future.done():
            return False
        try:
            self._future.set_result(job.commit())
        except BaseException as e:  # noqa: BLE001 - kept as the save's outcome
            self._future.set_exception(e)
        return True

    def abandon(self) -> bool:
        """Drop the save before its commit (its partial folder is removed): False when it was sealed already (it
        commits); else as :meth:`seal`."""
        if self._job.sealed.is_set():
            return False
        self._job.abandoned = True
        return self.seal()

    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> None:
        """Until the save is over (committed, failed or abandoned), without raising."""
        cf.wait([self._future])

    def error(self) -> BaseException | None:
        """The save's error once it is over (an :class:`Abandoned` when it was dropped), else None."""
        return self._future.exception()

    def result(self, timeout: float | None = None) -> SaveResult:
        return self._future.result(timeout)
