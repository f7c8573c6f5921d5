"""Exact resume: where in a training step a save takes the state, what a resumed run must redo to stand where the
saved run stood, and the configurations where that cannot hold (said at the first save, recorded in the manifest).

A save takes the state at the *end of its training step*: the last of our hooks that a run which goes on runs in that
step (``compat.step_end_hook``): ``on_train_epoch_end`` when the step ends an epoch, else ``on_validation_end`` when
validation is scheduled after the batch, else ``on_train_batch_end``. Requests from earlier hooks of the step wait
for it; requests from later hooks of the same step (the epoch end Lightning also runs when ``max_steps`` or a stop
cuts an epoch short, a validation run only because the run stops, ``on_train_end``) add their tags to that save. The
end of ``fit`` is foreseen at the last step's end (``max_steps``, ``max_epochs``, a stop), so its ``final`` save
holds a state the run can go on from.

On resume (:func:`on_train_data_ready`, right after Lightning set up the training data, before its loop decides how
to restart): the Trainer's callback metrics and the module's torchmetrics states come back as they were; a checkpoint
saved at an epoch end starts the next epoch as the uninterrupted run did (a new loader iterator, the epoch hooks),
where Lightning would resume an iteration-based fit as an unfinished epoch; the ``ReduceLROnPlateau`` steps Lightning
runs right after the hook of the save are replayed; and the RNG states come back last, before anything after the
save point draws from them (the next epoch's loader iterator seeds itself from the global RNG).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from ..policy.enums import MID_EPOCH, Hook, Position, Stage, StepEnd
from . import compat

log = logging.getLogger("lightning_ckpt")


def stage_of(trainer: Any, fit: Any, hook: Hook) -> Stage:
    """Where ``hook`` stands in the current training step: ``WAIT`` (the step goes on to a later hook of ours),
    ``END`` (the step's last hook: its save takes the state here) or ``AFTER`` (past it: requests add their tags
    to the step's save). ``fit.step_plan`` (a :class:`~lightning_ckpt.callbacks.context.FolderFit`) remembers, from
    the step's ``on_train_batch_end``, which hook ends it; ``fit.session`` is the folder's session."""
    step = int(trainer.global_step)
    if hook == Hook.BATCH_END:
        end = compat.step_end_hook(trainer)
        fit.step_plan = (step, end)
        return Stage.END if end == StepEnd.BATCH_END else Stage.WAIT
    plan = fit.step_plan if fit.step_plan is not None and fit.step_plan[0] == step else None
    if hook == Hook.VALIDATION_END:
        if plan is not None and plan[1] in (StepEnd.VALIDATION_END, StepEnd.ACCUMULATING):
            return Stage.END  # (a validation in the middle of gradient accumulation is recorded as not exact)
        return Stage.WAIT if plan is not None and plan[1] == StepEnd.EPOCH_END else Stage.AFTER
    if hook == Hook.EPOCH_END:
        return Stage.END if compat.epoch_ended(trainer) else Stage.AFTER
    # train_end: after the step's save if it has one, else the state is taken now
    session = fit.session
    pending = session.writer.pending
    saved = (pending is not None and pending.step == step) or session.last_saved_step == step
    return Stage.AFTER if saved else Stage.END


# ----------------------------------------------------------------------------------------------------- saving
def resume_state(trainer: Any, position: Position, after: bool, early: bool = False) -> dict:
    """Our part of a full checkpoint beyond Lightning's own: where the state was taken, the Trainer's callback
    metrics, the module's torchmetrics states, and why a resume from it would not be exact (empty when it is)."""
    position = Position(position)
    ended_here = (Position.EPOCH_END, Position.TRAIN_END, Position.AFTER_STEP)
    epoch_ended = bool(compat.epoch_ended(trainer)) if position in ended_here else False
    reset = position == Position.EPOCH_END and epoch_ended  # Lightning resets logged training metrics after this hook
    return {
        "position": position.value,  # a plain string in the checkpoint
        "epoch_ended": epoch_ended,
        "callback_metrics": {k: v.detach() for k, v in trainer.callback_metrics.items() if isinstance(v, torch.Tensor)},
        "metric_states": _metric_states(trainer, reset),
        "inexact": inexact_reasons(trainer, position, after, epoch_ended, early),
    }


def _metric_states(trainer: Any, reset_logged: bool) -> dict:
    """``{module path: {"state": {name: value}, "updates": n}}`` of every torchmetrics ``Metric`` in the module: their
    states are not in the module's ``state_dict`` unless made persistent, and a resume in the middle of an epoch
    must continue their accumulation. Metrics that Lightning resets right after this hook (logged in training with
    ``on_epoch=True``, at an epoch end) are recorded as reset."""
    module = trainer.lightning_module
    if module is None:
        return {}
    reset_ids = {id(m) for m in compat.logged_training_metric_objects(trainer)} if reset_logged else set()
    out = {}
    for name, m in module.named_modules():
        if not _is_metric(m):
            continue
        if id(m) in reset_ids:
            out[name] = {"reset": True}
            continue
        state = {}
        for k, v in m.metric_state.items():
            state[k] = [t.detach().clone() for t in v] if isinstance(v, list) else v.detach().clone()
        out[name] = {"state": state, "updates": int(m.update_count)}
    return out


def _is_metric(m: Any) -> bool:
    return hasattr(m, "metric_state") and hasattr(m, "update_count") and hasattr(m, "reset") and \
        isinstance(m, torch.nn.Module)


def inexact_reasons(trainer: Any, position: Position, after: bool, epoch_ended: bool, early: bool = False) -> list[str]:
    """Why resuming from a checkpoint saved now would not reproduce the uninterrupted run, each with what to change.
    Empty when the resume is exact."""
    reasons: list[str] = []
    mid = position in MID_EPOCH or (position != Position.EPOCH_END and not epoch_ended)  # the state is inside an epoch
    if early:
        reasons.append(
            "a preemption took the state before the end of its training step (the validation or epoch end that "
            "follows did not finish: SIGTERM stops Lightning there), and a resumed run does not run the rest of that "
            "step. Preempt with a signal Lightning does not act on itself (e.g. SIGUSR1 via --signal=USR1@90) so "
            "the step ends before the save")
    if after or position == Position.LATE or (position == Position.TRAIN_END and not epoch_ended):
        reasons.append(
            "the state was taken after the end of its training step (the run stopped in a way that could not be "
            "foreseen at the step's end, e.g. should_stop set in LightningModule.on_train_batch_end): a resumed run "
            "does not continue where the run that went on would be. Stop from a callback or validation instead")
    if position == Position.AFTER_STEP and not epoch_ended and compat.step_end_hook(trainer) == StepEnd.VALIDATION_END:
        reasons.append(
            "the state was taken after Lightning ended its step on SIGTERM, after the step's validation: a resumed "
            "run repeats what Lightning does after that validation (step-interval plateau schedulers, the logging "
            "step). Preempt with a signal Lightning does not act on (e.g. SIGUSR1)")
    if mid and compat.accumulating(trainer):
        reasons.append(
            "the save falls in the middle of gradient accumulation (accumulate_grad_batches): the accumulated "
            "gradients are not saved. Align val_check_interval with accumulate_grad_batches")
    for loader in compat.train_loaders(trainer):
        reasons += _loader_reasons(loader, mid)
    if mid:
        agg = compat.epoch_aggregated_training_metrics(trainer)
        if agg:
            reasons.append(
                f"Lightning keeps the running epoch aggregate of {', '.join(agg)} (logged in training with "
                "on_epoch=True) outside every checkpoint: after a resume in the middle of an epoch it covers the rest "
                "of the epoch only. Save at epoch ends (every_n_epochs), or log these with on_epoch=False or as a "
                "torchmetrics Metric")
        from lightning.pytorch.callbacks import StochasticWeightAveraging

        for cb in trainer.callbacks:
            if isinstance(cb, StochasticWeightAveraging) and trainer.current_epoch >= cb.swa_start:
                reasons.append(
                    "StochasticWeightAveraging sets up its SWALR scheduler in on_train_epoch_start, which Lightning "
                    "does not run when it resumes in the middle of an epoch: that epoch's scheduler step is lost. "
                    "Save at epoch ends (every_n_epochs) while SWA is active")
    return reasons


def _loader_reasons(loader: Any, mid: bool) -> list[str]:
    from torch.utils.data import DataLoader, IterableDataset, RandomSampler

    name = type(loader).__name__
    stateful = callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))
    if not isinstance(loader, DataLoader):
        if mid and not stateful:
            return [f"the training loader {name} does not save its position (no state_dict/load_state_dict): "
                    "Lightning restarts its epoch from the first batch. Use torchdata's StatefulDataLoader, or save "
                    "at epoch ends only (every_n_epochs)"]
        return []
    sampler = loader.sampler if loader.batch_sampler is None else getattr(loader.batch_sampler, "sampler", None)
    shuffles = isinstance(sampler, RandomSampler) or type(sampler).__name__ == "RandomSampler"
    own_generator = getattr(sampler, "generator", None)
    reasons = []
    if stateful:  # torchdata's StatefulDataLoader: Lightning saves and restores its state
        if shuffles and loader.generator is not None and own_generator is loader.generator:
            reasons.append(
                f"{name}(generator=...) is not restored exactly (its iterator draws a seed from the generator after "
                "the sampler saved the generator's state, and the restore does not replay that draw): the epochs "
                "after the resume are shuffled differently. Give the generator to the sampler instead "
                "(sampler=torchdata.stateful_dataloader.sampler.RandomSampler(dataset, generator=g)), or drop "
                "generator= and seed before building the loader (its sampler then seeds itself from the global RNG)")
        if isinstance(loader.dataset, IterableDataset) and _length(loader) is None:
            reasons.append(
                f"{name} over an IterableDataset without __len__: Lightning fetches one batch ahead to find the end "
                "of an epoch, so the saved loader state is a batch ahead in the middle of an epoch, and a resumed run "
                "fetches a batch of the next epoch before it starts it: a batch is skipped. Give the dataset a "
                "__len__")
        return reasons
    if mid:
        reasons.append(
            f"the training {name} does not save its position in the epoch (nor its order): Lightning restarts the "
            "epoch from its first batch. Use torchdata's StatefulDataLoader (a drop-in replacement for DataLoader), "
            "or save at epoch ends only (every_n_epochs)")
    if shuffles and own_generator is not None:
        reasons.append(
            f"{name}(shuffle=True, generator=...) does not save its generator: the epochs after the resume are "
            "shuffled differently. Use torchdata's StatefulDataLoader (which saves it), or leave generator unset: the "
            "global RNG then shuffles, and the checkpoint restores it")
    return reasons


