"""Lightning callbacks: when a hook fires, ask a policy, hand the state to the writer."""
from . import compat
from .backup import BackupToS3
from .base import BaseCheckpointCallback, MonitorNotFoundError
from .best import BestMetricCheckpoint
from .early_stop import EarlyStopAndSave
from .export import ExportOnTrainEnd
from .io import LightningCkptIO, install_checkpoint_io
from .periodic import PeriodicCheckpoint
from .preemption import PreemptionCheckpoint
from .retention import RetentionPolicy
from ..session.state import InexactResumeWarning

load_module = compat.load_module
compat.install_folder_loading()  # MyModule.load_from_checkpoint(folder) and ckpt_path=folder without the plugin
compat.install_ckpt_path_names()  # ckpt_path="last" / "best" with this package's callbacks

__all__ = [
    "BackupToS3", "BaseCheckpointCallback", "BestMetricCheckpoint", "EarlyStopAndSave", "ExportOnTrainEnd", "LightningCkptIO", "MonitorNotFoundError",
    "PeriodicCheckpoint", "PreemptionCheckpoint", "RetentionPolicy", "install_checkpoint_io", "load_module",
    "InexactResumeWarning",
]
