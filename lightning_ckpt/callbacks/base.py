"""Machinery shared by the saving callbacks.

- One :class:`_Shared` per (trainer, dirpath): the writer, the callbacks using it, the save requests of the
  current hook, what must never be deleted, and a background deleter.
- Within one Lightning hook every callback *requests* a save; the last of our callbacks on that folder (Lightning
  calls them in list order) *flushes*: the training state is dumped once, after every callback updated its own
  bookkeeping, and written once with the union of the tags.
- A save is committed at the next step boundary (``seal``), not right away; a callback that asks for the same step
  in a later hook (a metric that validation produced after a periodic save at that step) replaces the uncommitted
  save, so the committed state is always the newest one of that step and carries every tag.
- RNG states are captured with each save and restored right before the first training batch after a resume.
"""
from __future__ import annotations

import concurrent.futures as cf
import fnmatch
import logging
import os
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint

from ..checkpoints import list_checkpoints
from ..errors import CheckpointError
from ..format import manifest as mf
from ..policy.conditions import Monitor, moved_enough
from ..rng import capture_rng, restore_rng
from ..storage.local import remove_tree
from ..storage.s3 import is_s3_uri
from ..writer import CheckpointWriter, cleanup_partials
from ..writer.writer import validate_name_template
from .io import install_checkpoint_io

log = logging.getLogger("lightning_ckpt")

STATE_KEY = "lightning_ckpt"
Content = Literal["full", "weights", "light"]


class MonitorNotFoundError(CheckpointError, KeyError):
    """The monitored metric was never logged."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def metric_value(trainer: "pl.Trainer", monitor: str, who: str) -> float:
    """The monitored value as rank 0 sees it (broadcast, so every rank takes the same save decisions)."""
    metrics = trainer.callback_metrics
    present = monitor in metrics
    value = None
    if present:
        v = metrics[monitor]
        value = float(v.item() if isinstance(v, torch.Tensor) else v)
    logged = sorted(metrics)
    if trainer.world_size > 1:
        present, value, logged = trainer.strategy.broadcast((present, value, logged), src=0)
    if not present:
        raise MonitorNotFoundError(
            f"{who} monitors {monitor!r}, which was not logged. Metrics logged so far: "
            f"{', '.join(logged) if logged else '(none)'}. Log it with self.log({monitor!r}, value) or fix `monitor`."
        )
    return float(value)


@dataclass
class _Request:
    tags: set
    content: str
    include: tuple
    exclude: tuple

    @property
    def group(self) -> tuple:
        return (self.content, self.include, self.exclude)


@dataclass
class _Shared:
    """Everything the callbacks of one trainer share for one folder."""

    writer: CheckpointWriter
    dirpath: str
    users: list = field(default_factory=list)
    requests: list = field(default_factory=list)
    last_saved_step: Optional[int] = None
    last_save_time: float = field(default_factory=time.monotonic)
    last_save_tags: set = field(default_factory=set)
    resumed_from: Optional[str] = None
    protectors: list = field(default_factory=list)  # callables -> set of checkpoint names never to delete
    deleter: cf.ThreadPoolExecutor = field(default_factory=lambda: cf.ThreadPoolExecutor(1, thread_name_prefix="lightning_ckpt-delete"))
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    last_stall_s: Optional[float] = None
    committed: list = field(default_factory=list)  # SaveResults not yet reported to the Trainer's loggers
    stalls: dict = field(default_factory=dict)  # step -> training stall of its save (seconds)
    end_hooks: list = field(default_factory=list)  # callables(trainer) run on every rank after the last commit
    key: str = ""  # the folder as the callbacks name it: an absolute path, or an s3:// URI
    remote: Optional[str] = None  # s3:// dirpath: checkpoints live there; ``dirpath`` is a local staging folder
    uploaders: dict = field(default_factory=dict)  # uri -> backups.Uploader (rank 0)
    on_save_error: Optional[str] = None  # "stop" or "continue", as the callbacks set it
    save_errors: list = field(default_factory=list)  # errors of failed saves when the run goes on

    @property
    def primary(self):
        """The uploader of an ``s3://`` dirpath (rank 0), else None."""
        return self.uploaders.get(self.remote) if self.remote else None

    def protected(self) -> set[str]:
        names: set[str] = set()
        if self.resumed_from:
            names.add(os.path.basename(os.path.normpath(self.resumed_from)))
        for p in list(self.protectors):
            try:
                names |= set(p())
            except Exception as e:  # noqa: BLE001
                log.error("lightning_ckpt: protector failed: %r", e)
        return names

    def delete(self, names: Iterable[str], reason: str) -> list[str]:
        """Delete committed checkpoints in the background (never a protected one). Returns the names queued."""
        protected = self.protected()
        queued = []
        for name in names:
            if name in protected or name.startswith("."):
                continue
            if self.primary is not None:  # an s3:// dirpath: delete there, after the uploads queued before
                log.info("lightning_ckpt: deleting %s/%s (%s)", self.remote, name, reason)
                self.primary.enqueue_delete(name)
                queued.append(name)
                continue
            path = os.path.join(self.dirpath, name)
            trash = os.path.join(self.dirpath, f"{mf.TRASH_PREFIX}{name}-{uuid.uuid4().hex[:6]}")
            try:
                os.rename(path, trash)  # atomic: from here on it is not listed
            except FileNotFoundError:
                continue
            log.info("lightning_ckpt: deleting %s (%s)", path, reason)
            self.deleter.submit(remove_tree, trash)
            queued.append(name)
        return queued


