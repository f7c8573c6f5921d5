"""On-disk format: safetensors shard files, a JSON manifest with checksums, JSON non-tensor state."""
from .manifest import FORMAT_VERSION

__all__ = ["FORMAT_VERSION"]
