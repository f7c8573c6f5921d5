"""A Lightning ``CheckpointIO`` that reads lightning_ckpt checkpoint folders, writes them for Lightning Fabric, and
passes everything else on.

The saving callbacks install it in their ``setup`` hook, which Lightning calls before it restores ``ckpt_path``, so
``Trainer.fit(model, ckpt_path=<checkpoint folder>)`` works with no plugin argument. Without one of our callbacks,
pass ``Trainer(plugins=[LightningCkptIO()])``.

Under Fabric (``Fabric(plugins=[LightningCkptIO()])``), ``fabric.save(path, state)`` writes a checkpoint folder at
``path`` and ``fabric.load(path, state)`` restores from one (see ``callbacks/fabric.py``). A Trainer's checkpoint
dictionary (``trainer.save_checkpoint``, Lightning's ``ModelCheckpoint``) still goes to the wrapped IO: the
Trainer's checkpoints of this package are the callbacks' business.
"""
from __future__ import annotations

from typing import Any, Optional

from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ..errors import CheckpointMismatchError
from ..load import load_checkpoint, load_into
from ..read import is_checkpoint_dir, read_checkpoint_manifest
from ..tools.prune import remove_checkpoint
from ..writer.options import check_bool
from . import compat
from .fabric import FabricFolders, from_checkpoint
from ..policy.enums import Kind


class LightningCkptIO(CheckpointIO):
    """Loads lightning_ckpt folders (verified, no pickle); under Fabric, saves them too. A Trainer's checkpoints,
    and paths that are no checkpoint folder, go to ``wrapped`` (``TorchCheckpointIO`` by default).

    Args:
        wrapped: the IO for everything else.
        async_save: Fabric saves: ``fabric.save`` returns once the state is copied into host buffers; the files
            are written and committed in a background thread (a later save, a load, ``teardown`` and the end of the
            process wait for it).
        dedup: Fabric saves: share unchanged tensors between the checkpoints of a folder (its content store).
        fsync: Fabric saves: make files durable before the commit.
    """

    def __init__(self, wrapped: Optional[CheckpointIO] = None, *, async_save: bool = False, dedup: bool = True,
                 fsync: bool = True) -> None:
        super().__init__()
        self.wrapped = wrapped if wrapped is not None else TorchCheckpointIO()
        self.trainer: Any = None
        self.async_save = check_bool("async_save", async_save)
        self.fabric = FabricFolders(async_save=self.async_save, dedup=check_bool("dedup", dedup),
                                    fsync=check_bool("fsync", fsync))

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if self.trainer is not None or _is_trainer_checkpoint(checkpoint):
            self.wrapped.save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"LightningCkptIO.save_checkpoint takes no storage_options (got {storage_options!r})")
        self.fabric.save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict[str, Any]:
        if self.trainer is None:
            self._saves_done()
        if self.trainer is None and is_checkpoint_dir(path):  # Fabric (or a Trainer without our callbacks)
            self._check_kind(str(path))
            ckpt = load_checkpoint(path, map_location=map_location if map_location is not None else "cpu", rank=0)
            return from_checkpoint(ckpt)
        if is_checkpoint_dir(path):
            self._check_kind(str(path))
            rank = int(getattr(self.trainer, "global_rank", 0) or 0)  # each rank restores its own state and RNG
            ckpt = load_checkpoint(path, map_location=map_location if map_location is not None else "cpu", rank=rank)
            self._check_fits_model(ckpt, str(path))
            return ckpt
        kwargs = {} if weights_only is None else {"weights_only": weights_only}
        if map_location is not None:
            kwargs["map_location"] = map_location
        return self.wrapped.load_checkpoint(path, **kwargs)

    def remove_checkpoint(self, path: Any) -> None:
        if is_checkpoint_dir(path):
            self.fabric.wait()
            # an explicit request for this path (Fabric has no retention of its own that would call it): the
            # protections of automatic deletions (the newest, the best, branch points) do not apply
            remove_checkpoint(path, force=True)
            return
        self.wrapped.remove_checkpoint(path)

    def teardown(self) -> None:
        try:
            self.fabric.close()
        finally:
            self.wrapped.teardown()

    def _saves_done(self) -> None:
        """Before a load: this process's saves are committed, and with ``async_save`` under several processes,
        rank 0's too (Fabric saves on rank 0 only; every rank calls the IO to load, so the barrier is safe)."""
        self.fabric.wait()
        if self.async_save:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.barrier()

    def _check_kind(self, path: str) -> None:
        kind = read_checkpoint_manifest(path).get("kind", Kind.FULL.value)
        trainer = self.trainer
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        if kind != Kind.FULL and (fn is None or fn == "fit"):
            raise CheckpointMismatchError(
                f"{path} is a {kind!r} checkpoint: it does not hold the full training state, so training cannot "
                "resume from it. Resume from a checkpoint saved with content='full', or load its weights with "
                "lightning_ckpt.load_weights(path, model, strict=False)"
                + (" (it has no weights)" if kind == Kind.LIGHT else "")
                + " or pass it to trainer.validate/test."
            )

    def _check_fits_model(self, ckpt: dict, path: str) -> None:
        trainer = self.trainer
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        sd = ckpt.get("state_dict")
        if module is None or not isinstance(sd, dict):
            return
        own = module.state_dict()
        bad = [
            f"{k}: checkpoint {list(v.shape)} vs model {list(own[k].shape)}"
            for k, v in sd.items()
            if k in own and hasattr(v, "shape") and hasattr(own[k], "shape") and tuple(v.shape) != tuple(own[k].shape)
        ]
        if bad:
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            raise CheckpointMismatchError(
                f"the checkpoint {path} does not fit this model: tensor shapes differ for " + "; ".join(bad[:5]) + more
                + ". The model was built with different hyperparameters than the run that saved it; build it with "
                "the saved ones (see `lightning-ckpt show PATH`, field hparams) or start a fresh run."
            )