_SHARED: "weakref.WeakKeyDictionary[Any, dict[str, _Shared]]" = weakref.WeakKeyDictionary()
_PENDING_RNG: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def folder_key(dirpath: Any) -> str:
    """How a checkpoint folder is named internally: an absolute path, or the ``s3://`` URI without trailing slash."""
    if is_s3_uri(dirpath):
        return str(dirpath).rstrip("/")
    return os.path.abspath(os.fspath(dirpath))


def staging_dir(uri: str) -> str:
    """The local folder where saves into an ``s3://`` dirpath are written before their upload:
    ``$LIGHTNING_CKPT_STAGING/<hash of the URI>``, default under the system temp folder. Every rank of a node derives
    the same folder from the URI."""
    import hashlib
    import tempfile

    root = os.environ.get("LIGHTNING_CKPT_STAGING") or os.path.join(tempfile.gettempdir(), "lightning_ckpt-staging")
    return os.path.join(root, hashlib.sha1(uri.encode()).hexdigest()[:16])


def shared_for(trainer: Any, dirpath: str) -> Optional[_Shared]:
    return _SHARED.get(trainer, {}).get(folder_key(dirpath))


def _validate_patterns(name: str, patterns: Optional[list[str]]) -> tuple:
    if patterns is None:
        return ()
    if isinstance(patterns, str) or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{name}={patterns!r} is invalid; give a list of glob patterns such as ['state_dict/adapter.*']")
    return tuple(patterns)


