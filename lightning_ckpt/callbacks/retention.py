"""RetentionPolicy: after each commit, delete the checkpoints no rule keeps (in the background)."""
from __future__ import annotations

import logging
import os
from typing import Any, Literal, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from ..policy.retention import RetentionRules, plan_retention
from ..prune import committed_records
from .base import folder_key, require_shared

log = logging.getLogger("lightning_ckpt")


class RetentionPolicy(Callback):
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
        dirpath: the folder of the saving callbacks this policy prunes.
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
        dirpath: str,
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
        if not isinstance(dirpath, (str, os.PathLike)) or not os.fspath(dirpath):
            raise ValueError(f"dirpath={dirpath!r} is invalid; give the folder of the checkpoints to prune")
        self.dirpath = folder_key(dirpath)
        self.rules = RetentionRules(keep_last, keep_best, monitor, mode, keep_every_n_steps, max_total_bytes,
                                    None if keep_tags is None else tuple(keep_tags))
        if not self.rules.has_keep_rule and max_total_bytes is None:
            raise ValueError("RetentionPolicy needs at least one rule: keep_last, keep_best, keep_every_n_steps, keep_tags or max_total_bytes")
        self.dry_run = bool(dry_run)
        self.deleted: list[str] = []
        self._shared: Any = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=self.dirpath)

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        shared = require_shared(trainer, self.dirpath, "RetentionPolicy")
        self._shared = shared
        if shared.remote:  # an s3:// dirpath: prune there, after each upload (rank 0 uploads)
            if shared.primary is not None and not self.dry_run and self.rules not in shared.primary.extra_rules:
                shared.primary.extra_rules.append(self.rules)
            return
        if self._after_commit not in shared.writer.on_commit:
            shared.writer.on_commit.append(self._after_commit)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        shared, self._shared = self._shared, None
        if shared is not None and shared.primary is not None and self.rules in shared.primary.extra_rules:
            shared.primary.extra_rules.remove(self.rules)
        if shared is not None and self._after_commit in shared.writer.on_commit:
            shared.writer.on_commit.remove(self._after_commit)

    def _after_commit(self, result: Any) -> None:
        shared = self._shared
        if shared is None:  # commit hooks run where the folder is committed (rank 0, or each node-local folder's)
            return
        records = committed_records(shared.dirpath)
        protected = shared.protected() | {result.name}
        keep = plan_retention(records, self.rules, protected)
        doomed = [r.name for r, k in zip(records, keep) if not k]
        if not doomed:
            return
        if self.dry_run:
            log.info("lightning_ckpt: retention (dry run) would delete %s", ", ".join(doomed))
            return
        self.deleted += shared.delete(doomed, reason="retention policy")

