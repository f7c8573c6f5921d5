"""The session of one checkpoint folder during one ``fit``: everything the callbacks on that folder share. No Lightning.

Who takes part is explicit: every callback that uses the folder ``join``s it as a :class:`Participant` (saving
callbacks, retention, backups, export). The session owns the folder's writer and lock, collects the save requests of
one training hook and writes them once (``arrive``/``flush``), knows which checkpoints must never be deleted
(``protected``), deletes through the store (``delete``), runs the steps after each commit in a fixed order
(``_after_commit``: history, uploads, participants, retention) and at the end of fit (``finish``). Where a fit starts is decided by
``session.start.decide``, which the callbacks call.

Which rank does what: every rank builds the session, opens it (collective) and saves (collective); the folder's
leader (rank 0, or each node-local folder's lowest rank) holds the lock, commits, and runs the after-commit steps;
rank 0 uploads.

What only a Lightning fit has (the step plan, the resume record and RNG states to put back, the inexact-resume
warnings, the undo handles of what the callbacks hook into Lightning) is not here: it is the callbacks'
``callbacks.context.FolderFit``. A save tells its context what it recorded about resuming (``resume_noted``).
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import time
import uuid
from typing import Any, Iterable, Optional

from ..errors import CheckpointError, CheckpointWriteError
from ..policy.retention import RetentionRules
from ..store import is_remote
from ..folder import Folder
from ..folder.history import HISTORY, append_history, history_line
from ..folder.lineage import start_lineage
from ..folder.needed import hold_resume_point, record_failed_run, release_resume_point, settle_resumed
from ..writer import CheckpointWriter
from ..writer import SaveResult
from .backups import BackupLocation, Uploader
from .options import FOLDER_OPTIONS, SaveOptions
from .deleting import Deleting
from .backups import staging_dir  # noqa: F401 - re-exported: where saves into an s3:// dirpath are staged
from .state import SaveContext, SaveRequest, checkpoint_of, group_requests, kind_of  # noqa: F401

log = logging.getLogger("lightning_ckpt")


class Participant:
    """Something that takes part in a folder's session. Override what applies; the defaults do nothing."""

    saves: bool = False  # a saving callback: the session waits for it at every hook before it writes

    def protect(self) -> set[str]:
        """Names of checkpoints that must not be deleted now (a current best-k, ...)."""
        return set()

    def after_commit(self, result: SaveResult) -> None:
        """Runs in the committing thread of the folder's leader after each commit."""

    def at_end(self, session: "FolderSession", context: Any) -> None:
        """Runs on every rank when fit ends, after the last commit (``context``: what the caller passed to ``finish``,
        the Trainer for the callbacks)."""