class BaseCheckpointCallback(Checkpoint):
    """Base of the saving callbacks. Subclasses decide *when* (``_want_save_on_*``); this class knows *how*.

    Args:
        dirpath: folder for this run's checkpoints; created if missing.
        async_save: snapshot into reused host buffers and write in the background (training continues).
        name_template: folder name of each checkpoint, with fields ``{step}`` and ``{epoch}``.
        if_busy: a save requested while the previous one is still being written either ``"wait"``s or is
            ``"skip"``ped.
        fsync: make every file durable before committing (keep on unless the run is throwaway).
        content: ``"full"`` (everything to resume), ``"weights"`` (model weights, loops, hparams) or ``"light"``
            (metrics, hparams, metadata; no tensors).
        include: glob patterns over state keys to keep (a partial checkpoint), e.g. ``["state_dict/adapter.*"]``
            or ``["optimizer_states/*"]``. Keys are ``state_dict/<param name>``, ``optimizer_states/<i>/...``.
        exclude: glob patterns over state keys to leave out.
        monitor: metric for conditional saving (``only_on_improvement`` / ``on_change``).
        mode: ``"min"`` or ``"max"``: the direction in which ``monitor`` improves.
        min_delta: smallest change of ``monitor`` that counts as an improvement.
        only_on_improvement: skip a save unless ``monitor`` improved on every earlier save of this callback.
        on_change: skip a save unless ``monitor`` moved by more than this fraction since this callback's last save.
        distributed: with several ranks, ``"sharded"`` (every rank writes its share; with ``async_save`` each rank
            persists in the background and rank 0 commits when all are done) or ``"rank0"`` (rank 0 writes all).
        save_timeout_s: how long a multi-rank save waits for the other ranks before failing on every rank.
        merge_on_train_end: when ``fit`` ends, rank 0 consolidates the newest checkpoint into
            ``<dirpath>/merged/model.safetensors``.
        backup_uri: after each local commit, upload the checkpoint in the background to ``"s3://bucket/prefix"``, or
            to several locations: a list of URIs or of dicts ``{"uri": ..., "keep_last": 3, "keep_tags": ["best"],
            "required": False, "max_retry_s": 60}`` with the location's own retention (keys of
            :class:`RetentionPolicy` plus ``keep_tags``). Failed uploads are retried with backoff and never stop training unless ``required``.
            S3 settings come from the standard AWS environment and config files.
        resume: ``"auto"``: when ``fit`` is called without ``ckpt_path``, resume from the newest valid checkpoint of
            ``dirpath``, else of the backup locations (in order), else start fresh. Relaunching the same command
            continues the run.
        on_save_error: when a save fails (disk full, file too large, permissions): ``"stop"`` raises (training stops
            with the error) and ``"continue"`` logs it and trains on (the next save tries again). Either way nothing
            partial is listed and earlier checkpoints stay intact. Default: ``"stop"``.

    ``dirpath`` may be an ``s3://bucket/prefix`` URI: saves are written to a local staging folder (see
    :func:`staging_dir`), uploaded, and the staged copy is removed once uploaded.
    """

    def __init__(
        self,
        dirpath: str,
        *,
        async_save: bool = True,
        name_template: str = "step={step:06d}",
        if_busy: Literal["wait", "skip"] = "wait",
        fsync: bool = True,
        content: Content = "full",
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        monitor: Optional[str] = None,
        mode: Literal["min", "max"] = "min",
        min_delta: float = 0.0,
        only_on_improvement: bool = False,
        on_change: Optional[float] = None,
        distributed: Literal["sharded", "rank0"] = "sharded",
        save_timeout_s: float = 600.0,
        merge_on_train_end: bool = False,
        backup_uri: Optional[Union[str, list[Union[str, dict[str, Any]]]]] = None,
        resume: Optional[Literal["auto"]] = None,
        on_save_error: Optional[Literal["stop", "continue"]] = None,
    ) -> None:
        super().__init__()
        from ..backups import parse_locations

        self.backups = parse_locations(backup_uri)
        self.backup_uri = backup_uri
        if resume not in (None, "auto"):
            raise ValueError(f"resume={resume!r} is invalid; use 'auto' (resume from the newest valid checkpoint) or None")
        self.resume = resume
        if on_save_error not in (None, "stop", "continue"):
            raise ValueError(f"on_save_error={on_save_error!r} is invalid; use 'stop' or 'continue'")
        self.on_save_error = on_save_error
        if distributed not in ("sharded", "rank0"):
            raise ValueError(f"distributed={distributed!r} is invalid; use 'sharded' (every rank writes its share) or 'rank0'")
        if not isinstance(save_timeout_s, (int, float)) or isinstance(save_timeout_s, bool) or save_timeout_s <= 0:
            raise ValueError(f"save_timeout_s={save_timeout_s!r} is invalid; it must be a positive number of seconds")
        self.distributed = distributed
        self.save_timeout_s = float(save_timeout_s)
        self.merge_on_train_end = bool(merge_on_train_end)
        if not isinstance(dirpath, (str, os.PathLike)) or not os.fspath(dirpath):
            raise ValueError(f"dirpath={dirpath!r} is invalid; give the folder where checkpoints go, e.g. 'ckpts/'")
        if if_busy not in ("wait", "skip"):
            raise ValueError(f"if_busy={if_busy!r} is invalid; use 'wait' or 'skip'")
        if not isinstance(async_save, bool):
            raise ValueError(f"async_save={async_save!r} is invalid; use True or False")
        if content not in ("full", "weights", "light"):
            raise ValueError(f"content={content!r} is invalid; use 'full', 'weights' or 'light'")
        self.include = _validate_patterns("include", include)
        self.exclude = _validate_patterns("exclude", exclude)
        if (self.include or self.exclude) and content == "light":
            raise ValueError("include/exclude select tensors, but content='light' saves none; use content='full' or 'weights'")
        if on_change is not None and (not isinstance(on_change, (int, float)) or isinstance(on_change, bool) or on_change <= 0):
            raise ValueError(f"on_change={on_change!r} is invalid; it must be a positive fraction such as 0.05")
        if only_on_improvement and on_change is not None:
            raise ValueError("only_on_improvement and on_change are mutually exclusive; set one of them")
        if (only_on_improvement or on_change is not None) and not monitor:
            raise ValueError("only_on_improvement/on_change need monitor='<metric name>'")
        self.dirpath = folder_key(dirpath)
        if is_s3_uri(self.dirpath):
            from ..storage.s3 import parse_s3_uri

            parse_s3_uri(self.dirpath)
            if merge_on_train_end:
                raise ValueError("merge_on_train_end needs a local dirpath; with an s3:// dirpath run "
                                 "`lightning-ckpt merge s3://.../<checkpoint> OUT` after training")
            if any(loc.uri == self.dirpath for loc in self.backups):
                raise ValueError(f"backup_uri repeats dirpath {self.dirpath}; the checkpoints already go there")
        self.async_save = async_save
        self.name_template = validate_name_template(name_template)
        self.if_busy = if_busy
        self.fsync = fsync
        self.content = content
        self.monitor_spec = Monitor(monitor, mode, min_delta) if monitor else None
        if monitor is None:
            Monitor("x", mode, min_delta)  # validate mode and min_delta all the same
        self.monitor = monitor
        self.mode = mode
        self.min_delta = min_delta
        self.only_on_improvement = bool(only_on_improvement)
        self.on_change = on_change
        self._shared: Optional[_Shared] = None
        self._cond_best: Optional[float] = None  # conditional saving: best value at a save of this callback
        self._cond_last: Optional[float] = None  # conditional saving: value at this callback's last save

    # ------------------------------------------------------------ subclass hooks: return tags to save, or None
    def _want_save_on_train_batch_end(self, trainer: "pl.Trainer") -> Optional[Iterable[str]]:
        return None

    def _want_save_on_validation_end(self, trainer: "pl.Trainer") -> Optional[Iterable[str]]:
        return None

    def _want_save_on_train_epoch_end(self, trainer: "pl.Trainer") -> Optional[Iterable[str]]:
        return None

    def _want_save_on_train_end(self, trainer: "pl.Trainer") -> Optional[Iterable[str]]:
        return None

    # ------------------------------------------------------------ Lightning
    @property
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=self.dirpath)

    @property
    def writer(self) -> CheckpointWriter:
        if self._shared is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a Trainer yet")
        return self._shared.writer

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        install_checkpoint_io(trainer)
        if stage != "fit" or self._shared is not None:
            return
        per_trainer = _SHARED.setdefault(trainer, {})
        shared = per_trainer.get(self.dirpath)
        if shared is None:
            remote = self.dirpath if is_s3_uri(self.dirpath) else None
            local = staging_dir(self.dirpath) if remote else self.dirpath
            shared = _Shared(
                CheckpointWriter(
                    local,
                    async_save=self.async_save,
                    name_template=self.name_template,
                    if_busy=self.if_busy,
                    fsync=self.fsync,
                    auto_seal=False,
                    mode=self.distributed,
                    timeout_s=self.save_timeout_s,
                ),
                local,
                key=self.dirpath,
                remote=remote,
            )
            per_trainer[self.dirpath] = shared
            shared.writer.on_commit.append(lambda res, sh=shared: _after_commit(sh, res))
            shared.writer.prepare_dir()  # every rank: the folder may be local to each node
            shared.writer.detect_folders(every_folder=remote is None)
            if shared.writer.is_leader:
                cleanup_partials(local)
            trainer.strategy.barrier("lightning_ckpt.setup")
        else:
            w = shared.writer
            mine = (self.async_save, self.name_template, self.if_busy, self.fsync, self.distributed)
            theirs = (w.async_save, w.name_template, w.if_busy, w.fsync, w.mode)
            if mine != theirs:
                raise ValueError(
                    f"callbacks saving into {self.dirpath} disagree on (async_save, name_template, if_busy, fsync, distributed): "
                    f"{theirs} vs {mine}. Callbacks on one folder share one writer; give them the same settings."
                )
        shared.users.append(self)
        self._shared = shared
        if self.on_save_error is not None:
            if shared.on_save_error not in (None, self.on_save_error):
                raise ValueError(f"callbacks saving into {self.dirpath} disagree on on_save_error "
                                 f"({shared.on_save_error!r} vs {self.on_save_error!r}); set it the same on each")
            shared.on_save_error = self.on_save_error
        self._add_backups(trainer, shared)
        if self.resume == "auto":
            _install_auto_resume(trainer, shared, self)
        # callbacks that keep some checkpoints (best-k) protect them from deletion and act after each commit
        protect, after = getattr(self, "_protect", None), getattr(self, "_after_commit", None)
        if protect is not None and protect not in shared.protectors:
            shared.protectors.append(protect)
        if after is not None and after not in shared.writer.on_commit:
            shared.writer.on_commit.append(after)

    def _add_backups(self, trainer: "pl.Trainer", shared: _Shared) -> None:
        """Rank 0 uploads every commit to each location of this callback (and of the ``s3://`` dirpath)."""
        from ..backups import BackupLocation, Uploader

        locations = list(self.backups)
        if shared.remote and shared.remote not in shared.uploaders:
            locations.insert(0, BackupLocation(shared.remote, required=True))
        for loc in locations:
            up = shared.uploaders.get(loc.uri)
            if up is not None:
                if up.location != loc and loc.uri != shared.remote:
                    raise ValueError(f"callbacks saving into {self.dirpath} give {loc.uri} different retention rules; "
                                     "give it once, or the same rules on each")
                continue
            primary = loc.uri == shared.remote  # the run's own folder: the callbacks' protections (best-k, ...) hold there
            up = Uploader(loc, shared.dirpath, protect=shared.protected if primary else None, primary=primary)
            shared.uploaders[loc.uri] = up
            if trainer.is_global_zero:  # the folder is shared: rank 0 uploads what every rank wrote
                attach_uploader(shared, up)

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._shared is not None and trainer.ckpt_path:
            self._shared.resumed_from = str(trainer.ckpt_path)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._shared is not None:
            self._shared.last_save_time = time.monotonic()

    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]) -> None:
        ours = checkpoint.get(STATE_KEY)
        if isinstance(ours, dict) and isinstance(ours.get("rng"), dict):
            _PENDING_RNG[trainer] = ours["rng"]
        if self._shared is not None and self._shared.last_saved_step is None:
            # the step we resumed at is already on disk: do not write it again
            self._shared.last_saved_step = int(checkpoint.get("global_step", -1))

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        shared = self._shared
        if shared is not None:
            if shared.requests:  # a hook we expected later in the last step did not come; save what was asked
                log.warning("lightning_ckpt: saving requests of step %s late (expected validation did not run)", shared.last_saved_step)
                self._flush(trainer)
            # a step boundary: the previous step's save may commit now
            self._guard(shared, shared.writer.seal)
            if self._is_last(shared):
                _report(trainer, shared)
        # Restore RNG states as late as possible: right before the first training step after a resume, where the
        # uninterrupted run was when it saved. Lightning's own set-up (sanity check, iterator creation) may consume
        # random numbers before this point; restoring here makes those draws irrelevant.
        rng = _PENDING_RNG.pop(trainer, None)
        if rng is not None:
            restore_rng(rng)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int) -> None:
        self._hook(trainer, self._want_save_on_train_batch_end, hook="batch_end")

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._hook(trainer, self._want_save_on_validation_end, hook="validation_end")

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._hook(trainer, self._want_save_on_train_epoch_end, hook="epoch_end")

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._hook(trainer, self._want_save_on_train_end, final=True)
        shared = self._shared
        if shared is not None and self._is_last(shared):
            self._wait(raise_errors=shared.on_save_error != "continue")
            trainer.strategy.barrier("lightning_ckpt.train_end")  # every rank sees the last commit
            _report(trainer, shared)
            for hook in list(shared.end_hooks):
                hook(trainer)
            if any(getattr(u, "merge_on_train_end", False) for u in shared.users) and trainer.is_global_zero:
                self._merge_latest()

    def _merge_latest(self) -> None:
        from ..checkpoints import latest_checkpoint
        from ..merge import merge_checkpoint

        latest = latest_checkpoint(self.dirpath, verify=False)
        if latest is None:
            return
        out = os.path.join(self.dirpath, "merged", "model.safetensors")
        res = merge_checkpoint(latest, out)
        log.info("lightning_ckpt: merged %s into %s (%d tensors, %.1f MB, %.2fs)", latest, out, res.tensors, res.bytes / 1e6, res.seconds)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        shared = self._shared
        if shared is None:
            return
        shared.requests.clear()
        # keep a save that was fully requested (it becomes a valid checkpoint) but never mask the training error
        self._wait(raise_errors=False)
        if self._is_last(shared) and shared.writer.is_leader and shared.writer.folder_written:  # each folder's note
            _record_failed_run(shared, exception)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        pending_resume = _AUTO_RESUME.get(trainer)
        if pending_resume is not None and pending_resume[0] is self:  # fit never restored: undo the hook
            trainer._checkpoint_connector.resume_start = pending_resume[1]
            _AUTO_RESUME.pop(trainer, None)
        shared = self._shared
        if shared is None or stage != "fit":
            return
        self._shared = None
        protect, after = getattr(self, "_protect", None), getattr(self, "_after_commit", None)
        if protect in shared.protectors:
            shared.protectors.remove(protect)
        if after in shared.writer.on_commit:
            shared.writer.on_commit.remove(after)
        if self in shared.users:
            shared.users.remove(self)
        if not shared.users:
            _SHARED.get(trainer, {}).pop(self.dirpath, None)
            self._last_buffer_allocations = shared.writer._buffers.allocations
            self._last_buffer_tensors = len(shared.writer._buffers._buffers)
            try:
                shared.writer.close()
            except CheckpointError as e:  # already reported at on_train_end / on_exception
                log.error("lightning_ckpt: %s", e)
            shared.deleter.shutdown(wait=True)
            for up in shared.uploaders.values():
                up.stop()

    # ------------------------------------------------------------ conditional saving
    def _condition_allows(self, trainer: "pl.Trainer") -> bool:
        if self.monitor_spec is None or not (self.only_on_improvement or self.on_change is not None):
            return True
        v = metric_value(trainer, self.monitor_spec.monitor, type(self).__name__)
        if self.only_on_improvement:
            ok = self.monitor_spec.better(v, self._cond_best)
        else:
            ok = moved_enough(v, self._cond_last, float(self.on_change))  # type: ignore[arg-type]
        if ok:
            self._cond_last = v
            if self.monitor_spec.better(v, self._cond_best):
                self._cond_best = v
        return ok

    # ------------------------------------------------------------ request / flush
    def _is_last(self, shared: _Shared) -> bool:
        return bool(shared.users) and shared.users[-1] is self

    def _hook(self, trainer: "pl.Trainer", want, final: bool = False, hook: str = "") -> None:
        shared = self._shared
        if shared is None:
            return
        tags = want(trainer)
        if tags is not None:
            self.request_save(trainer, tags)
        if self._is_last(shared) and not (shared.requests and _step_goes_on(trainer, hook)):
            self._flush(trainer, final=final)

    def request_save(self, trainer: "pl.Trainer", tags: Iterable[str], *, force: bool = False) -> None:
        """Ask for a save at the current step; it is written once per hook for all callbacks on this folder."""
        shared = self._shared
        if shared is None or trainer.sanity_checking:
            return
        if not force and not self._condition_allows(trainer):
            return
        shared.requests.append(_Request(set(tags), self.content, self.include, self.exclude))

    def _flush(self, trainer: "pl.Trainer", final: bool = False) -> None:
        shared = self._shared
        assert shared is not None
        requests, shared.requests = shared.requests, []
        if not requests:
            return
        step = int(trainer.global_step)
        groups: dict[tuple, set] = {}
        for r in requests:
            groups.setdefault(r.group, set()).update(r.tags)
        # a full checkpoint also serves weights/light requests without include/exclude
        if ("full", (), ()) in groups:
            for g in list(groups):
                if g != ("full", (), ()) and not g[1] and not g[2]:
                    groups[("full", (), ())] |= groups.pop(g)
        metrics = dict(trainer.callback_metrics)
        for (content, include, exclude), tags in groups.items():
            kind = "partial" if (include or exclude) else content
            pending = shared.writer.pending
            if pending is not None and pending.step == step and final and shared.writer.merge(step, tags, metrics, kind):
                continue  # the end of fit adds its tag to the save of the last step
            if shared.last_saved_step == step and pending is None and tags <= shared.last_save_tags | {"final"}:
                continue  # already committed at this step (e.g. the step we resumed from)
            if pending is not None and pending.step == step and pending.kind == kind:
                tags = tags | set(pending.tags)
                shared.writer.abandon()  # replaced by a newer state of the same step
            self._save(trainer, shared, step, tags, content, include, exclude, kind, metrics, final=final)

    def _save(self, trainer, shared: _Shared, step: int, tags: set, content: str, include: tuple, exclude: tuple,
              kind: str, metrics: dict, final: bool = False) -> None:
        t0 = time.perf_counter()
        w = shared.writer
        if w.if_busy == "skip" and trainer.world_size > 1 and not final:
            # every rank must skip the same saves (a save is a collective): skip if any rank is still writing
            if trainer.strategy.reduce_boolean_decision(w.writing_sealed, all=False):
                log.warning("lightning_ckpt: save at step %s skipped: a rank is still writing the previous one", step)
                return
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=content != "full")
        if content == "light":
            checkpoint.pop("state_dict", None)
        if include or exclude:
            checkpoint = filter_state(checkpoint, include, exclude)
        checkpoint[STATE_KEY] = {"format": 1, "kind": kind}
        if kind == "full":  # only a full checkpoint resumes training; the others carry no RNG tensors
            checkpoint[STATE_KEY]["rng"] = capture_rng()
        pl_module = trainer.lightning_module
        hparams = dict(pl_module.hparams) if pl_module is not None and pl_module.hparams else None
        self._guard(shared, shared.writer.raise_if_failed)  # an earlier background save failed
        pending = self._guard(
            shared,
            shared.writer.save,
            checkpoint,
            step=step,
            epoch=int(trainer.current_epoch),
            tags=tags,
            metrics=metrics,
            hparams=hparams,
            meta={"resumed_from": shared.resumed_from, "run_id": shared.run_id, "include": list(include), "exclude": list(exclude)},
            kind=kind,
            if_busy="wait" if final else None,  # the end of fit is never skipped
        )
        if pending is None:
            return
        shared.last_stall_s = time.perf_counter() - t0
        shared.stalls[step] = shared.last_stall_s
        shared.last_saved_step = step
        shared.last_save_tags = set(tags)
        shared.last_save_time = time.monotonic()

    def _guard(self, shared: _Shared, fn, *args: Any, **kwargs: Any) -> Any:
        """Run a writer call; with ``on_save_error="continue"`` a failed save is logged and training goes on."""
        try:
            return fn(*args, **kwargs)
        except CheckpointError as e:
            if shared.on_save_error != "continue":
                raise
            shared.save_errors.append(e)
            log.error("lightning_ckpt: a save failed and training continues (on_save_error='continue'): %s", e)
            return None

    def _wait(self, raise_errors: bool) -> None:
        if self._shared is None:
            return
        try:
            self._shared.writer.wait()
        except CheckpointError as e:
            if raise_errors:
                raise
            log.error("lightning_ckpt: a background save failed: %s", e)


