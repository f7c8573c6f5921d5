"""ExportOnTrainEnd: when fit ends, write the export folder of the best (or newest) checkpoint."""
from __future__ import annotations

import logging
import os
from typing import Any, Literal, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from ..read import latest_checkpoint, list_checkpoints
from ..session.options import check_dirpath
from ..session.session import Participant
from ..folder.history import history_path
from ..store import is_remote
from ..tools.export import data_fingerprint, export_checkpoint
from ..tools.merge import parse_dtype
from . import compat
from .base import SESSIONS, session_of
from ..policy.enums import Kind

log = logging.getLogger("lightning_ckpt")


class ExportOnTrainEnd(Callback, Participant):
    """When ``fit`` ends (after the last save on ``dirpath`` is committed), rank 0 writes an export folder: merged
    ``model.safetensors``, metrics and their history, the resolved LightningCLI config, reproduction metadata and a
    model card (see :func:`lightning_ckpt.export.export_checkpoint`). With an ``MLFlowLogger`` on the Trainer the
    folder is logged as a run artifact (``export/``).

    Args:
        dirpath: the folder of the saving callbacks whose checkpoint is exported.
        export_dir: where the export goes; default ``<dirpath>/export``.
        source: ``"best"`` (the best checkpoint of a BestMetricCheckpoint / EarlyStopAndSave on the folder, else the
            newest) or ``"latest"``.
        dtype: convert floating-point weights (``"bf16"``, ``"fp16"``) in the export; ``None`` keeps them.
    """

    def __init__(self, dirpath: str, export_dir: Optional[str] = None, source: Literal["best", "latest"] = "best",
                 dtype: Optional[str] = None) -> None:
        super().__init__()
        if source not in ("best", "latest"):
            raise ValueError(f"source={source!r} is invalid; use 'best' or 'latest'")
        self.dirpath = check_dirpath(dirpath)
        parse_dtype(dtype)  # an unsupported dtype fails now, not after a week of training
        if export_dir is None and is_remote(self.dirpath):
            raise ValueError(f"dirpath {self.dirpath} is on S3; give export_dir, a local folder for the export")
        self.export_dir = os.path.abspath(export_dir) if export_dir else os.path.join(self.dirpath, "export")
        self.source = source
        self.dtype = dtype
        self.exported: Optional[str] = None

    @property
    def state_key(self) -> str:
        return compat.state_key(self, dirpath=self.dirpath)

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        session_of(trainer, self.dirpath, "ExportOnTrainEnd").join(self)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        session = SESSIONS.get(trainer, {}).get(self.dirpath)
        if session is not None:
            session.leave(self)

    def _pick(self, session: Any) -> Optional[str]:
        if self.source == "best":
            for cb in session.participants:
                p = getattr(cb, "best_model_path", None)
                if p:
                    return p
        return latest_checkpoint(self.dirpath, verify=False)

    def at_end(self, session: Any, trainer: "pl.Trainer") -> None:
        """After the last commit of fit: rank 0 writes the export."""
        if not trainer.is_global_zero:
            return
        path = self._pick(session)
        if path is None or not any(c.path == path and c.kind != Kind.LIGHT for c in list_checkpoints(self.dirpath)):
            log.warning("lightning_ckpt: nothing to export from %s", self.dirpath)
            return
        config_yaml = None
        try:
            from lightning.pytorch.cli import SaveConfigCallback

            for cb in trainer.callbacks:
                if isinstance(cb, SaveConfigCallback):
                    config_yaml = cb.parser.dump(cb.config, skip_none=False)
                    break
        except Exception as e:  # noqa: BLE001 - the export goes on without the config
            log.warning("lightning_ckpt: could not record the LightningCLI config: %r", e)
        dm = getattr(trainer, "datamodule", None)
        hist = history_path(session.dirpath)
        self.exported = export_checkpoint(path, self.export_dir, config_yaml=config_yaml, data_fp=data_fingerprint(dm),
                                          dtype=self.dtype, history=hist)
        log.info("lightning_ckpt: exported %s to %s", path, self.exported)
        for lg in trainer.loggers:
            if type(lg).__name__ == "MLFlowLogger":
                lg.experiment.log_artifacts(lg.run_id, self.exported, artifact_path="export")
