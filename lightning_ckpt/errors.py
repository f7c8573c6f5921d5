"""Error types a user can act on. Every message says what is wrong and what to do."""
from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error raised by lightning_ckpt about a checkpoint."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint exists but its bytes do not match its manifest (missing file, wrong size, bad checksum,
    malformed or hostile content). Use an earlier checkpoint (``latest_checkpoint`` skips corrupt ones)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint at the given path."""


class CheckpointFormatError(CheckpointError):
    """The checkpoint was written in a format this release cannot read (for example by a newer release: then
    ``newer`` is True)."""

    newer = False


class CheckpointWriteError(CheckpointError):
    """A save failed (disk full, permission denied, ...). Earlier checkpoints are untouched."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint does not fit the object it is loaded into (tensor shapes, missing keys, partial content)."""


class FolderNotEmptyError(CheckpointWriteError):
    """A fresh run would write into a folder that holds the same run's checkpoints (two runs would mix): resume it,
    branch from it, choose another folder, or opt in with ``allow_existing=True``."""


class StorageUnavailableError(CheckpointError):
    """The storage (an S3 endpoint) did not answer within its timeouts and retry budget: it is down, unreachable or
    hanging. Nothing was read or changed; nothing is wrong with the checkpoints. Fix the endpoint or the network, or
    set the timeouts (``LIGHTNING_CKPT_S3_CONNECT_TIMEOUT``, ``LIGHTNING_CKPT_S3_READ_TIMEOUT``,
    ``LIGHTNING_CKPT_S3_MAX_ATTEMPTS``; docs/backups.md)."""

    unavailable = True  # readers that skip a corrupt checkpoint on any CheckpointError re-raise this one
