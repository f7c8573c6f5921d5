"""Snapshot, persist (sync or async) and commit checkpoints through torch.distributed.checkpoint."""
from .pending import PendingSave, SaveResult
from .topology import Topology
from .writer import BufferStats, CheckpointWriter, cleanup_partials

__all__ = ["BufferStats", "CheckpointWriter", "PendingSave", "SaveResult", "Topology", "cleanup_partials"]
