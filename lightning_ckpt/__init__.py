"""lightning_ckpt: checkpointing for PyTorch Lightning that does not stall training and can be trusted."""
__version__ = "0.1.0"

from .callbacks import (
    BackupToS3,
    BestMetricCheckpoint,
    EarlyStopAndSave,
    ExportOnTrainEnd,
    LightningCkptIO,
    MonitorNotFoundError,
    PeriodicCheckpoint,
    PreemptionCheckpoint,
    RetentionPolicy,
)
from .checkpoints import (
    CheckpointInfo,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_into,
    load_weights,
    resume_path,
    verify_checkpoint,
)
from .errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointWriteError,
)
from .diff import diff_checkpoints
from .export import export_checkpoint
from .merge import merge_checkpoint
from .stages import StageCache, StageCacheWarning, UncacheableValueError, checkpointed_stage
from .writer import CheckpointWriter

__all__ = [
    "BackupToS3",
    "StageCache",
    "StageCacheWarning",
    "UncacheableValueError",
    "checkpointed_stage",
    "BestMetricCheckpoint",
    "EarlyStopAndSave",
    "ExportOnTrainEnd",
    "MonitorNotFoundError",
    "RetentionPolicy",
    "diff_checkpoints",
    "export_checkpoint",
    "load_into",
    "load_weights",
    "merge_checkpoint",
    "resume_path",
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
    "PreemptionCheckpoint",
    "__version__",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "verify_checkpoint",
]
