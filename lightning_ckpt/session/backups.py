"""Backup locations: after each local commit, upload the checkpoint to S3 in the background, with retries and the
location's own retention.

A location is ``"s3://bucket/prefix"`` or a dict with ``uri`` and retention rules of its own (the rules of
:class:`~lightning_ckpt.RetentionPolicy`, plus ``keep_tags``), for example keep 2 locally and every best on S3::

    PeriodicCheckpoint("ckpts/", every_n_train_steps=500,
                       backup_uri=[{"uri": "s3://bucket/run1", "keep_last": 3, "keep_tags": ["best"]}])

Uploads run on rank 0 (the checkpoint folder is shared by the ranks), one thread per location, in commit order.
Objects go up first, ``manifest.json`` last, then ``latest.json`` (:func:`lightning_ckpt.folder.transfer.push_checkpoint`),
so an interrupted upload is never seen as a checkpoint. A failed upload is logged and retried with exponential backoff
(the server may be down for a while); training goes on unless the location is ``required``. A local checkpoint that
fails verification is reported and skipped (it is never uploaded, and it never holds back the uploads after it).
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..errors import CheckpointCorruptError, CheckpointNotFoundError
from ..policy.retention import RetentionRules
from ..folder import Folder, Plan
from ..folder.transfer import push_checkpoint, remote_location
from ..read import ANY_RUN, list_checkpoints
from ..store import LocalStore
from ..writer.meta import background_priority
from ..writer.options import check_bool, check_seconds

log = logging.getLogger("lightning_ckpt")

_RULE_KEYS = ("keep_last", "keep_best", "monitor", "mode", "keep_every_n_steps", "max_total_bytes", "keep_tags")


@dataclass(frozen=True)
class BackupLocation:
    """One place checkpoints are copied to, with its own retention (no rule: keep everything)."""

    uri: str
    rules: RetentionRules = field(default_factory=RetentionRules)
    required: bool = False
    max_retry_s: float = 60.0  # the longest wait between two tries of a failed upload

    @property
    def prunes(self) -> bool:
        return self.rules.has_keep_rule or self.rules.max_total_bytes is not None


def parse_locations(spec: Any, what: str = "backup_uri") -> list[BackupLocation]:
    """``"s3://b/p"``, ``{"uri": "s3://b/p", "keep_last": 2, ...}`` or a list of them -> locations (validated)."""
    if spec is None:
        return []
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    out: list[BackupLocation] = []
    for item in items:
        if isinstance(item, BackupLocation):
            out.append(item)
            continue
        if isinstance(item, str):
            out.append(BackupLocation(_remote_uri(item, what)))
            continue
        if not isinstance(item, dict) or "uri" not in item:
            raise ValueError(
                f"{what} entry {item!r} is invalid; give 's3://bucket/prefix' or a dict such as "
                "{'uri': 's3://bucket/prefix', 'keep_last': 3}"
            )
        unknown = sorted(set(item) - set(_RULE_KEYS) - {"uri", "required", "max_retry_s"})
        if unknown:
            raise ValueError(f"{what} entry for {item['uri']!r} has unknown keys {unknown}; allowed: uri, required, "
                             f"max_retry_s, {', '.join(_RULE_KEYS)}")
        retry = check_seconds("max_retry_s", item.get("max_retry_s", 60.0))
        required = check_bool("required", item.get("required", False))
        uri = _remote_uri(item["uri"], what)
        kw = {k: item[k] for k in _RULE_KEYS if k in item}
        if "keep_tags" in kw:
            tags = kw["keep_tags"]
            if isinstance(tags, str) or not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) and t for t in tags):
                raise ValueError(f"keep_tags={tags!r} is invalid; give a list of tags such as ['best', 'preempt']")
            kw["keep_tags"] = tuple(tags)
        out.append(BackupLocation(uri, RetentionRules(**kw), required, retry))
    seen = set()
    for loc in out:
        if loc.uri in seen:
            raise ValueError(f"{what} names {loc.uri} twice; give each location once")
        seen.add(loc.uri)
    return out


def _remote_uri(uri: Any, what: str) -> str:
    """The URI of a remote location (validated: a bucket and a prefix), without a trailing slash."""
    return remote_location(uri, what).uri


class Uploader:
    """Uploads committed checkpoints of ``dirpath`` to one location, in a background thread, in commit order.

    Args:
        location: where to, the location's retention, and the longest wait between two tries of a failed upload.
        dirpath: the local folder the checkpoints are committed in.
        protect: callable -> names never to delete at the location (best-k, the checkpoint resumed from, ...).
        primary: the location is the run's ``dirpath`` (an ``s3://`` dirpath): the local copy is only a staging copy,
            removed once uploaded, and deletions asked by the callbacks apply to the location.
    """

    def __init__(self, location: BackupLocation, dirpath: str, *, protect: Optional[Callable[[], set]] = None,
                 primary: bool = False) -> None:
        self.location = location
        self.uri = location.uri
        # the location (its retention planned and applied there: a backup copy needs only the newest of each run;
        # the run's own s3:// dirpath everything a run needs) and the local folder the checkpoints come from
        self.folder = Folder(location.uri, copy=not primary)
        self.store = self.folder.store
        self.dirpath = dirpath
        self.local = LocalStore(dirpath)
        self.staging = Folder(self.local)  # a primary location's local copies: removed once uploaded
        self.max_retry_s = location.max_retry_s
        self.protect_fn = protect
        self.primary = primary
        self.extra_rules: list[RetentionRules] = []  # RetentionPolicy callbacks on an s3:// dirpath
        self.orphan_age_s = 3600.0  # objects without a manifest untouched this long are debris of a crash
        self.pushed_packs: set[str] = set()  # packs this uploader sent (collected without the grace period)
        self.run_name: Any = ANY_RUN  # the run whose checkpoints its retention ranks (the session sets it)
        self.uploaded: list[str] = []
        self.deleted: list[str] = []
        self.skipped: list[str] = []  # local checkpoints that failed verification: never uploaded
        self.failures = 0
        self.last_error: Optional[BaseException] = None
        self.failing_since: Optional[float] = None  # monotonic time of the first failure since the last success
        self.give_up_after_s = 120.0  # the end of fit stops waiting once uploads failed for this long without success
        self.flush_timeout_s = 600.0  # how long the end of fit waits for the queued uploads
        self._queue: "queue.Queue[Optional[tuple[str, str]]]" = queue.Queue()
        self._pending: set[str] = set()
        self._lock = threading.Condition()  # notified when an upload leaves _pending (flush waits on it)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self.store.hold_listing()  # the location's listing is kept in memory while this uploader runs (store/s3listing.py)
        self._thread = threading.Thread(target=self._run, name="lightning_ckpt-upload", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout=timeout)
        self._thread = None
        self.store.release_listing()

    # ------------------------------------------------------------ queueing
    def pending(self) -> set[str]:
        with self._lock:
            return set(self._pending)

    def enqueue(self, path: str) -> None:
        name = os.path.basename(os.path.normpath(path))
        with self._lock:
            self._pending.add(name)
        self._queue.put(("upload", path))

    def enqueue_delete(self, name: str) -> None:
        """Delete ``name`` at the location after the uploads queued before it (the replacement is up first)."""
        self._queue.put(("delete", name))

    def catch_up(self) -> None:
        """Queue the local checkpoints newer than the newest one at the location (a crash cut their upload short)."""
        try:  # one LIST (kept for the next saves) and one GET (latest.json): no manifest reads
            self.store.listing_stale()
            names = set(self.store.names())
            newest = self.store.latest_step() if names else -1
        except Exception as e:  # noqa: BLE001 - the server may be down; the next commit tries again
            log.warning("lightning_ckpt: cannot list %s (%r); skipping the upload catch-up", self.uri, e)
            return
        try:
            for name in self.store.cleanup(older_than_s=self.orphan_age_s):
                log.info("lightning_ckpt: removed %s/%s, left without a manifest by an interrupted upload", self.uri, name)
        except Exception as e:  # noqa: BLE001 - cleaning up is best effort
            log.warning("lightning_ckpt: could not clean up interrupted uploads in %s (%r)", self.uri, e)
        for c in list_checkpoints(self.dirpath):
            if c.step > newest and c.name not in names:
                log.info("lightning_ckpt: %s was committed but not uploaded to %s; uploading it now", c.path, self.uri)
                self.enqueue(c.path)

    def flush(self, timeout_s: float) -> list[str]:
        """Wait up to ``timeout_s`` for the queued uploads; returns the names still not uploaded. Stops waiting early
        when uploads have failed for ``give_up_after_s`` without one success (the location is unreachable)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._thread is None:
                break
            failing = self.failing_since
            if failing is not None and time.monotonic() - failing > self.give_up_after_s:
                log.error("lightning_ckpt: uploads to %s have failed for %.0fs (%r); not waiting for them any longer",
                          self.uri, time.monotonic() - failing, self.last_error)
                break
            with self._lock:
                if not self._pending:
                    return []
                self._lock.wait(min(0.5, max(0.0, deadline - time.monotonic())))  # woken by each finished upload
        with self._lock:
            return sorted(self._pending)

    # ------------------------------------------------------------ the thread
    def _run(self) -> None:
        background_priority()
        while not self._stop.is_set():
            item = self._queue.get()
            if item is None:
                break
            op, arg = item
            try:
                if op == "upload":
                    self._upload(arg)
                else:
                    self._delete([arg], "deleted by a callback of the run")
            except Exception as e:  # noqa: BLE001 - a bug here must not kill the thread
                log.error("lightning_ckpt: backup to %s: %r", self.uri, e)
            finally:
                self._queue.task_done()

    def _upload(self, path: str) -> None:
        name = os.path.basename(os.path.normpath(path))
        delay = 1.0
        try:
            while not self._stop.is_set():
                if not os.path.isdir(path):  # deleted locally (e.g. replaced): nothing to upload any more
                    return
                try:
                    sent = push_checkpoint(path, self.uri, verify=True)
                    self.pushed_packs.update(sent.packs)
                except (CheckpointCorruptError, CheckpointNotFoundError) as e:
                    # the local copy is bad (or gone): retrying cannot help, and it must not hold back the next ones
                    self.skipped.append(name)
                    self.last_error = e
                    log.error("lightning_ckpt: not uploading %s to %s: it failed verification (%s). The checkpoints "
                              "after it are uploaded as usual.", path, self.uri, e)
                    return
                except Exception as e:  # noqa: BLE001 - an outage must not stop training; retry later
                    self.failures += 1
                    self.last_error = e
                    if self.failing_since is None:
                        self.failing_since = time.monotonic()
                    log.warning("lightning_ckpt: upload of %s to %s failed (%r); retrying in %.0fs", path, self.uri, e, delay)
                    self._stop.wait(delay)
                    delay = min(self.max_retry_s, delay * 2)
                    continue
                self.uploaded.append(name)
                self.failing_since = None
                log.info("lightning_ckpt: backed up %s to %s", path, self.uri)
                if self.primary:  # dirpath is this location: the local copy was only staging
                    self.staging.apply(Plan([], {name: "uploaded"}))
                self._apply_retention()
                return
        finally:
            with self._lock:
                self._pending.discard(name)
                self._lock.notify_all()

    def _protected(self) -> set[str]:
        names = self.pending()
        if self.protect_fn is not None:
            try:
                names |= set(self.protect_fn())
            except Exception as e:  # noqa: BLE001
                log.error("lightning_ckpt: protector failed: %r", e)
        return names

    @property
    def run_name(self) -> Any:
        return self.folder.run_name

    @run_name.setter
    def run_name(self, name: Any) -> None:
        self.folder.run_name = name

    @property
    def sweep_every(self) -> int:
        """Deletion passes that orphaned no pack between two collections of the whole location."""
        return self.folder.sweep_every

    @sweep_every.setter
    def sweep_every(self, n: int) -> None:
        self.folder.sweep_every = n

    def _apply_retention(self) -> None:
        rule_sets = ([self.location.rules] if self.location.prunes else []) + list(self.extra_rules)
        if not rule_sets:
            return
        try:
            ckpts = self.folder.checkpoints()  # from memory while this uploader holds the location
        except Exception as e:  # noqa: BLE001
            log.warning("lightning_ckpt: cannot list %s for retention (%r); trying again after the next upload", self.uri, e)
            return
        try:  # several rule sets on one location: a checkpoint kept by any of them stays; what any run of the
            # location needs stays there (a backup copy: the newest of each run; the run's own s3:// dirpath: the
            # best and every resume and branch point too), and what the run protects (uploads pending, best-k)
            plan = self.folder.plan(rule_sets, ckpts=ckpts, protect=self._protected())
        except ValueError as e:  # a rule ranks by a metric no checkpoint recorded: delete nothing
            log.warning("lightning_ckpt: retention of %s deletes nothing: %s", self.uri, e)
            return
        if plan.doomed:
            self._delete(plan.names, "retention", set(plan.protected), ckpts)

    def _delete(self, names: list[str], reason: str, protected: Optional[set] = None,
                ckpts: Optional[list] = None) -> None:
        try:  # (the listing is from memory while the location is held: store/s3listing.py)
            if ckpts is None:
                ckpts = self.folder.checkpoints()
            if protected is None:  # a deletion asked by the run (best-k): what any run of the location needs stays
                protected = self._protected() | set(self.folder.needed(ckpts))
        except Exception as e:  # noqa: BLE001 - cannot tell what is needed there: delete nothing now
            log.warning("lightning_ckpt: cannot list %s (%r); not deleting %s now", self.uri, e, ", ".join(names))
            return
        held = self.store.listing_held()  # else the listing is not the location's for sure: collect the whole location
        # the packs of what is deleted, known before the deletion (None: one is unknown, collect the whole location)
        doomed = [n for n in names if n not in protected]
        freed = self.folder.packs_of(doomed) if held or not doomed else None

        def deleted(name: str) -> None:
            self.deleted.append(name)
            log.info("lightning_ckpt: deleted %s/%s (%s)", self.uri, name, reason)

        def gone(name: str) -> None:  # nothing there: the kept listing was wrong
            self.store.listing_stale()
            deleted(name)

        def failed(name: str, e: Exception) -> None:  # tried again at the next retention pass
            log.warning("lightning_ckpt: could not delete %s/%s (%r)", self.uri, name, e)

        self.folder.delete(names, protected=protected, on_deleted=deleted, on_gone=gone, on_error=failed)
        removed = self.folder.collect(freed, mine=self.pushed_packs, listed=held)
        self.pushed_packs.difference_update(removed)


def staging_dir(uri: str) -> str:
    """The local folder where saves into an ``s3://`` dirpath are written before their upload:
    ``$LIGHTNING_CKPT_STAGING/<hash of the URI>``, default under the system temp folder. Every rank of a node derives
    the same folder from the URI."""
    root = os.environ.get("LIGHTNING_CKPT_STAGING") or os.path.join(tempfile.gettempdir(), "lightning_ckpt-staging")
    return os.path.join(root, hashlib.sha1(uri.encode()).hexdigest()[:16])
