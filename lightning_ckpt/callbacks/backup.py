"""BackupToS3: after each local commit, upload the checkpoint to S3 in the background, with retries."""
from __future__ import annotations

import logging
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from .base import folder_key, require_shared

log = logging.getLogger("lightning_ckpt")


class BackupToS3(Callback):
    """Mirror every checkpoint committed in ``dirpath`` to ``uri`` (``s3://bucket/prefix``). The saving callbacks'
    ``backup_uri`` argument does the same (with several locations and full retention rules); this callback adds a
    location to saving callbacks you do not configure yourself.

    Uploads run in a background thread on rank 0 after the local commit: objects first, ``manifest.json`` last, then
    ``latest.json`` (see :func:`lightning_ckpt.storage.s3.push_checkpoint`), so a partial upload is never seen as a
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
        from ..storage.s3 import parse_s3_uri

        parse_s3_uri(uri)
        if keep_last is not None and (not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1):
            raise ValueError(f"keep_last={keep_last!r} is invalid; it must be a positive integer or None")
        for name, v in (("max_retry_s", max_retry_s), ("flush_timeout_s", flush_timeout_s)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}={v!r} is invalid; it must be a positive number of seconds")
        self.dirpath = folder_key(dirpath)
        self.uri = uri.rstrip("/")
        self.keep_last = keep_last
        self.max_retry_s = float(max_retry_s)
        self.flush_timeout_s = float(flush_timeout_s)
        self.required = bool(required)
        self._uploader: Any = None
        self._shared: Any = None
        self._hooks: list = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=self.dirpath, uri=self.uri)

    @property
    def uploaded(self) -> list[str]:
        return self._uploader.uploaded if self._uploader is not None else []

    @property
    def failures(self) -> int:
        return self._uploader.failures if self._uploader is not None else 0

    # ------------------------------------------------------------ lifecycle
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        from ..backups import BackupLocation, Uploader
        from ..policy.retention import RetentionRules
        from .base import attach_uploader

        shared = require_shared(trainer, self.dirpath, "BackupToS3")
        if not trainer.is_global_zero:
            return
        loc = BackupLocation(self.uri, RetentionRules(keep_last=self.keep_last), self.required, self.max_retry_s)
        self._uploader, self._shared = Uploader(loc, shared.dirpath), shared
        self._hooks = attach_uploader(shared, self._uploader, self.flush_timeout_s)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        for lst, fn in getattr(self, "_hooks", []):
            if fn in lst:
                lst.remove(fn)
        self._hooks = []
        self._shared = None
        if self._uploader is not None:
            self._uploader.stop()