def best_path_at(dirpath: str, step: int) -> Optional[str]:
    """The committed checkpoint of ``step`` tagged ``best`` in ``dirpath``, if any."""
    for c in reversed(list_checkpoints(dirpath)):
        if c.step == step and "best" in c.tags:
            return c.path
    return None


def require_shared(trainer: Any, dirpath: str, who: str) -> _Shared:
    """The shared writer of the saving callbacks on ``dirpath``; a clear error when there is none."""
    shared = _SHARED.get(trainer, {}).get(dirpath)
    if shared is None:
        raise ValueError(
            f"{who}({dirpath!r}) has no saving callback on that folder; add e.g. "
            f"PeriodicCheckpoint({dirpath!r}, ...) to the same Trainer"
        )
    return shared


def _step_goes_on(trainer: "pl.Trainer", hook: str) -> bool:
    """Will another of our hooks run in this same training step? Then the save waits for it, so one state (the
    latest of the step, after validation) is written once. Mirrors Lightning's ``_TrainingEpochLoop.on_advance_end``."""
    try:
        el = trainer.fit_loop.epoch_loop
        last_batch = bool(el.batch_progress.is_last_batch)
        if hook == "batch_end":
            if not el._skip_next_val and el._should_check_val_fx(trainer.fit_loop._data_fetcher):
                return True  # validation runs next
            return last_batch  # on_train_epoch_end runs next
        if hook == "validation_end":
            return last_batch and not trainer.sanity_checking
    except Exception:  # noqa: BLE001 - private Lightning API changed: save right away
        return False
    return False


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


