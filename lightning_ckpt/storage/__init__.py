"""Where bytes live. Only the local filesystem for now; S3 comes with the fault-tolerance work."""
from .local import atomic_write_bytes, fsync_dir, remove_tree

__all__ = ["atomic_write_bytes", "fsync_dir", "remove_tree"]
