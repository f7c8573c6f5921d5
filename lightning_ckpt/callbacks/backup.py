"""BackupToS3: after each local commit, upload the checkpoint to S3 in the background, with retries."""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from .base import require_shared

log = logging.getLogger("lightning_ckpt")


class BackupToS3(Callback):
    """Mirror every checkpoint committed in ``dirpath`` to ``uri`` (``s3://bucket/prefix``).

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
        self.dirpath = os.path.abspath(os.fspath(dirpath))
        self.uri = uri.rstrip("/")
        self.keep_last = keep_last
        self.max_retry_s = float(max_retry_s)
        self.flush_timeout_s = float(flush_timeout_s)
        self.required = bool(required)
        self.uploaded: list[str] = []
        self.failures = 0
        self._queue: "queue.Queue[Optional[str]]" = queue.Queue()
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=self.dirpath, uri=self.uri)

    # ------------------------------------------------------------ lifecycle
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        shared = require_shared(trainer, self.dirpath, "BackupToS3")
        if not trainer.is_global_zero:
            return
        shared.writer.on_commit.append(self._enqueue)
        shared.protectors.append(self._protect)
        shared.end_hooks.append(self._flush)
        self._shared = shared
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="lightning_ckpt-backup", daemon=True)
        self._thread.start()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        shared = getattr(self, "_shared", None)
        if shared is not None:
            for lst, fn in ((shared.writer.on_commit, self._enqueue), (shared.protectors, self._protect),
                            (shared.end_hooks, self._flush)):
                if fn in lst:
                    lst.remove(fn)
            self._shared = None
        if self._thread is not None:
            self._stop.set()
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None

    # ------------------------------------------------------------ uploads
    def _protect(self) -> set[str]:
        with self._lock:
            return set(self._pending)

    def _enqueue(self, result: Any) -> None:
        with self._lock:
            self._pending.add(result.name)
        self._queue.put(result.path)

    def _run(self) -> None:
        from ..storage.s3 import push_checkpoint

        while not self._stop.is_set():
            path = self._queue.get()
            if path is None:
                break
            delay = 1.0
            while not self._stop.is_set():
                if not os.path.isdir(path):  # deleted locally (e.g. replaced): nothing to upload any more
                    break
                try:
                    push_checkpoint(path, self.uri, verify=True)
                    self.uploaded.append(os.path.basename(path))
                    log.info("lightning_ckpt: backed up %s to %s", path, self.uri)
                    self._apply_retention()
                    break
                except Exception as e:  # noqa: BLE001 - an outage must not stop training; retry later
                    self.failures += 1
                    log.warning("lightning_ckpt: upload of %s to %s failed (%r); retrying in %.0fs", path, self.uri, e, delay)
                    self._stop.wait(delay)
                    delay = min(self.max_retry_s, delay * 2)
            with self._lock:
                self._pending.discard(os.path.basename(path))
            self._queue.task_done()

    def _apply_retention(self) -> None:
        if self.keep_last is None:
            return
        from ..storage.s3 import delete_remote, remote_steps

        for _, name in remote_steps(self.uri)[self.keep_last :]:
            delete_remote(self.uri, name)

    def _flush(self, trainer: "pl.Trainer") -> None:
        """End of fit: give queued uploads ``flush_timeout_s`` to finish."""
        deadline = time.monotonic() + self.flush_timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    return
            time.sleep(0.2)
        with self._lock:
            left = sorted(self._pending)
        msg = f"checkpoints not backed up to {self.uri} within flush_timeout_s={self.flush_timeout_s:g}: {left}"
        if self.required:
            from ..errors import CheckpointWriteError

            raise CheckpointWriteError(msg + "; they are intact locally, push them with `lightning-ckpt push`")
        log.error("lightning_ckpt: %s (intact locally; `lightning-ckpt push` uploads them later)", msg)
