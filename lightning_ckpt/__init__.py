"""lightning_ckpt: checkpointing for PyTorch Lightning that does not stall training and can be trusted."""
__version__ = "0.1.0"

from .callbacks import LightningCkptIO, PeriodicCheckpoint
from .checkpoints import CheckpointInfo, latest_checkpoint, list_checkpoints, load_checkpoint, verify_checkpoint
from .errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointWriteError,
)
from .writer import CheckpointWriter

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointInfo",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "CheckpointWriter",
    "LightningCkptIO",
    "PeriodicCheckpoint",
    "__version__",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "verify_checkpoint",
]
