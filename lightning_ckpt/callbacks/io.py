"""A Lightning ``CheckpointIO`` that reads lightning_ckpt checkpoint folders and passes everything else on.

The saving callbacks install it in their ``setup`` hook, which Lightning calls before it restores ``ckpt_path``, so
``Trainer.fit(model, ckpt_path=<checkpoint folder>)`` works with no plugin argument. Without one of our callbacks,
pass ``Trainer(plugins=[LightningCkptIO()])``.
"""
from __future__ import annotations

from typing import Any, Optional

from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ..checkpoints import is_checkpoint_dir, load_checkpoint, read_checkpoint_manifest
from ..errors import CheckpointMismatchError


class LightningCkptIO(CheckpointIO):
    """Loads lightning_ckpt folders (verified, no pickle); delegates saving and other paths to ``wrapped``."""

    def __init__(self, wrapped: Optional[CheckpointIO] = None) -> None:
        super().__init__()
        self.wrapped = wrapped if wrapped is not None else TorchCheckpointIO()
        self.trainer: Any = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        self.wrapped.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict[str, Any]:
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
        self.wrapped.remove_checkpoint(path)

    def teardown(self) -> None:
        self.wrapped.teardown()

    def _check_kind(self, path: str) -> None:
        kind = read_checkpoint_manifest(path).get("kind", "full")
        trainer = self.trainer
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        if kind != "full" and (fn is None or fn == "fit"):
            raise CheckpointMismatchError(
                f"{path} is a {kind!r} checkpoint: it does not hold the full training state, so training cannot "
                "resume from it. Resume from a checkpoint saved with content='full', or load its weights with "
                "lightning_ckpt.load_weights(path, model, strict=False)"
                + (" (it has no weights)" if kind == "light" else "")
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


def install_checkpoint_io(trainer: Any) -> LightningCkptIO:
    """Wrap the strategy's CheckpointIO (idempotent) so it can read lightning_ckpt folders."""
    strategy = trainer.strategy
    current = strategy.checkpoint_io
    if isinstance(current, LightningCkptIO):
        current.trainer = trainer
        return current
    io = LightningCkptIO(current)
    io.trainer = trainer
    strategy.checkpoint_io = io
    return io
