"""Lightning callbacks: when a hook fires, ask a policy, hand the state to the writer."""
from .base import BaseCheckpointCallback
from .io import LightningCkptIO, install_checkpoint_io
from .periodic import PeriodicCheckpoint

__all__ = ["BaseCheckpointCallback", "LightningCkptIO", "PeriodicCheckpoint", "install_checkpoint_io"]
