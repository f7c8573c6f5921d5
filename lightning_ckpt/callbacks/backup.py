"""BackupToS3: after each local commit, upload the checkpoint to S3 in the background, with retries."""
from __future__ import annotations

import logging
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from ..session.backups import parse_locations
from ..session.options import check_dirpath
from ..session.session import Participant
from ..writer.options import check_positive_int, check_seconds
from . import compat
from .base import session_of

log = logging.getLogger("lightning_ckpt")


class BackupToS3(Callback, Participant):
    """Mirror every checkpoint committed in ``dirpath`` to ``uri`` (``s3://bucket/prefix``). The saving callbacks'
    ``backup_uri`` argument does the same (with several locations and full retention rules); this callback adds a
    location to saving callbacks you do not configure yourself.

    Uploads run in a background thread on rank 0 after the local commit: objects first, ``manifest.json`` last, then
    ``latest.json`` (see :func:`lightning_ckpt.folder.transfer.push_checkpoint`), so a partial upload is never seen as a
    checkpoint. A failed upload is logged and retried with exponential backoff (the S3 server may be down for a while);
    it never stops training unless ``required=True``, in which case the error is raised at the end of ``fit``.
    A checkpoint waiting for its upload is never deleted locally by retention. When ``fit`` ends, the uploads still
    queued are given ``flush_timeout_s`` to finish. Settings (endpoint, credentials) come from the standard AWS
    environment and config files.

    Args:
        dirpath: the folder of the saving callbacks whose checkpoints are mirrored.
        uri: ``s3://bucket/prefix``.
        keep_last: keep only the N newest checkpoints at ``uri`` (the location's own retention); ``None`` keeps all.
        max_retry_s: the longest wait between two tries of a failed upload (seconds).
        flush_timeout_s: how long the end of ``fit`` waits for queued uploads (seconds).
        required: raise at the end of ``fit`` if some checkpoint could not be uploaded.
    """

    def __init__(self, dirpath: str, uri: str, keep_last: Optional[int] = None, max_retry_s: float = 60.0,
                 flush_timeout_s: float = 600.0, required: bool = False) -> None:
        super().__init__()
        self.dirpath = check_dirpath(dirpath)
        self.keep_last = check_positive_int("keep_last", keep_last)
        self.flush_timeout_s = check_seconds("flush_timeout_s", flush_timeout_s)
        (self.location,) = parse_locations([{"uri": uri, "keep_last": keep_last, "max_retry_s": max_retry_s,
                                             "required": required}] if keep_last is not None else
                                           [{"uri": uri, "max_retry_s": max_retry_s, "required": required}])
        self.uri = self.location.uri
        self.max_retry_s = self.location.max_retry_s
        self.required = self.location.required
        self._uploader: Any = None

    @property
    def state_key(self) -> str:
        return compat.state_key(self, dirpath=self.dirpath, uri=self.uri)

    @property
    def uploaded(self) -> list[str]:
        return self._uploader.uploaded if self._uploader is not None else []

    @property
    def failures(self) -> int:
        return self._uploader.failures if self._uploader is not None else 0

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        session = session_of(trainer, self.dirpath, "BackupToS3")
        session.join(self)
        self._session = session
        added = session.add_backups([self.location], uploading=trainer.is_global_zero)
        if added:
            self._uploader = added[0]
            self._uploader.flush_timeout_s = self.flush_timeout_s

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        session, self._session = getattr(self, "_session", None), None
        if session is not None:
            session.leave(self)
