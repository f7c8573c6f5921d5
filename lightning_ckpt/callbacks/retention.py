"""RetentionPolicy: after each commit, delete the checkpoints no rule keeps (in the background)."""
from __future__ import annotations

import logging
from typing import Any, Literal, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from ..policy.retention import RetentionRules
from ..session.options import check_dirpath
from ..session.session import Participant
from ..writer.options import check_bool
from . import compat
from .base import session_of
from .names import default_dirpath

log = logging.getLogger("lightning_ckpt")


class RetentionPolicy(Callback, Participant):
    """Prune the checkpoints in ``dirpath`` after every commit of a saving callback on the same folder.

    A checkpoint is kept when any set rule keeps it; with ``max_total_bytes`` the oldest kept ones are then dropped
    until the folder fits. Whatever the rules say, it never deletes the newest committed checkpoint, the one this run
    resumed from, a current best-k of a :class:`BestMetricCheckpoint` / :class:`EarlyStopAndSave` on the folder, or a
    save still in flight; and it deletes only after a newer checkpoint was committed.

    Example::

        callbacks=[PeriodicCheckpoint("ckpts/", every_n_train_steps=100),
                   BestMetricCheckpoint("ckpts/", monitor="val_loss"),
                   RetentionPolicy("ckpts/", keep_last=2, keep_every_n_steps=1000)]

    Args:
        dirpath: the folder of the saving callbacks this policy prunes (default: theirs by default,
            ``<default_root_dir>/checkpoints``).
        keep_last: keep the N newest.
        keep_best: keep the N best by ``monitor`` (read from each checkpoint's recorded metrics).
        monitor: metric for ``keep_best``.
        mode: ``"min"`` or ``"max"`` for ``monitor``.
        keep_every_n_steps: keep checkpoints whose step is a multiple of N (milestones).
        max_total_bytes: cap on the bytes kept in the folder.
        dry_run: only log what would be deleted.
        keep_tags: keep checkpoints carrying any of these tags (e.g. ``["best", "preempt"]``).

    With an ``s3://`` dirpath the rules apply to the checkpoints there, after each upload.
    """

    def __init__(
        self,
        dirpath: Optional[str] = None,
        keep_last: Optional[int] = None,
        keep_best: Optional[int] = None,
        monitor: Optional[str] = None,
        mode: Literal["min", "max"] = "min",
        keep_every_n_steps: Optional[int] = None,
        max_total_bytes: Optional[int] = None,
        dry_run: bool = False,
        keep_tags: Optional[list[str]] = None,
    ) -> None:
        super().__init__()
        self.dirpath: Optional[str] = check_dirpath(dirpath) if dirpath is not None else None  # None: the default
        self.rules = RetentionRules(keep_last, keep_best, monitor, mode, keep_every_n_steps, max_total_bytes, keep_tags)
        if not self.rules.has_keep_rule and max_total_bytes is None:
            raise ValueError("RetentionPolicy needs at least one rule: keep_last, keep_best, keep_every_n_steps, "
                             "keep_tags or max_total_bytes")
        self.dry_run = check_bool("dry_run", dry_run)
        self.deleted: list[str] = []  # what retention deleted in the folder during the last fit
        self._session: Any = None

    @property
    def state_key(self) -> str:
        return compat.state_key(self, dirpath=self.dirpath)

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.dirpath is None:
            self.dirpath = default_dirpath(trainer)
        session = session_of(trainer, self.dirpath, "RetentionPolicy")
        self._session = session
        session.join(self)
        self.deleted = session.retention_deleted
        if not self.dry_run:  # several policies on one folder: a checkpoint stays when any of them keeps it
            session.add_retention(self, self.rules)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.leave(self)
            if session.primary is not None and self.rules in session.primary.extra_rules:
                session.primary.extra_rules.remove(self.rules)

    def after_commit(self, result: Any) -> None:
        session = self._session
        if session is None:
            return
        if self.dry_run:
            try:  # the session's plan, with every protection of the run (the commit just made included)
                doomed = session.plan([self.rules], result.name).names
            except ValueError as e:
                log.warning("lightning_ckpt: retention (dry run): %s", e)
                return
            if doomed:
                log.info("lightning_ckpt: retention (dry run) would delete %s", ", ".join(doomed))
