"""Lightning's names for checkpoints, for this package's folders: the default ``dirpath``, ``ckpt_path="last"`` and
``"best"``, and where a ``fit`` starts. The decisions are :mod:`lightning_ckpt.session.start`'s (``newest``, ``best``,
``decide``); this module hands them what Lightning knows (the callbacks' folders and options, the rank, the
strategy's broadcast, Ray's checkpoint) and prints their lines where Lightning prints its own (rank 0)."""
from __future__ import annotations

import os
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from ..session import start
from ..session.options import check_dirpath
from .ray import checkpoint_reader

BaseCheckpointCallback = Any  # callbacks.base imports this module: annotations only


def default_dirpath(trainer: "pl.Trainer") -> str:
    """``<default_root_dir>/checkpoints``, where Lightning's ``ModelCheckpoint`` writes without a logger."""
    return check_dirpath(os.path.join(str(trainer.default_root_dir), "checkpoints"))


def folder_of(cb: BaseCheckpointCallback, trainer: "pl.Trainer") -> str:
    return cb.dirpath if cb.dirpath is not None else default_dirpath(trainer)


def place_of(cb: BaseCheckpointCallback, trainer: "pl.Trainer") -> start.Place:
    """A callback's folder, its backups and run, before its session exists (Lightning resolves "last"/"best" first)."""
    return start.Place(folder_of(cb, trainer), backups=tuple(loc.uri for loc in cb.options.locations),
                       run_name=cb.options.run_name)


def resolve_ckpt_path(cb: BaseCheckpointCallback, trainer: "pl.Trainer", name: str, others: list) -> Optional[str]:
    """``ckpt_path="last"``/``"best"`` over the folders of ``cb`` and the other callbacks of this package (every rank
    that Lightning's resolver runs on)."""
    cbs = [cb] + [o for o in others if getattr(o, "options", None) is not None and hasattr(o, "dirpath")]
    if name == "last":
        return start.newest([place_of(c, trainer) for c in cbs], warn=rank_zero_warn).path
    candidates = [(place_of(c, trainer), getattr(c, "monitor", None), getattr(c, "mode", None)) for c in cbs]
    return start.best(candidates, warn=rank_zero_warn).path


def choose_start(cb: BaseCheckpointCallback, trainer: "pl.Trainer", ckpt_path: Any) -> Any:
    """Where this ``fit`` starts (``session.start.decide``; every rank, rank 0 decides): the given ``ckpt_path``;
    else with ``resume="auto"`` Ray's checkpoint, or the newest valid checkpoint of this run; else ``resume_from`` (a
    branch: a new run); else a fresh start, refused when the folder already holds this run's checkpoints (unless
    ``allow_existing``)."""
    if ckpt_path:
        return ckpt_path
    session = cb._session
    assert session is not None
    saving = [p for p in session.saving if getattr(p, "options", None) is not None]
    auto = any(p.options.resume == "auto" for p in saving)  # any callback on the folder asks for it
    ask = start.Ask(ckpt_path, auto=auto, resume_from=cb.options.resume_from,
                    allow_existing=any(p.options.allow_existing for p in saving),
                    ray=checkpoint_reader() if auto else None)
    broadcast = (lambda obj: trainer.strategy.broadcast(obj, src=0)) if trainer.world_size > 1 else (lambda obj: obj)
    got = start.decide(ask, start.Place.of(session), rank_zero=trainer.is_global_zero, broadcast=broadcast)
    if got.branch:
        session.branched = True
    if got.message:
        rank_zero_info(got.message)
    return got.path


def optimizer_settings(trainer: "pl.Trainer") -> list[list[dict]]:
    """Every param group's settings (all but ``params``) of the Trainer's optimizers, as this run configured them."""
    return [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in trainer.optimizers]


def apply_branch_settings(trainer: "pl.Trainer", configured: list[list[dict]]) -> list[str]:
    """A branch (``resume_from``) restored its parent's optimizer states, whose param groups carry the parent's
    settings; put back the ones this run configured (a new learning rate, weight decay, ...), and the schedulers'
    base learning rates with them. The moments and the schedule's position stay. Returns what changed."""
    changed = []
    opts = trainer.optimizers
    if len(opts) != len(configured):
        return changed
    for i, (opt, groups) in enumerate(zip(opts, configured)):
        if len(opt.param_groups) != len(groups):
            continue
        for j, (g, mine) in enumerate(zip(opt.param_groups, groups)):
            scheduled = "initial_lr" in g and "initial_lr" in mine
            for k, v in mine.items():
                if k not in g or not _differs(g[k], v) or (scheduled and k == "lr"):
                    continue
                if scheduled and k == "initial_lr" and g["initial_lr"]:
                    # a scheduled learning rate: the new base, at the schedule's position (lr scaled alike)
                    old_lr = g["lr"]
                    g["lr"] = old_lr * v / g["initial_lr"]
                    changed.append(f"optimizer {i} group {j} lr: {old_lr!r} -> {g['lr']!r}")
                changed.append(f"optimizer {i} group {j} {k}: {g[k]!r} -> {v!r}")
                g[k] = v
    for cfg in trainer.lr_scheduler_configs:
        sched = cfg.scheduler
        if hasattr(sched, "base_lrs") and hasattr(sched, "optimizer"):
            sched.base_lrs = [g.get("initial_lr", g["lr"]) for g in sched.optimizer.param_groups]
    return changed


def _differs(a: Any, b: Any) -> bool:
    try:
        return bool(a != b)
    except Exception:  # noqa: BLE001 - tensors and other values without a plain truth value
        return a is not b
