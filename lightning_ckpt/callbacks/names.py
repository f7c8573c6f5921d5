"""Lightning's names for checkpoints, for this package's folders: the default ``dirpath``, ``ckpt_path="last"`` and
``"best"``, and where a ``fit`` starts (``ckpt_path``, ``resume="auto"``, ``resume_from=``, or fresh; a fresh start
into a folder that holds the same run's checkpoints is refused unless ``allow_existing``)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional

from ..errors import CheckpointError, CheckpointNotFoundError, FolderNotEmptyError
from ..read import _scan, of_run, read_checkpoint_manifest, verify_checkpoint
from ..session import resume
from ..session.options import check_dirpath
from ..store import is_remote, open_store
from ..folder.best import best_checkpoints

if TYPE_CHECKING:
    import lightning.pytorch as pl

BaseCheckpointCallback = Any  # callbacks.base imports this module: annotations only


def default_dirpath(trainer: "pl.Trainer") -> str:
    """``<default_root_dir>/checkpoints``, where Lightning's ``ModelCheckpoint`` writes without a logger."""
    return check_dirpath(os.path.join(str(trainer.default_root_dir), "checkpoints"))


def folder_of(cb: BaseCheckpointCallback, trainer: "pl.Trainer") -> str:
    return cb.dirpath if cb.dirpath is not None else default_dirpath(trainer)


def _backups(cb: BaseCheckpointCallback) -> list[str]:
    return [loc.uri for loc in cb.options.locations]


def resolve_last(cbs: list, trainer: "pl.Trainer") -> Optional[str]:
    """The newest committed, verified checkpoint of the callbacks' folders (and their backups) for their run."""
    best: tuple = (-1, 0.0, None)
    for cb in cbs:
        path = resume.resume_path(folder_of(cb, trainer), _backups(cb), run_name=cb.options.run_name)
        if path is None:
            continue
        man = read_checkpoint_manifest(path)
        key = (int(man["step"]), float(man.get("created_unix") or 0.0), path)
        if key[:2] > best[:2]:
            best = key
    if best[2] is None:
        from lightning.pytorch.utilities.rank_zero import rank_zero_warn

        rank_zero_warn(f"ckpt_path='last': no committed checkpoint in {', '.join(sorted({folder_of(c, trainer) for c in cbs}))}"
                       "; no checkpoint is loaded (a fit starts fresh)")
    return best[2]


def resolve_best(cbs: list, trainer: "pl.Trainer") -> str:
    """The best committed, verified checkpoint by the monitored metric: the callbacks' own rule (monitor, mode) when
    one of them ranks checkpoints, else the rule recorded in the folder's manifests."""
    tried = []
    for cb in sorted(cbs, key=lambda c: getattr(c, "monitor", None) is None):
        folder = folder_of(cb, trainer)
        monitor, mode = getattr(cb, "monitor", None), getattr(cb, "mode", None)
        for c in best_checkpoints(folder, monitor=monitor, mode=mode, run_name=cb.options.run_name):
            try:
                verify_checkpoint(c.path)
                return c.path
            except CheckpointError as e:
                from lightning.pytorch.utilities.rank_zero import rank_zero_warn

                rank_zero_warn(f"ckpt_path='best': skipping corrupt {c.path}: {e}")
        tried.append(folder)
    raise CheckpointNotFoundError(
        f"ckpt_path='best': no checkpoint tagged best in {', '.join(sorted(set(tried)))} (a BestMetricCheckpoint or "
        "EarlyStopAndSave tags them). Pass ckpt_path='last' or the path of a checkpoint.")


def resolve_ckpt_path(cb: BaseCheckpointCallback, trainer: "pl.Trainer", name: str, others: list) -> Optional[str]:
    cbs = [cb] + [o for o in others if getattr(o, "options", None) is not None and hasattr(o, "dirpath")]
    return resolve_last(cbs, trainer) if name == "last" else resolve_best(cbs, trainer)


