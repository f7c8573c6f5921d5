"""Rank-0 (or offline) consolidation of checkpoint shards into one plain safetensors file."""
from .merge import MergeResult, clean_name, merge_checkpoint, verify_merged

__all__ = ["MergeResult", "clean_name", "merge_checkpoint", "verify_merged"]
