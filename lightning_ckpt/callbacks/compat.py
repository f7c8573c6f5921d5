"""Every private Lightning attribute this package touches, in one place, checked against the installed version.

Lightning has no public API for some things the callbacks need (dumping the training state without writing it,
restoring from a path chosen after ``setup``, knowing whether validation runs after this batch, recognising its SLURM
requeue handler). Each such use is a function here. :func:`check` runs when a callback is set up and raises a
:class:`~lightning_ckpt.CheckpointError` naming the supported Lightning versions when any of them is missing: never a
silent fallback. CI runs the test suite on the newest supported Lightning and a smoke subset on the oldest.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import lightning
import lightning.pytorch as pl
from lightning.fabric.utilities.data import AttributeDict

from ..errors import CheckpointError
from ..format.codec import register_safe_type
from ..policy.enums import StepEnd

register_safe_type(AttributeDict)  # the type of a module's hparams, which Lightning saves in every checkpoint

SUPPORTED = ">=2.5,<2.7"  # keep in step with pyproject.toml; .ci/run tests the oldest (2.5.0) and the newest


def _missing(obj: Any, attrs: tuple[str, ...], where: str) -> list[str]:
    return [f"{where}.{a}" for a in attrs if not hasattr(obj, a)]


def check(trainer: "pl.Trainer") -> None:
    """Raise when the installed Lightning lacks an attribute this package uses (see the module docstring)."""
    from lightning.pytorch.callbacks import Callback

    missing = _missing(trainer, ("_checkpoint_connector", "_accelerator_connector", "fit_loop"), "Trainer")
    if not missing:
        missing += _missing(trainer._checkpoint_connector, ("dump_checkpoint", "resume_start"), "_CheckpointConnector")
        missing += _missing(trainer._accelerator_connector, ("cluster_environment",), "_AcceleratorConnector")
        missing += _missing(trainer.fit_loop, ("_data_fetcher", "epoch_loop"), "_FitLoop")
        el = getattr(trainer.fit_loop, "epoch_loop", None)
        missing += _missing(el, ("_skip_next_val", "_should_check_val_fx", "batch_progress", "_num_ready_batches_reached",
                                 "_should_accumulate", "update_lr_schedulers", "_results"), "_TrainingEpochLoop")
        missing += _missing(trainer.fit_loop, ("_can_stop_early", "_combined_loader", "setup_data", "_restarting",
                                              "_combined_loader_states_to_load"),
                            "_FitLoop")
    missing += _missing(Callback, ("_generate_state_key",), "Callback")
    from lightning.fabric.plugins.io import torch_io
    from lightning.pytorch.core import saving
    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

    missing += _missing(saving, ("pl_load",), "lightning.pytorch.core.saving")
    missing += _missing(torch_io, ("pl_load",), "lightning.fabric.plugins.io.torch_io")
    missing += _missing(_CheckpointConnector, ("_parse_ckpt_path",), "_CheckpointConnector")
    try:
        from lightning.pytorch.trainer.connectors import signal_connector as sc

        missing += _missing(sc, ("_SignalConnector", "_HandlersCompose"), "signal_connector")
        if hasattr(sc, "_SignalConnector"):
            missing += _missing(sc._SignalConnector, ("_slurm_sigusr_handler_fn",), "_SignalConnector")
    except ImportError:
        missing.append("lightning.pytorch.trainer.connectors.signal_connector")
    if missing:
        raise CheckpointError(
            f"lightning_ckpt supports Lightning {SUPPORTED}; the installed Lightning {lightning.__version__} lacks "
            f"{', '.join(missing)}. Install a supported version: pip install 'lightning{SUPPORTED}'")


def dump_checkpoint(trainer: "pl.Trainer", weights_only: bool) -> dict:
    """The checkpoint dictionary Lightning would save now (every callback's ``on_save_checkpoint`` included)."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=weights_only)


def intercept_resume(trainer: "pl.Trainer", choose: Callable[[Any], Any]) -> Callable[[], bool]:
    """Make the next ``fit`` restore from ``choose(ckpt_path)`` instead of ``ckpt_path``: Lightning calls
    ``_CheckpointConnector.resume_start`` after the callbacks' ``setup``. Returns ``undo()``, which puts the original
    back and says whether the interception ran (``resume="auto"`` asserts that it did)."""
    connector = trainer._checkpoint_connector
    original = connector.resume_start
    ran = []

    def resume_start(checkpoint_path: Any = None, *args: Any, **kwargs: Any) -> None:
        connector.resume_start = original  # once per fit
        ran.append(True)
        return original(choose(checkpoint_path), *args, **kwargs)

    connector.resume_start = resume_start

    def undo() -> bool:
        if connector.resume_start is resume_start:
            connector.resume_start = original
        return bool(ran)

    return undo


def step_end_hook(trainer: "pl.Trainer") -> StepEnd:
    """At ``on_train_batch_end``: the last of our hooks in this training step in a run that is not stopping here:
    ``"epoch_end"`` when the epoch ends after this batch, ``"validation_end"`` when validation is scheduled after
    it, else ``"batch_end"``. Validation that runs only because ``trainer.should_stop`` was set (Lightning validates
    before it stops) is not scheduled: a run that goes on would not run it. Mirrors
    ``_TrainingEpochLoop.on_advance_end`` and ``_FitLoop.on_advance_end``."""
    el = trainer.fit_loop.epoch_loop
    if el._num_ready_batches_reached():
        return StepEnd.EPOCH_END
    if el._skip_next_val:
        return StepEnd.BATCH_END
    stop = trainer.should_stop
    try:
        trainer.should_stop = False
        scheduled = bool(el._should_check_val_fx(trainer.fit_loop._data_fetcher))
    finally:
        trainer.should_stop = stop
    return StepEnd.VALIDATION_END if scheduled else StepEnd.BATCH_END


def epoch_ended(trainer: "pl.Trainer") -> bool:
    """At ``on_train_epoch_end``: did the epoch really end (every batch of it ran)? Lightning also calls the hook
    when ``max_steps`` or ``should_stop`` ends the loop in the middle of an epoch."""
    return bool(trainer.fit_loop.epoch_loop._num_ready_batches_reached())


def fit_ends_after_step(trainer: "pl.Trainer", epoch_end: bool) -> bool:
    """Will the fit end once the current training step is over (``max_steps`` reached, a stop requested that the
    loop honours, or, at a real epoch end, ``max_epochs`` reached)? Mirrors ``_FitLoop.done``."""
    if trainer.max_steps is not None and trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return True
    if trainer.should_stop and trainer.fit_loop._can_stop_early:
        return True
    max_epochs = trainer.max_epochs
    return bool(epoch_end and max_epochs is not None and max_epochs != -1 and trainer.current_epoch + 1 >= max_epochs)


def accumulating(trainer: "pl.Trainer") -> bool:
    """In ``on_train_batch_end`` (or a validation that follows it): the optimizer did not step after this batch
    (gradient accumulation), so this is not a step boundary."""
    module = trainer.lightning_module
    return bool(module is not None and module.automatic_optimization
                and trainer.fit_loop.epoch_loop._should_accumulate())


def after_train_data_setup(trainer: "pl.Trainer", fn: Callable[[], None]) -> Callable[[], None]:
    """Run ``fn()`` once, right after the fit loop has set up its training data at the start of ``fit`` (the loader
    states of a resumed checkpoint are loaded and the first iterator exists) and before the loop decides how to
    restart (``_FitLoop.reset``). Returns ``undo()``."""
    loop = trainer.fit_loop
    original = loop.setup_data
    own = "setup_data" in vars(loop)  # someone else's wrapper on the instance: put it back, not the class's method

    def undo() -> None:
        if vars(loop).get("setup_data") is setup_data:
            if own:
                loop.setup_data = original
            else:
                del loop.setup_data

    def setup_data(*args: Any, **kwargs: Any) -> Any:
        undo()  # once
        out = original(*args, **kwargs)
        fn()
        return out

    loop.setup_data = setup_data
    return undo


def resume_at_epoch_start(trainer: "pl.Trainer") -> None:
    """After the loops were restored from a checkpoint saved at the end of an epoch (and the training data was set
    up, the loader states loaded): start the next epoch as a run that never stopped does (``on_train_epoch_start``,
    a new loader iterator, the epoch's schedulers), instead of Lightning's restart path. Lightning restarts every
    iteration-based fit (``max_steps``) and then resumes such a checkpoint as an unfinished epoch."""
    loop = trainer.fit_loop
    loop._restarting = False  # not the FitLoop setter: it forces True for iteration-based training
    loop.epoch_loop.restarting = False  # and every loop below
    if hasattr(loop, "_resuming_from_checkpoint"):  # Lightning >= 2.5.1: else the epoch would reuse the old iterator
        loop._resuming_from_checkpoint = False


def load_skipped_loader_states(trainer: "pl.Trainer") -> None:
    """Load the training loaders' states of the restored checkpoint if Lightning skipped them (it loads them only
    when its fit loop restarts, not when an epoch-based fit resumes at an epoch end), and start an iterator from
    them, as Lightning does after loading them, so the next epoch's iterator continues from the saved state (a
    shuffling sampler's generator, a dataset's own position)."""
    loop = trainer.fit_loop
    states = loop._combined_loader_states_to_load
    if not states or loop._combined_loader is None or loop._data_fetcher is None:
        return
    loop._combined_loader._load_state_dicts(states)
    loop._combined_loader_states_to_load = []
    iter(loop._data_fetcher)


def end_restart_after_reset(trainer: "pl.Trainer") -> None:
    """After the fit loop decided how to restart (from ``on_train_start`` on): no longer mark the fit loop as
    restarting, so the end of the resumed epoch steps the epoch-interval ``ReduceLROnPlateau`` schedulers, which
    Lightning skips for the whole first epoch of a resumed run (``_FitLoop.on_advance_end``). The loops below keep
    their own flags."""
    trainer.fit_loop._restarting = False


def replay_plateau_steps(trainer: "pl.Trainer", interval: str) -> None:
    """Step the ``ReduceLROnPlateau`` schedulers of ``interval`` as Lightning does right after the hook a checkpoint
    was saved in (``_TrainingEpochLoop.update_lr_schedulers``), with the loop counters as restored."""
    trainer.fit_loop.epoch_loop.update_lr_schedulers(interval, update_plateau_schedulers=True)


def epoch_aggregated_training_metrics(trainer: "pl.Trainer") -> list[str]:
    """Names of values logged in training with ``on_epoch=True`` whose running aggregate Lightning keeps outside
    any checkpoint (logged tensors; a logged torchmetrics ``Metric`` keeps its own state)."""
    results = trainer.fit_loop.epoch_loop._results
    return sorted(r.meta.name for r in results.values()
                  if getattr(r, "is_tensor", False) and r.meta.on_epoch and r.update_called)


def logged_training_metric_objects(trainer: "pl.Trainer") -> list:
    """torchmetrics ``Metric`` objects logged in training (``self.log(name, metric)``): Lightning resets them right
    after ``on_train_epoch_end``."""
    results = trainer.fit_loop.epoch_loop._results
    return [r.value for r in results.values() if not getattr(r, "is_tensor", True) and hasattr(r, "value")]


def set_metric_update_count(metric: Any, n: int) -> None:
    """Put back how many updates a torchmetrics ``Metric`` had (``update_count`` has no setter): its ``compute``
    warns when it seems never updated."""
    metric._update_count = n
    metric._computed = None


def train_loaders(trainer: "pl.Trainer") -> list:
    """The training data loaders of the fit (each of a ``CombinedLoader``)."""
    combined = trainer.fit_loop._combined_loader
    return list(combined.flattened) if combined is not None else []


def cluster_environment(trainer: "pl.Trainer") -> Any:
    return trainer._accelerator_connector.cluster_environment


def is_lightning_requeue_handler(h: Any) -> bool:
    """Is ``h`` Lightning's SLURM auto-requeue handler (``_SignalConnector._slurm_sigusr_handler_fn``, which saves an
    ``hpc_ckpt_*.ckpt`` inside the signal handler and runs ``scontrol requeue``)?"""
    from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

    return getattr(h, "__func__", None) is _SignalConnector._slurm_sigusr_handler_fn


def without_lightning_requeue(handler: Any) -> tuple[bool, Any]:
    """``(found, rest)``: whether ``handler`` (as installed by Lightning for the requeue signal, possibly composed with
    other handlers) contains Lightning's SLURM requeue handler, and a handler that runs everything else it ran
    (``None`` if nothing is left)."""
    from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose

    if is_lightning_requeue_handler(handler):
        return True, None
    if isinstance(handler, _HandlersCompose):
        found, rest = False, []
        for h in handler.signal_handlers:
            f, r = without_lightning_requeue(h)
            found = found or f
            if r is not None:
                rest.append(r)
        if not found:
            return False, handler
        return True, (_HandlersCompose(rest) if rest else None)
    return False, handler


def plain_optimizer(opt: Any) -> Any:
    """The torch optimizer inside a ``LightningOptimizer`` (its ``_optimizer``), or ``opt`` itself."""
    from lightning.pytorch.core.optimizer import LightningOptimizer

    return opt._optimizer if isinstance(opt, LightningOptimizer) else opt


def state_key(callback: Any, **key: Any) -> str:
    """A callback's key in ``checkpoint["callbacks"]``, made as Lightning's own callbacks make theirs."""
    return callback._generate_state_key(**key)


def install_folder_loading() -> None:
    """Let Lightning's own loaders read this package's checkpoint folders: ``MyModule.load_from_checkpoint(folder)``
    and ``Trainer.fit/validate/test(ckpt_path=folder)`` without the plugin. Lightning reads every checkpoint through
    ``pl_load`` (``lightning.fabric.utilities.cloud_io._load``, bound in two modules); the wrapper reads a folder with
    :func:`lightning_ckpt.load_checkpoint` (verified, no pickle) and passes every other path on unchanged.
    Idempotent; installed when ``lightning_ckpt.callbacks`` is imported."""
    from lightning.fabric.plugins.io import torch_io
    from lightning.pytorch.core import saving

    from ..load import load_checkpoint
    from ..read import is_checkpoint_dir

    for module in (saving, torch_io):
        original = module.pl_load
        if getattr(original, "_lightning_ckpt", False):
            continue

        def pl_load(path_or_url: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            if isinstance(path_or_url, (str, os.PathLike)) and is_checkpoint_dir(path_or_url):
                map_location = kwargs.get("map_location", args[0] if args else None)
                return load_checkpoint(path_or_url, map_location=map_location or "cpu")
            return _original(path_or_url, *args, **kwargs)

        pl_load._lightning_ckpt = True  # type: ignore[attr-defined]
        module.pl_load = pl_load


def install_ckpt_path_names() -> None:
    """``ckpt_path="last"`` and ``"best"`` with this package's callbacks: Lightning resolves those names only for its
    own ``ModelCheckpoint`` (and before any callback hook runs), so its resolver asks every callback that has a
    ``resolve_ckpt_path(trainer, name)`` method first. Idempotent; installed when ``lightning_ckpt.callbacks`` is
    imported."""
    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

    original = _CheckpointConnector._parse_ckpt_path
    if getattr(original, "_lightning_ckpt", False):
        return

    def _parse_ckpt_path(self: Any, state_fn: Any, ckpt_path: Any, *args: Any, **kwargs: Any) -> Any:
        if ckpt_path in ("last", "best"):
            ours = [cb for cb in self.trainer.callbacks if callable(getattr(cb, "resolve_ckpt_path", None))]
            if ours:
                return ours[0].resolve_ckpt_path(self.trainer, ckpt_path, [cb for cb in ours[1:]])
        return original(self, state_fn, ckpt_path, *args, **kwargs)

    _parse_ckpt_path._lightning_ckpt = True  # type: ignore[attr-defined]
    _CheckpointConnector._parse_ckpt_path = _parse_ckpt_path


def load_module(cls: Any, path: Any, **kwargs: Any) -> Any:
    """``cls.load_from_checkpoint(path, **kwargs)`` for a checkpoint folder (or ``s3://`` URI) of this package:
    the module is rebuilt from the saved hyper-parameters and loaded with the verified weights, with Lightning's own
    semantics (``map_location``, ``strict``, hyper-parameter overrides as keyword arguments)."""
    install_folder_loading()
    return cls.load_from_checkpoint(path, **kwargs)
