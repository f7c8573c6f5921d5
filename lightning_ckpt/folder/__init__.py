"""The Folder layer: what a folder of committed checkpoints holds and needs, between the store (bytes, one commit
protocol) and its users (the session, the S3 uploader, the callbacks, the tools): :class:`Folder` (the committed
records of a folder and its runs, retention planned and applied once, the collection of orphaned packs), what no
deletion takes (``needed``, kept across saves by ``index``), the best by a recorded metric (``best``), lineage
(``lineage``), the run history (``history``), failed-run notes (``needed``), copying to and from another location
(``transfer``)."""
from .folder import Folder, Plan

__all__ = ["Folder", "Plan"]