def _is_trainer_checkpoint(checkpoint: Any) -> bool:
    """A Trainer's checkpoint dictionary (``trainer.save_checkpoint``, Lightning's ``ModelCheckpoint``), not
    Fabric's state: Lightning writes its version into every one (its checkpoint connector's ``dump_checkpoint``)."""
    return isinstance(checkpoint, dict) and "pytorch-lightning_version" in checkpoint


def install_checkpoint_io(trainer: Any) -> LightningCkptIO:
    """Wrap the strategy's CheckpointIO (idempotent) so it can read lightning_ckpt folders; for the sharded
    strategies, which load checkpoints themselves, wrap their ``load_checkpoint`` too."""
    strategy = trainer.strategy
    current = strategy.checkpoint_io
    if isinstance(current, LightningCkptIO):
        current.trainer = trainer
        io = current
    else:
        io = LightningCkptIO(current)
        io.trainer = trainer
        strategy.checkpoint_io = io
    if _loads_sharded(strategy) and not getattr(strategy.load_checkpoint, "_lightning_ckpt", False):
        strategy.load_checkpoint = _sharded_loader(strategy, io, strategy.load_checkpoint)
    return io


def _loads_sharded(strategy: Any) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))


def _sharded_loader(strategy: Any, io: LightningCkptIO, original: Any) -> Any:
    """``FSDPStrategy`` and ``ModelParallelStrategy`` read ``ckpt_path`` with their own ``load_checkpoint`` (DCP's
    pickled format or ``torch.load``), not through the CheckpointIO. For a lightning_ckpt folder this one loads the
    model and optimizer shards in place instead: each rank reads only the bytes of its own shards, for any world
    size the checkpoint was saved with (DCP plans the resharding), and every byte is verified. The rest of the
    checkpoint (loops, callbacks, schedulers, this rank's RNG) comes from this rank's state file."""

    def load_sharded(checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        path = strategy.broadcast(checkpoint_path)  # as the strategies do: every rank loads rank 0's choice
        if not is_checkpoint_dir(path):
            return original(checkpoint_path, *args, **kwargs)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = str(path)
        io._check_kind(path)
        trainer = io.trainer
        module = strategy.model
        strict = bool(getattr(strategy.lightning_module, "strict_loading", True))
        optimizers = [compat.plain_optimizer(o) for o in strategy.optimizers]
        ckpt = load_checkpoint(path, rank=int(getattr(trainer, "global_rank", 0) or 0),
                               without_tensors_of=("state_dict", "optimizer_states"))
        state: dict[str, Any] = {"state_dict": get_model_state_dict(module)}
        if optimizers:
            state["optimizer_states"] = [get_optimizer_state_dict(module, o) for o in optimizers]
        load_into(path, state)
        set_model_state_dict(module, state["state_dict"], options=StateDictOptions(strict=strict))
        for opt, osd, saved in zip(optimizers, state.get("optimizer_states", []), ckpt.get("optimizer_states") or []):
            osd["param_groups"] = saved["param_groups"]  # learning rates and the rest, as saved
            set_optimizer_state_dict(module, opt, optim_state_dict=osd)
        ckpt["state_dict"] = state["state_dict"]  # loaded in place above: the strategy's own restore is a no-op
        if optimizers:
            ckpt["optimizer_states"] = state["optimizer_states"]
        return ckpt

    load_sharded._lightning_ckpt = True  # type: ignore[attr-defined]
    return load_sharded
