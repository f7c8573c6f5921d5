"""lightning_ckpt: checkpointing for PyTorch Lightning that does not stall training and can be trusted.

The public names below are imported on first use (PEP 562), so ``import lightning_ckpt`` and the command line stay
fast and import Lightning only when a callback is used. ``from lightning_ckpt import PeriodicCheckpoint`` and YAML
``class_path: lightning_ckpt.PeriodicCheckpoint`` work as usual.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

# public name -> module that defines it (relative to this package)
_EXPORTS = {
    # Lightning callbacks and plugin
    "BackupToS3": "callbacks",
    "BestMetricCheckpoint": "callbacks",
    "EarlyStopAndSave": "callbacks",
    "ExportOnTrainEnd": "callbacks",
    "LightningCkptIO": "callbacks",
    "MonitorNotFoundError": "callbacks",
    "PeriodicCheckpoint": "callbacks",
    "PreemptionCheckpoint": "callbacks",
    "RetentionPolicy": "callbacks",
    "SaveOptions": "session.options",
    "load_module": "callbacks",
    # reading
    "CheckpointInfo": "read",
    "latest_checkpoint": "read",
    "list_checkpoints": "read",
    "load_checkpoint": "load",
    "load_into": "load",
    "load_weights": "load",
    "verify_checkpoint": "read",
    "resume_path": "session.resume",
    # errors
    "CheckpointCorruptError": "errors",
    "CheckpointError": "errors",
    "CheckpointFormatError": "errors",
    "CheckpointMismatchError": "errors",
    "CheckpointNotFoundError": "errors",
    "CheckpointWriteError": "errors",
    "FolderNotEmptyError": "errors",
    "StorageUnavailableError": "errors",
    # writing without Lightning, and tools
    "CheckpointWriter": "writer",
    "diff_checkpoints": "tools.diff",
    "export_checkpoint": "tools.export",
    "merge_checkpoint": "tools.merge",
    # extras
    "StageCache": "extras.stages",
    "StageCacheWarning": "extras.stages",
    "UncacheableValueError": "extras.stages",
    "checkpointed_stage": "extras.stages",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_ckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .callbacks import (BackupToS3, BestMetricCheckpoint, EarlyStopAndSave, ExportOnTrainEnd, LightningCkptIO,
                            MonitorNotFoundError, PeriodicCheckpoint, PreemptionCheckpoint, RetentionPolicy,
                            load_module)
    from .errors import (CheckpointCorruptError, CheckpointError, CheckpointFormatError, CheckpointMismatchError,
                         CheckpointNotFoundError, CheckpointWriteError, FolderNotEmptyError, StorageUnavailableError)
    from .extras.stages import StageCache, StageCacheWarning, UncacheableValueError, checkpointed_stage
    from .load import load_checkpoint, load_into, load_weights
    from .read import CheckpointInfo, latest_checkpoint, list_checkpoints, verify_checkpoint
    from .session.options import SaveOptions
    from .session.resume import resume_path
    from .tools.diff import diff_checkpoints
    from .tools.export import export_checkpoint
    from .tools.merge import merge_checkpoint
    from .writer import CheckpointWriter
