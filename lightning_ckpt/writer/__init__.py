"""Snapshot, persist (sync or async) and commit checkpoints through torch.distributed.checkpoint."""
from .writer import CheckpointWriter, PendingSave, SaveResult, cleanup_partials

__all__ = ["CheckpointWriter", "PendingSave", "SaveResult", "cleanup_partials"]