class FolderSession(Deleting):
    """Everything the callbacks of one ``fit`` share for one folder (``key``: an absolute path or an ``s3://`` URI)."""

    def __init__(self, key: str, options: SaveOptions) -> None:
        self.key = key
        # the one place a session asks what its location is: an s3:// folder is written into a local staging folder
        # and uploaded there (the location's uploader is the primary, see session/backups.py)
        self.staged_for: Optional[str] = key if is_remote(key) else None
        self.dirpath = staging_dir(key) if self.staged_for else key  # where the writer commits
        self.options = options
        self.writer = CheckpointWriter(
            self.dirpath, async_save=options.async_save, name_template=options.name_template, if_busy=options.if_busy,
            fsync=options.fsync, auto_seal=False, mode=options.distributed, timeout_s=options.save_timeout_s,
            dedup=options.dedup)
        self.writer.on_commit.append(self._after_commit)
        self.store = self.writer.store
        self.folder = Folder(self.store, run_name=options.run_name)  # records, protections, retention, collection
        self.participants: list[Participant] = []
        self.retention: list[tuple[Any, RetentionRules]] = []  # (owner, rules): a checkpoint stays if any set keeps it
        self.uploaders: dict[str, Uploader] = {}  # uri -> uploader (rank 0 runs them)
        self.requests: list[SaveRequest] = []
        self._arrived: dict[str, set[int]] = {}
        self.run_id = uuid.uuid4().hex[:12]
        self.last_saved_step: Optional[int] = None
        self.last_save_time = time.monotonic()
        self.last_save_tags: set = set()
        self.last_stall_s: Optional[float] = None
        self.stalls: dict[int, float] = {}  # step -> training stall of its save (seconds)
        self.committed: list[SaveResult] = []  # commits not yet reported to the loggers
        self._resumed_from: Optional[str] = None
        self._holds = False  # a "running" note says what this run resumed from (for deletions in other processes)
        self.branched = False  # resumed_from is a branch point (resume_from=): a new run, even in this folder
        self._lineage: Optional[dict] = None
        self.on_save_error: Optional[str] = options.on_save_error
        self.save_errors: list[CheckpointError] = []
        self.deleted: list[str] = []
        self.retention_deleted: list[str] = []
        self.lock: Any = None
        self.uploading = False  # this rank runs the uploads (rank 0)
        self._deleter = cf.ThreadPoolExecutor(1, thread_name_prefix="lightning_ckpt-delete")
        # one line per save, deletion, early stop and best-weights restore (the callbacks print it on rank 0 with
        # verbose=True, as Lightning's callbacks do; by default it goes to this package's logger only)
        self.announce: Any = lambda msg: log.info("%s", msg)
        # outside observers (callbacks/ray.py): on_save(pending) on every rank, in the training thread, for each save
        # started; reporters' report(context) at each step boundary after the seal and at the end of fit
        self.on_save: list = []
        self.reporters: list = []

    # ------------------------------------------------------------------ set-up
    def open(self) -> None:
        """Every rank, once (collective): create the folder, find which ranks share it, take its lock on the folder's
        leader and remove what interrupted saves left. Raises on every rank when any rank failed."""
        w = self.writer
        w.prepare_dir()
        w.detect_folders(every_folder=self.staged_for is None)
        mine: Optional[CheckpointError] = None
        if w.is_leader and w.folder_written:
            try:
                self.lock = self.store.lock({"run_id": self.run_id})
                # holding the lock, this run alone writes here: every partial entry is debris. With locks disabled
                # (LIGHTNING_CKPT_LOCK=0) only those of writers that are gone: the lock no longer waits, but a live
                # writer's save is still never taken
                self.store.cleanup(everyone=self.lock.held)
            except CheckpointError as e:
                mine = e
        error = w.agree(None if mine is None else str(mine))
        if error is not None:
            self.close()
            raise mine if mine is not None else CheckpointWriteError(error)

    @property
    def resumed_from(self) -> Optional[str]:
        """The checkpoint this fit resumed or branched from (None: a fresh start)."""
        return self._resumed_from

    @resumed_from.setter
    def resumed_from(self, path: Optional[str]) -> None:
        self._resumed_from = path
        w = self.writer
        if path and not self.staged_for and w.is_leader and w.folder_written:
            try:  # a run noted as failed that this one resumes or branches from is not failed any more
                settle_resumed(self.dirpath, path, self.run_id)
                self._holds = hold_resume_point(self.dirpath, path, self.run_id) or self._holds
            except (CheckpointError, OSError) as e:
                log.error("lightning_ckpt: could not update the failed-run note of %s: %s", path, e)

    def join(self, participant: Participant, options: Optional[SaveOptions] = None) -> None:
        """Add a participant; a saving one brings its options, which must agree with the folder's."""
        if options is not None:
            mine, theirs = options.folder_settings(), self.options.folder_settings()
            if mine != theirs:
                diff = [f"{n}: {a!r} vs {b!r}" for n, a, b in zip(FOLDER_OPTIONS, theirs, mine) if a != b]
                raise ValueError(f"callbacks saving into {self.key} disagree on {'; '.join(diff)}. Callbacks on one "
                                 "folder share one writer; give them the same settings.")
            if options.on_save_error is not None:
                if self.on_save_error not in (None, options.on_save_error):
                    raise ValueError(f"callbacks saving into {self.key} disagree on on_save_error "
                                     f"({self.on_save_error!r} vs {options.on_save_error!r}); set it the same on each")
                self.on_save_error = options.on_save_error
            self.writer.fsync = self.store.fsync = self.writer.fsync or options.fsync  # the stronger durability wins
        if participant not in self.participants:
            self.participants.append(participant)

    def leave(self, participant: Participant) -> bool:
        """Remove a participant; True when no saving one is left (the caller then closes the session)."""
        if participant in self.participants:
            self.participants.remove(participant)
        self.retention = [(o, r) for o, r in self.retention if o is not participant]
        return participant.saves and not self.saving

    def add_backups(self, locations: Iterable[BackupLocation], uploading: bool) -> list[Uploader]:
        """Upload every commit of the folder to these locations (rank 0 runs the uploads). An ``s3://`` dirpath is
        itself the first, required location. Returns the uploaders added."""
        locs = list(locations)
        if self.staged_for and self.staged_for not in self.uploaders:
            locs.insert(0, BackupLocation(self.staged_for, required=True))
        added = []
        for loc in locs:
            up = self.uploaders.get(loc.uri)
            if up is not None:
                if up.location != loc and loc.uri != self.staged_for:
                    raise ValueError(f"callbacks saving into {self.key} give {loc.uri} different retention rules; "
                                     "give it once, or the same rules on each")
                continue
            primary = loc.uri == self.staged_for  # the run's own folder: the callbacks' protections hold there too
            up = Uploader(loc, self.dirpath, protect=self.protected if primary else None, primary=primary)
            up.run_name = self.options.run_name
            self.uploaders[loc.uri] = up
            added.append(up)
            if uploading:
                self.uploading = True
                up.start()
                up.catch_up()
        return added

    def add_retention(self, owner: Any, rules: RetentionRules) -> None:
        """Prune the folder after each commit (an ``s3://`` dirpath: the location, after each upload)."""
        self.retention.append((owner, rules))
        if self.primary is not None:
            self.primary.extra_rules.append(rules)

    @property
    def primary(self) -> Optional[Uploader]:
        """The uploader of an ``s3://`` dirpath, else None."""
        return self.uploaders.get(self.staged_for) if self.staged_for else None

    # ------------------------------------------------------------------ saving
    @property
    def saving(self) -> list[Participant]:
        return [p for p in self.participants if p.saves]

    def arrive(self, participant: Participant, hook: str) -> bool:
        """A saving participant has seen ``hook``; True for the last of them (the session may act for them all now).
        Lightning calls every callback's hook before the next hook, so this does not depend on the callbacks' order."""
        seen = self._arrived.setdefault(hook, set())
        seen.add(id(participant))
        if all(id(p) in seen for p in self.saving):
            del self._arrived[hook]
            return True
        return False

    @property
    def urgent(self) -> bool:
        """A request of this hook must be committed before the hook returns (a preemption)."""
        return any(r.urgent for r in self.requests)

    def request(self, req: SaveRequest) -> None:
        self.requests.append(req)

    def flush(self, ctx: SaveContext, after: bool = False, keep: bool = False) -> None:
        """Write what this training step requested: one checkpoint per kind of content, every tag on it. ``after``:
        past the step's end: add the tags to its save (none: save now, recorded as not exact). ``keep``: the step goes
        on: keep the requests, do not commit (the step's end replaces this save)."""
        requests, self.requests = list(self.requests), (self.requests if keep else [])
        if not requests:
            return
        urgent = any(r.urgent for r in requests)
        sync = any(r.sync for r in requests)
        w = self.writer
        step = int(ctx.step)
        metrics = ctx.metrics()
        for group, tags in group_requests(requests).items():
            kind, pending = kind_of(group), w.pending
            if pending is not None and pending.step == step and (after or "final" in tags) and w.merge(step, tags, metrics, kind):
                continue  # a later hook of the step adds its tags to the step's save
            if self.last_saved_step == step and pending is None and (after or tags <= self.last_save_tags | {"final"}):
                continue  # already committed at this step (e.g. the step we resumed from)
            if pending is not None and pending.step == step and pending.kind == kind:
                tags = tags | set(pending.tags)
                w.abandon()  # replaced by a newer state of the same step
            self._save(ctx, group, tags, metrics, "final" in tags, sync, after, warn=not keep)
        if urgent and not keep:  # the process may end right after this hook (SIGTERM): commit now
            self.wait(raise_errors=False)

    def _save(self, ctx: SaveContext, group: tuple, tags: set, metrics: dict, final: bool, sync: bool,
              after: bool = False, warn: bool = True) -> None:
        t0 = time.perf_counter()
        w = self.writer
        if w.if_busy == "skip" and w.world_size > 1 and not final:
            # every rank must skip the same saves (a save is a collective): skip if any rank is still writing
            if ctx.any_rank(w.writing_sealed):
                log.warning("lightning_ckpt: save at step %s skipped: a rank is still writing the previous one", ctx.step)
                return
        checkpoint, summary = checkpoint_of(ctx, group, after)
        noted = getattr(ctx, "resume_noted", None)  # the caller's: warn about a resume that would not be exact
        if callable(noted):
            noted(summary, now=warn, speaks=w.rank == 0)
        self.guard(w.raise_if_failed)  # an earlier background save failed
        pending = self.guard(
            w.save, checkpoint, step=int(ctx.step), epoch=int(ctx.epoch), tags=tags, metrics=metrics,
            hparams=ctx.hparams(), kind=kind_of(group).value,
            meta={"resumed_from": self.resumed_from, "run_id": self.run_id, "lineage": self.lineage(),
                  "best_rule": self.best_rules(),
                  "include": list(group[1]), "exclude": list(group[2]),
                  **({"resume": summary} if summary is not None else {})},
            if_busy="wait" if final else None,  # the end of fit is never skipped
            sync=sync,
            stable=ctx.stable_keys() if w.dedup is not None else (),
        )
        if pending is None:
            return
        for hook in self.on_save:
            hook(pending)
        self.last_stall_s = time.perf_counter() - t0
        self.stalls[int(ctx.step)] = self.last_stall_s
        self.last_saved_step = int(ctx.step)
        self.last_save_tags = set(tags)
        self.last_save_time = time.monotonic()

    @property
    def run_name(self) -> Optional[str]:
        """The run this session writes in a folder several runs may share (None: the folder's main line)."""
        return self.options.run_name

    def best_rules(self) -> list[dict]:
        """The rules of the participants that rank checkpoints (``best_rule``: monitor, mode, top_k), recorded in
        every manifest so that ``ckpt_path="best"`` and ``lightning-ckpt ls`` can rank from the manifests alone."""
        return [r for r in (getattr(p, "best_rule", None) for p in self.participants) if isinstance(r, dict)]

    def lineage(self) -> dict:
        """The run this session's checkpoints belong to and where it came from (see ``tools/lineage.start_lineage``)."""
        if self._lineage is None:
            self._lineage = start_lineage(self.resumed_from, self.dirpath, staged=bool(self.staged_for),
                                          branched=self.branched, run_name=self.options.run_name)
        return self._lineage

    def guard(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a writer call; with ``on_save_error="continue"`` a failed save is logged and training goes on."""
        try:
            return fn(*args, **kwargs)
        except CheckpointError as e:
            if self.on_save_error != "continue":
                raise
            self.save_errors.append(e)
            log.error("lightning_ckpt: a save failed and training continues (on_save_error='continue'): %s", e)
            return None

    def wait(self, raise_errors: bool) -> None:
        """Seal and wait for the save in flight; its error is raised, or only logged."""
        try:
            self.writer.wait()
        except CheckpointError as e:
            if raise_errors:
                raise
            log.error("lightning_ckpt: a background save failed: %s", e)

    # ------------------------------------------------------------------ after each commit (folder leader)
    def _after_commit(self, res: SaveResult) -> None:
        """In the committing thread: the run's metric history, the uploads, the participants, then retention."""
        self.committed.append(res)
        try:
            append_history(self.dirpath, history_line(res.step, res.name, res.tags, res.metrics))
        except (OSError, ValueError) as e:
            log.error("lightning_ckpt: could not append to %s: %s", HISTORY, e)
        stall = self.stalls.get(res.step)
        self.announce(f"lightning_ckpt: saved {res.path if not self.staged_for else self.staged_for + '/' + res.name} (step "
                      f"{res.step}" + (f", {', '.join(res.tags)}" if res.tags else "") + f"; {res.bytes / 1e6:.1f} MB written"
                      + (f", training paused {stall:.2f} s" if stall is not None else "") + ")")
        if self.uploading:
            for up in self.uploaders.values():
                up.enqueue(res.path)
        for p in list(self.participants):
            try:
                p.after_commit(res)
            except Exception as e:  # noqa: BLE001 - never fail a committed save
                log.error("lightning_ckpt: %s failed after the commit of %s: %r", type(p).__name__, res.name, e)
        if self.retention and self.primary is None:
            self.apply_retention(res.name)

    # ------------------------------------------------------------------ end
    def finish(self, context: Any = None) -> None:
        """Every rank, after the last commit of fit: the uploads' last wait, then the participants' end steps."""
        for up in self.uploaders.values() if self.uploading else ():
            left = up.flush(up.flush_timeout_s)
            if not left:
                continue
            msg = f"checkpoints not uploaded to {up.uri} by the end of fit: {left} (last error: {up.last_error!r})"
            if up.location.required:
                raise CheckpointWriteError(f"{msg}; they are intact locally in {self.dirpath}: upload them with "
                                           f"`lightning-ckpt push {self.dirpath}/<name> {up.uri}`, or relaunch (the "
                                           "upload resumes)")
            log.error("lightning_ckpt: %s. They are intact locally; the next run (or `lightning-ckpt push`) uploads "
                      "them", msg)
        for p in list(self.participants):
            p.at_end(self, context)

    def record_failure(self, exception: BaseException) -> None:
        """Each folder's leader: note that this run ended in an exception (``lightning-ckpt prune --failed``)."""
        w = self.writer
        if not (w.is_leader and w.folder_written) or not w.committed_names:
            return  # nothing committed: nothing for prune --failed to remove
        if isinstance(exception, SystemExit) and exception.code in (0, None):
            return  # a stop that was asked for (Ray Tune pausing or ending a trial at a report), not a failure
        try:
            record_failed_run(self.dirpath, self.run_id, repr(exception), time.time())
        except (CheckpointError, OSError) as e:
            log.error("lightning_ckpt: could not record the failed run: %s", e)

    def close(self) -> None:
        """Every rank, once fit is over: wait for the writer, stop the threads, release the lock."""
        try:
            self.writer.close()
        except CheckpointError as e:  # already reported at the end of fit or in on_exception
            log.error("lightning_ckpt: %s", e)
        finally:
            if self._holds:
                self._holds = False
                try:
                    release_resume_point(self.dirpath, self.run_id)
                except (CheckpointError, OSError) as e:
                    log.error("lightning_ckpt: could not remove this run's note in %s: %s", self.dirpath, e)
            if self.lock is not None:  # (the leader: deletions skipped the whole collection, see Folder.apply)
                self._deleter.submit(self.folder.collect_skipped)
            self._deleter.shutdown(wait=True)
            for up in self.uploaders.values():
                up.stop()
            if self.lock is not None:
                self.lock.release()
                self.lock = None