def _after_commit(shared: _Shared, res: Any) -> None:
    """Runs in the committing thread (rank 0): the run's metric history and the queue for the loggers."""
    import json

    shared.committed.append(res)  # commit hooks run on rank 0 only
    line = {"step": res.step, "name": res.name, "tags": res.tags, "time": time.time(), "metrics": res.metrics}
    try:
        with open(os.path.join(shared.dirpath, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(line, allow_nan=False, default=str) + "\n")
    except (OSError, ValueError) as e:
        log.error("lightning_ckpt: could not append to metrics.jsonl: %s", e)


def _report(trainer: "pl.Trainer", shared: _Shared) -> None:
    """Report committed saves to the Trainer's loggers under ``checkpoint/`` (on the training thread)."""
    while shared.committed:
        res = shared.committed.pop(0)
        if not trainer.is_global_zero:
            continue
        stall = shared.stalls.pop(res.step, res.snapshot_s)
        metrics = {
            "checkpoint/bytes": float(res.bytes),
            "checkpoint/stall_s": float(stall),
            "checkpoint/write_s": float(res.write_s),
            "checkpoint/throughput_gbps": float(res.bytes / res.write_s / 1e9) if res.write_s > 0 else 0.0,
            "checkpoint/step": float(res.step),
        }
        for lg in trainer.loggers:
            try:
                lg.log_metrics(metrics, step=res.step)
            except Exception as e:  # noqa: BLE001 - a logger problem must not stop training
                log.error("lightning_ckpt: logger %s failed: %r", type(lg).__name__, e)


def _record_failed_run(shared: _Shared, exception: BaseException) -> None:
    """Leave a note that this run ended in an exception (``lightning-ckpt prune --failed`` reads it)."""
    import json

    d = os.path.join(shared.dirpath, ".runs")
    try:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{shared.run_id}.json"), "w") as f:
            json.dump({"run_id": shared.run_id, "status": "failed", "error": repr(exception)[:2000], "time": time.time()}, f)
    except OSError as e:
        log.error("lightning_ckpt: could not record the failed run: %s", e)


def attach_uploader(shared: _Shared, up: Any, flush_timeout_s: float = 600.0) -> list[tuple[list, Any]]:
    """Rank 0: upload each commit of the folder, keep queued checkpoints from local deletion, wait for the uploads at
    the end of fit; start the uploader and queue what an earlier run left un-uploaded. Returns the (list, hook) pairs
    registered, for a callback that detaches them again."""
    hooks = [
        (shared.writer.on_commit, lambda res: up.enqueue(res.path)),
        (shared.protectors, up.pending),
        (shared.end_hooks, lambda trainer: _flush_uploads(up, flush_timeout_s)),
    ]
    for lst, fn in hooks:
        lst.append(fn)
    up.start()
    up.catch_up()
    return hooks


def _flush_uploads(up: Any, timeout_s: float = 600.0) -> None:
    """End of fit: give the queued uploads of a location ``timeout_s`` to finish."""
    left = up.flush(timeout_s)
    if not left:
        return
    msg = f"checkpoints not uploaded to {up.uri} by the end of fit: {left} (last error: {up.last_error!r})"
    if up.location.required:
        from ..errors import CheckpointWriteError

        where = up.dirpath
        raise CheckpointWriteError(f"{msg}; they are intact locally in {where}: upload them with "
                                   f"`lightning-ckpt push {where}/<name> {up.uri}`, or relaunch (the upload resumes)")
    log.error("lightning_ckpt: %s. They are intact locally; the next run (or `lightning-ckpt push`) uploads them", msg)


_AUTO_RESUME: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def _common_local_names(shared: _Shared) -> tuple[list[str], list[str]]:
    """Node-local folders (collective, every rank): the checkpoints committed in every written folder, oldest first,
    each verified by every folder's committing rank; and those that only some folders hold. A crash between two
    folders' commits leaves the newest checkpoint in some folders only; the run then resumes from the newest one
    that every folder holds whole."""
    import torch.distributed as dist

    from ..checkpoints import list_checkpoints, verify_checkpoint

    w = shared.writer
    lead = w.is_leader and w.folder_written

    def gather(obj: Any) -> list:
        out: list = [None] * w.world_size
        dist.all_gather_object(out, obj, group=w.pg)
        return [x for x in out if x is not None]

    mine = [c.name for c in list_checkpoints(shared.dirpath)] if lead and os.path.isdir(shared.dirpath) else None
    lists = gather(mine)
    common = [n for n in lists[0] if all(n in other for other in lists[1:])] if lists else []
    bad: list = []
    if lead:  # each committing rank verifies the candidates in its own folder, newest first, up to the first good one
        for name in reversed(common):
            try:
                verify_checkpoint(os.path.join(shared.dirpath, name))
                break
            except CheckpointError as e:
                log.warning("lightning_ckpt: resume='auto' skips %s in %s: %s", name, shared.dirpath, e)
                bad.append(name)
    dropped = {n for b in gather(bad if lead else None) for n in b}
    some = sorted({n for names in lists for n in names} - set(common))
    return [n for n in common if n not in dropped], some


def auto_resume_path(shared: _Shared, among: Optional[list[str]] = None, only_some: Iterable[str] = ()) -> Optional[str]:
    """The newest valid checkpoint among the folder and its backup locations (local wins a tie; an ``s3://`` dirpath:
    the newer of the staged and the uploaded ones); ``None`` when there is none. Raises when a backup location cannot
    be read and nothing is local (starting fresh could then silently drop a run). ``among``: node-local folders, the
    local checkpoints every folder holds (see :func:`_common_local_names`); a newer backup is then read from S3 by
    every rank rather than pulled into one node's folder."""
    from ..checkpoints import latest_checkpoint, list_checkpoints, read_checkpoint_manifest, resume_path

    if among is not None:
        local = os.path.join(shared.dirpath, among[-1]) if among else None
        if shared.remote:  # only rank 0's staging folder is written: every node reads the uploaded checkpoints
            try:
                return latest_checkpoint(shared.remote)
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"resume='auto' cannot read {shared.remote} ({e!r}); fix the S3 settings or "
                                      "the server, or drop resume='auto' to start fresh") from e
        local_step = int(read_checkpoint_manifest(local)["step"]) if local else -1
        for up in shared.uploaders.values():
            try:
                remote = latest_checkpoint(up.uri)
            except Exception as e:  # noqa: BLE001 - S3 down: resume from the local one if there is one
                if local is None:
                    raise CheckpointError(f"resume='auto' found no checkpoint in every node's {shared.dirpath} and "
                                          f"cannot read {up.uri} ({e!r}); fix the S3 settings or the server, or drop "
                                          "resume='auto' to start fresh") from e
                log.warning("lightning_ckpt: cannot read %s (%r); resuming from the local %s", up.uri, e, local)
                continue
            remote_step = int(read_checkpoint_manifest(remote)["step"]) if remote is not None else -1
            if remote_step > local_step:
                local, local_step = remote, remote_step
        if local is None and list(only_some):  # say, a node replaced by a machine with an empty disk
            raise CheckpointError(
                f"resume='auto': the node-local folders {shared.dirpath} hold no checkpoint in common, but some hold "
                f"{', '.join(list(only_some)[-3:])}. Starting fresh would drop the run: copy a checkpoint folder from "
                "a node that has it to the nodes that lack it (each node's copy is whole), or pass ckpt_path, or "
                "set backup_uri so that a new node resumes from S3."
            )
        return local
    if shared.remote:
        staged = latest_checkpoint(shared.dirpath) if os.path.isdir(shared.dirpath) else None
        try:
            remote = latest_checkpoint(shared.remote)
        except Exception as e:  # noqa: BLE001
            if staged is not None:
                log.warning("lightning_ckpt: cannot read %s (%r); resuming from the staged %s", shared.remote, e, staged)
                return staged
            raise CheckpointError(f"resume='auto' cannot read {shared.remote} ({e!r}); fix the S3 settings or the "
                                  "server, or drop resume='auto' to start fresh") from e
        if staged is None or remote is None:
            return staged or remote
        steps = {c.path: c.step for c in list_checkpoints(shared.dirpath)}
        remote_step = next((c.step for c in list_checkpoints(shared.remote) if c.path == remote), -1)
        return staged if steps.get(staged, -1) >= remote_step else remote
    uris = [up.uri for up in shared.uploaders.values()]
    try:
        return resume_path(shared.dirpath, uris)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. the S3 server is down and nothing is local
        raise CheckpointError(f"resume='auto' found no local checkpoint in {shared.dirpath} and cannot read the backup "
                              f"locations {uris} ({e!r}); fix the S3 settings or the server, or drop resume='auto' "
                              "to start fresh") from e