def _length(loader: Any) -> Optional[int]:
    try:
        return len(loader)
    except TypeError:
        return None


# ----------------------------------------------------------------------------------------------------- resuming
def on_train_data_ready(trainer: Any, info: Optional[dict], rng: Optional[dict]) -> None:
    """Right after the fit loop set up its training data on resume (see the module docstring): put back what
    Lightning does not, then the RNG states."""
    from ..session.rng import restore_rng

    if info:
        metrics = info.get("callback_metrics") or {}
        if metrics:
            trainer.callback_metrics.update(metrics)  # the dict the Trainer holds (reset at the start of fit)
        _restore_metric_states(trainer, info.get("metric_states") or {})
        position = info.get("position")  # a plain string, as saved (equal to its Position)
        if position == Position.EPOCH_END:
            # Lightning steps the epoch-interval ReduceLROnPlateau schedulers right after on_train_epoch_end
            compat.replay_plateau_steps(trainer, "epoch")
        if position == Position.EPOCH_END or (position in (Position.TRAIN_END, Position.AFTER_STEP)
                                               and info.get("epoch_ended")):
            compat.load_skipped_loader_states(trainer)
            compat.resume_at_epoch_start(trainer)
        elif position == Position.BATCH_END:
            # and the step-interval ones right after on_train_batch_end (after validation: Lightning replays those)
            compat.replay_plateau_steps(trainer, "step")
    if rng is not None:
        restore_rng(rng)


def _restore_metric_states(trainer: Any, saved: dict) -> None:
    module = trainer.lightning_module
    if module is None or not saved:
        return
    mods = dict(module.named_modules())
    for name, entry in saved.items():
        m = mods.get(name)
        if m is None or not _is_metric(m) or not isinstance(entry, dict):
            continue
        if entry.get("reset"):
            m.reset()
            continue
        for k, v in (entry.get("state") or {}).items():
            current = getattr(m, k, None)
            if isinstance(current, list):
                current.clear()
                current.extend(t.to(module.device) for t in v)
            elif isinstance(current, torch.Tensor):
                setattr(m, k, v.to(current.device, current.dtype))
        compat.set_metric_update_count(m, int(entry.get("updates", 0)))
