"""ExportOnTrainEnd: when fit ends, write the export folder of the best (or newest) checkpoint."""
from __future__ import annotations

import logging
import os
from typing import Any, Literal, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from ..checkpoints import latest_checkpoint, list_checkpoints
from ..export import data_fingerprint, export_checkpoint
from .base import _SHARED, require_shared, folder_key
from ..storage.s3 import is_s3_uri

log = logging.getLogger("lightning_ckpt")


class ExportOnTrainEnd(Callback):
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
        self.dirpath = folder_key(dirpath)
        if export_dir is None and is_s3_uri(self.dirpath):
            raise ValueError(f"dirpath {self.dirpath} is on S3; give export_dir, a local folder for the export")
        self.export_dir = os.path.abspath(export_dir) if export_dir else os.path.join(self.dirpath, "export")
        self.source = source
        self.dtype = dtype
        self.exported: Optional[str] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=self.dirpath)

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        shared = require_shared(trainer, self.dirpath, "ExportOnTrainEnd")
        if self._export not in shared.end_hooks:
            shared.end_hooks.append(self._export)

    def _pick(self, shared: Any) -> Optional[str]:
        if self.source == "best":
            for cb in shared.users:
                p = getattr(cb, "best_model_path", None)
                if p:
                    return p
        return latest_checkpoint(self.dirpath, verify=False)

    def _export(self, trainer: "pl.Trainer") -> None:
        if not trainer.is_global_zero:
            return
        shared = _SHARED.get(trainer, {}).get(self.dirpath)
        path = self._pick(shared) if shared is not None else None
        if path is None or not any(c.path == path and c.kind != "light" for c in list_checkpoints(self.dirpath)):
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
        hist = os.path.join(shared.dirpath if shared is not None else self.dirpath, "metrics.jsonl")
        self.exported = export_checkpoint(path, self.export_dir, config_yaml=config_yaml, data_fp=data_fingerprint(dm),
                                          dtype=self.dtype, history=hist)
        log.info("lightning_ckpt: exported %s to %s", path, self.exported)
        for lg in trainer.loggers:
            if type(lg).__name__ == "MLFlowLogger":
                lg.experiment.log_artifacts(lg.run_id, self.exported, artifact_path="export")