def _install_auto_resume(trainer: "pl.Trainer", shared: _Shared, cb: Any) -> None:
    """``resume="auto"``: when ``fit`` restores (Lightning calls ``resume_start`` after the callbacks' ``setup``) and no
    ``ckpt_path`` was given, restore from :func:`auto_resume_path` instead. Rank 0 decides; every rank loads it."""
    if trainer.state.fn != "fit" or trainer in _AUTO_RESUME:
        return
    connector = trainer._checkpoint_connector
    original = connector.resume_start
    _AUTO_RESUME[trainer] = (cb, original)

    def resume_start(checkpoint_path: Any = None, *args: Any, **kwargs: Any) -> None:
        connector.resume_start = original  # once per fit
        _AUTO_RESUME.pop(trainer, None)
        if not checkpoint_path:
            found, error, in_own_folder = None, None, False
            common, only_some = _common_local_names(shared) if shared.writer.node_local else (None, [])
            if trainer.is_global_zero:
                try:
                    found = auto_resume_path(shared, among=common, only_some=only_some)
                except CheckpointError as e:
                    error = str(e)
                if found and common is not None and not is_s3_uri(found):  # each node reads its own folder
                    found, in_own_folder = os.path.relpath(found, shared.dirpath), True
            if trainer.world_size > 1:  # every rank loads the same checkpoint, or every rank raises
                found, error, in_own_folder = trainer.strategy.broadcast((found, error, in_own_folder), src=0)
            if error is not None:
                raise CheckpointError(error)
            if in_own_folder:
                found = os.path.join(shared.dirpath, found)
            from lightning.pytorch.utilities.rank_zero import rank_zero_info

            if found:  # printed where Lightning prints its own messages
                rank_zero_info(f"lightning_ckpt: resume='auto': resuming from {found}")
            else:
                rank_zero_info(f"lightning_ckpt: resume='auto': no checkpoint in {shared.key} or its backups; starting fresh")
            checkpoint_path = found
        return original(checkpoint_path, *args, **kwargs)

    connector.resume_start = resume_start
