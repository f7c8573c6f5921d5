"""The options every saving callback shares, declared and documented once.

The callbacks take them as keyword arguments (``PeriodicCheckpoint("ckpts/", every_n_train_steps=100,
async_save=False)``) and forward them here; LightningCLI reads this dataclass for the YAML schema, so the same keys
work under a callback's ``init_args``. Every value is validated when the callback is built.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from ..policy.enums import CONTENTS, Kind
from ..store import open_store
from ..writer.options import (
    check_bool,
    check_choice,
    check_seconds,
    validate_name_template,
)
from .backups import BackupLocation, parse_locations

Content = Literal["full", "weights", "light"]  # policy.enums.CONTENTS, spelled out for LightningCLI's YAML schema

# options that shape the one writer of a folder: callbacks on one folder must agree on them (see FolderSession.join)
FOLDER_OPTIONS = ("name_template", "if_busy", "distributed", "save_timeout_s", "dedup", "run_name", "resume_from")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}\Z")

# Lightning ModelCheckpoint / EarlyStopping arguments and what they are called here
LIGHTNING_NAMES = {
    "filename": "name_template (with Lightning's field names: filename='{epoch}-{val_loss:.2f}' works too)",
    "save_top_k": "top_k (BestMetricCheckpoint)",
    "every_n_epochs": "every_n_epochs (PeriodicCheckpoint)",
    "train_time_interval": "every_n_seconds (PeriodicCheckpoint)",
    "save_last": "nothing: the newest checkpoint is always kept and ckpt_path='last' finds it",
    "save_weights_only": "content='weights'",
    "auto_insert_metric_name": "nothing: write the names into name_template ('val_loss={val_loss:.2f}')",
    "enable_version_counter": "nothing: a name already taken always gets a -vN suffix",
}


@dataclass
class SaveOptions:
    """How the saving callbacks save.

    Args:
        async_save: snapshot into reused host buffers and write in the background while training goes on.
        name_template: folder name of each checkpoint, a format string with ``{step}``, ``{epoch}`` and any logged
            metric, e.g. ``"step={step:06d}"`` or ``"epoch={epoch}-val_loss={val_loss:.3f}"``.
        if_busy: when a save is due while the previous one is still being written: ``"wait"`` for it, or ``"skip"``
            the new one (the end of fit is never skipped).
        fsync: make every file durable before the commit (keep on unless the run is throwaway).
        content: ``"full"`` (everything to resume), ``"weights"`` (model weights, loops, hparams) or ``"light"``
            (metrics, hparams, metadata; no tensors).
        include: glob patterns over state keys to keep (a partial checkpoint), e.g. ``["state_dict/adapter.*"]``.
            Keys are ``state_dict/<param name>``, ``optimizer_states/<i>/...``.
        exclude: glob patterns over state keys to leave out.
        distributed: with several ranks, ``"sharded"`` (every rank writes its share) or ``"rank0"`` (rank 0 writes
            all).
        save_timeout_s: how long a multi-rank save waits for the other ranks before failing on every rank (seconds).
        merge_on_train_end: when ``fit`` ends, rank 0 consolidates the newest checkpoint into
            ``<dirpath>/merged/model.safetensors``.
        backup_uri: after each commit, upload the checkpoint in the background to ``"s3://bucket/prefix"``, or to a
            list of locations: URIs or dicts ``{"uri": ..., "keep_last": 3, "keep_tags": ["best"], "required": False,
            "max_retry_s": 60}`` with the location's own retention. Failed uploads are retried with backoff and never
            stop training unless ``required``.
        resume: ``"auto"``: when ``fit`` is called without ``ckpt_path``, resume from the newest valid checkpoint of
            ``dirpath``, else of the backup locations, else start fresh.
        on_save_error: when a save fails (disk full, permissions): ``"stop"`` raises, ``"continue"`` logs it and
            trains on. Either way nothing partial is listed and earlier checkpoints stay intact. Default: ``"stop"``.
        allow_existing: start a fresh run (no ``ckpt_path``, no ``resume``) in a folder that holds another run's
            checkpoints. Off by default: the run stops with an error naming the choices, so that two runs never mix.
        verbose: print one line per save, early stop, best-weights restore and retention deletion (rank 0).
        dedup: deduplicated checkpoints: frozen parameters, buffers and any tensor unchanged since the previous save
            are written once into the folder's content store (``<dirpath>/.blobs/``) and referenced by later
            checkpoints (and by runs branched from them) instead of being written again. ``False`` keeps every
            checkpoint folder self-contained (``lightning-ckpt export --standalone`` makes one from any checkpoint).
        run_name: the name of this run inside a folder several runs share (branches): its checkpoints are named
            ``<run_name>-<name_template>`` (or put ``{run}`` in the template), ``resume="auto"``, ``ckpt_path="last"``
            and retention see only this run's checkpoints, and ``lightning-ckpt lineage`` shows it by name. Letters,
            digits and ``._+-``.
        resume_from: branch from this checkpoint (a path or ``s3://`` URI, or a checkpoint name in ``dirpath``): when
            ``fit`` is called without ``ckpt_path`` and this run has no checkpoint of its own yet (with
            ``resume="auto"``: else always), training starts from it as a new run (new settings allowed), sharing its
            unchanged tensors in the folder's content store. Give each branch in one folder its own ``run_name``.
        filename: Lightning's name for ``name_template``; Lightning's templates (``"{epoch}-{val_loss:.2f}"``, which
            insert the metric names) are accepted.
    """

    async_save: bool = True
    name_template: str = "step={step:06d}"
    if_busy: Literal["wait", "skip"] = "wait"
    fsync: bool = True
    content: Content = "full"
    include: Optional[list[str]] = None
    exclude: Optional[list[str]] = None
    distributed: Literal["sharded", "rank0"] = "sharded"
    save_timeout_s: float = 600.0
    merge_on_train_end: bool = False
    backup_uri: Optional[Union[str, list[Union[str, dict[str, Any]]]]] = None
    resume: Optional[Literal["auto"]] = None
    on_save_error: Optional[Literal["stop", "continue"]] = None
    allow_existing: bool = False
    verbose: bool = True
    dedup: bool = True
    run_name: Optional[str] = None
    resume_from: Optional[str] = None
    filename: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("async_save", "fsync", "merge_on_train_end", "allow_existing", "verbose", "dedup"):
            check_bool(name, getattr(self, name))
        if self.filename is not None:
            if self.name_template != SaveOptions.name_template:
                raise ValueError("filename and name_template are both set; they are the same setting (filename is "
                                 "Lightning's name for it): keep one")
            self.name_template = lightning_filename(self.filename)
        if self.run_name is not None:
            if not isinstance(self.run_name, str) or not RUN_NAME.match(self.run_name):
                raise ValueError(f"run_name={self.run_name!r} is invalid: use 1-64 letters, digits or '._+-', starting "
                                 "with a letter or digit")
            tpl = self.name_template
            self.name_template = tpl.replace("{run}", self.run_name) if "{run}" in tpl else f"{self.run_name}-{tpl}"
        if self.resume_from is not None and (not isinstance(self.resume_from, (str, os.PathLike))
                                             or not os.fspath(self.resume_from)):
            raise ValueError(f"resume_from={self.resume_from!r} is invalid: give the path of a checkpoint to branch "
                             "from (a folder, or s3://bucket/prefix/NAME)")
        if self.resume_from is not None:
            self.resume_from = os.fspath(self.resume_from)
        self.name_template = validate_name_template(self.name_template)
        check_choice("if_busy", self.if_busy, ("wait", "skip"))
        check_choice("content", self.content, tuple(c.value for c in CONTENTS))
        self.include = _patterns("include", self.include)
        self.exclude = _patterns("exclude", self.exclude)
        if (self.include or self.exclude) and self.content == Kind.LIGHT:
            raise ValueError("include/exclude select tensors, but content='light' saves none; use content='full' or 'weights'")
        check_choice("distributed", self.distributed, ("sharded", "rank0"), "every rank writes its share, or rank 0 all")
        self.save_timeout_s = check_seconds("save_timeout_s", self.save_timeout_s)
        if self.resume is not None:
            check_choice("resume", self.resume, ("auto",), "resume from the newest valid checkpoint, or None")
        if self.on_save_error is not None:
            check_choice("on_save_error", self.on_save_error, ("stop", "continue"))
        self.locations: list[BackupLocation] = parse_locations(self.backup_uri)

    @property
    def partial(self) -> bool:
        return bool(self.include or self.exclude)

    @property
    def kind(self) -> str:
        return Kind.PARTIAL if self.partial else Kind(self.content)

    def folder_settings(self) -> tuple:
        return tuple(getattr(self, f) for f in FOLDER_OPTIONS)


def _patterns(name: str, patterns: Any) -> tuple:
    if patterns is None:
        return ()
    if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{name}={patterns!r} is invalid; give a list of glob patterns such as ['state_dict/adapter.*']")
    return tuple(patterns)


def lightning_filename(filename: str) -> str:
    """Lightning's ``filename`` as a name template: ``"{epoch}-{val_loss:.2f}"`` -> ``"epoch={epoch}-val_loss={val_loss:.2f}"``
    (Lightning's ``auto_insert_metric_name``); ``/`` in metric names becomes ``_``."""
    import re

    if not isinstance(filename, str) or not filename:
        raise ValueError(f"filename={filename!r} is invalid; give a template such as '{{epoch}}-{{step}}'")
    return re.sub(r"(?<![={])\{([A-Za-z_][A-Za-z0-9_./-]*)(:[^}]*)?\}",
                  lambda m: f"{m.group(1).replace('/', '_')}={{{m.group(1)}{m.group(2) or ''}}}", filename)


def check_option_names(cls_name: str, kwargs: dict) -> None:
    """A keyword argument that is no :class:`SaveOptions` field is a ValueError that names the closest option (and, for
    Lightning's argument names, what they are called here)."""
    known = {f.name for f in dataclasses.fields(SaveOptions)}
    unknown = [k for k in kwargs if k not in known]
    if unknown:
        k = unknown[0]
        if k in LIGHTNING_NAMES:
            hint = f"; Lightning's {k!r} is {LIGHTNING_NAMES[k]} here"
        else:
            close = difflib.get_close_matches(k, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{cls_name} has no option {k!r}{hint} (options: see lightning_ckpt.SaveOptions)")


def check_dirpath(dirpath: Any) -> str:
    """The folder a callback saves into, as the callbacks name it (absolute path or URI); ValueError when unusable."""
    if not isinstance(dirpath, (str, os.PathLike)) or not os.fspath(dirpath):
        raise ValueError(f"dirpath={dirpath!r} is invalid; give the folder where checkpoints go, e.g. 'ckpts/'")
    return open_store(dirpath).uri