def _branch_point(cb: BaseCheckpointCallback, folder: str) -> str:
    src = cb.options.resume_from
    assert src is not None
    if "/" not in src and os.sep not in src and not is_remote(src):  # a checkpoint name in this folder
        src = f"{folder.rstrip('/')}/{src}" if is_remote(folder) else os.path.join(folder, src)
    try:
        verify_checkpoint(src)
    except CheckpointNotFoundError as e:
        raise CheckpointNotFoundError(f"resume_from={cb.options.resume_from!r}: {e}") from None
    return src


def choose_start(cb: BaseCheckpointCallback, trainer: "pl.Trainer", ckpt_path: Any) -> Any:
    """Where this ``fit`` starts (rank 0 decides, every rank gets the answer): the given ``ckpt_path``; else with
    ``resume="auto"`` the newest valid checkpoint of this run; else ``resume_from`` (a branch: a new run); else a
    fresh start, refused when the folder already holds this run's checkpoints (unless ``allow_existing``)."""
    if ckpt_path:
        return ckpt_path
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    session = cb._session
    assert session is not None
    o = cb.options
    saving = [p for p in session.saving if getattr(p, "options", None) is not None]
    auto = any(p.options.resume == "auto" for p in saving)  # any callback on the folder asks for it
    allow_existing = any(p.options.allow_existing for p in saving)
    broadcast = (lambda obj: trainer.strategy.broadcast(obj, src=0)) if trainer.world_size > 1 else (lambda obj: obj)
    if auto:
        from .ray import start_from_ray

        reported = start_from_ray(session, trainer.is_global_zero, broadcast)  # Ray's checkpoint, when under Ray
        if reported is not None:
            session.branched = reported[1]
            rank_zero_info(f"lightning_ckpt: resume='auto': {'branching' if reported[1] else 'resuming'} from "
                           f"{reported[0]} (the checkpoint Ray hands this attempt)")
            return reported[0]
        found = resume.choose(session, trainer.is_global_zero, broadcast)
        if found:
            rank_zero_info(f"lightning_ckpt: resume='auto': resuming from {found}")
            return found
    path, error = None, None
    if trainer.is_global_zero:
        try:
            if o.resume_from is not None:
                path = _branch_point(cb, session.key)
            elif not allow_existing:
                _refuse_existing(cb, session)
        except CheckpointError as e:
            error = (type(e).__name__, str(e))
    path, error = broadcast((path, error))
    if error is not None:
        cls = {"FolderNotEmptyError": FolderNotEmptyError, "CheckpointNotFoundError": CheckpointNotFoundError}
        raise cls.get(error[0], CheckpointError)(error[1])
    if path is not None:
        session.branched = True
        rank_zero_info(f"lightning_ckpt: starting run {o.run_name or '(main)'} from {path} (resume_from)")
        return path
    if auto:
        rank_zero_info(f"lightning_ckpt: resume='auto': no checkpoint in {session.key} or its backups; starting fresh")
    return None


def _refuse_existing(cb: BaseCheckpointCallback, session: Any) -> None:
    where = session.remote or session.dirpath
    try:
        if not session.remote and not os.path.isdir(where):
            return
        if open_store(where).newest_hinted(cb.options.run_name, False) == []:
            return  # the folder's index says this run has no checkpoint there (no manifest read, no GET each)
        ckpts = of_run(_scan(where)[0], cb.options.run_name)
    except CheckpointError:
        raise
    except Exception:  # noqa: BLE001 - S3 unreachable: the first upload reports it
        return
    if not ckpts:
        return
    newest = ckpts[-1]
    run = f" of run {cb.options.run_name!r}" if cb.options.run_name else ""
    raise FolderNotEmptyError(
        f"{session.key} already holds {len(ckpts)} checkpoint(s){run} (newest: {newest.name}, step {newest.step}) and "
        "this fit starts fresh, so two runs would mix in one folder. Resume it (trainer.fit(..., ckpt_path='last') or "
        "resume='auto'), branch from one of them (resume_from=..., run_name=...), choose another dirpath, or pass "
        "allow_existing=True to add this run's checkpoints next to them.")


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
