"""Ray Train and Ray Tune: every committed checkpoint is reported to Ray as a small reference, never a copy.

Inside a Ray Train (v2) worker or a Ray Tune function trial, detected as Lightning's ``SLURMEnvironment.detect()``
detects SLURM (no callback to add; ``LIGHTNING_CKPT_RAY=0`` turns it off), a folder's session gets a
:class:`RayReporter`:

- **What Ray receives**: a folder with one file, ``lightning_ckpt_ref.json`` (``read.REFERENCE``): where the checkpoint
  was committed, its name, step, run and manifest digest, a few hundred bytes. ``load_checkpoint``, ``verify`` and
  ``Trainer.fit(ckpt_path=...)`` accept such a folder: they load the checkpoint it names after checking the digest.
- **When** (Ray Train): every rank reports once per sealed save, at the step boundary where the save is sealed (the
  same step on every rank: sealing is part of the collective save), in the training thread, so every rank reports
  the same number of times. Rank 0 reports with ``CheckpointUploadMode.ASYNC`` and an upload function that Ray runs
  in its own thread: it waits for the commit (possibly still being written in the background), then has Ray persist
  the reference into ``storage_path``. Training never waits for the commit; Ray keeps the reports in order.
  (Ray Tune: one process; its report copies synchronously, so each save is reported at the first step boundary
  after its commit, in the training thread, and at the end of fit.)
- **Resume** (``resume="auto"``, decided by ``session.start``; here only Ray's checkpoint is read): the checkpoint
  Ray hands the attempt (``get_checkpoint()``) wins over the folder's scan. A reference to this folder's run
  continues that run: from the referenced checkpoint, or from a newer commit of the same lineage run that Ray was not
  told of before the worker died. A reference to another run or folder
  (Tune's population-based training cloning trial B into trial A) starts a branch of it, as ``resume_from`` does: the
  new hyper-parameters apply, the lineage records the parent, unchanged tensors are shared.

Ray is imported only inside the functions here, and only when the process already imported it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from typing import Any, Callable, Optional

from ..errors import CheckpointWriteError
from ..format.manifest import DIGEST
from ..read import REFERENCE, read_checkpoint_manifest, read_reference
from ..folder.lineage import lineage_of
from ..session.session import FolderSession
from ..session.start import Place, from_reference, in_folder, shared

log = logging.getLogger("lightning_ckpt")

REF_FORMAT = "lightning_ckpt-reference"


def detect() -> Optional[str]:
    """``"train"`` inside a Ray Train worker, ``"tune"`` inside a Ray Tune function trial, None elsewhere (and with
    ``LIGHTNING_CKPT_RAY=0``). A process that has not imported Ray is not in Ray: nothing is imported then."""
    if "ray" not in sys.modules or os.environ.get("LIGHTNING_CKPT_RAY", "1").strip().lower() in ("0", "false", "off"):
        return None
    try:
        from ray.tune.trainable.trainable_fn_utils import _in_tune_session
        from ray.train.v2._internal.util import _in_ray_train_worker
    except ImportError:  # pragma: no cover - another Ray release
        return None
    if _in_tune_session():
        return "tune"
    return "train" if _in_ray_train_worker() else None


def attach(session: "FolderSession") -> None:
    """Every rank, when a folder's session opens: report its commits to Ray when this process runs under Ray."""
    mode = detect()
    if mode is not None and not any(isinstance(r, RayReporter) for r in session.reporters):
        reporter = RayReporter(mode, session)
        session.on_save.append(reporter.saved)
        session.reporters.append(reporter)


def write_reference(folder: str, info: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, REFERENCE), "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)


class RayReporter:
    """Reports a folder's commits to Ray Train or Ray Tune (see the module's docstring)."""

    def __init__(self, mode: str, session: "FolderSession") -> None:
        self.mode = mode
        self.session = session
        self.queue: list = []  # this rank's saves not yet reported (PendingSave), in order
        self.last: Optional[dict] = None  # the last reference reported (rank 0)
        self.reported = 0

    def saved(self, pending: Any) -> None:
        """Every rank, training thread: a save was started."""
        self.queue.append(pending)

    def report(self, trainer: Any) -> None:
        """Every rank, training thread, at a step boundary (after the seal) and at the end of fit."""
        while self.queue:
            p = self.queue[0]
            if p.abandoned:  # replaced by a newer state of its step (every rank drops it alike)
                self.queue.pop(0)
                continue
            if not p.sealed or (self.mode == "tune" and not p.done()):
                return
            self.queue.pop(0)
            metrics = {k: v for k, v in p.metrics.items() if isinstance(v, (int, float))}
            metrics.update(step=int(p.step), epoch=p.epoch)
            if self.mode == "train":
                self._report_train(p, metrics, trainer)
            else:
                self._report_tune(p, metrics)
            self.reported += 1

    # ------------------------------------------------------------------ Ray Train
    def _report_train(self, p: Any, metrics: dict, trainer: Any) -> None:
        import ray.train
        from ray.train.v2.api.report_config import CheckpointUploadMode

        if not trainer.is_global_zero:
            ray.train.report(metrics, checkpoint=None, checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
            return
        storage = ray.train.get_context().get_storage()
        placeholder = tempfile.mkdtemp(prefix="lightning_ckpt-ray-")

        def upload(checkpoint: Any, dir_name: str) -> Any:  # in Ray's upload thread
            try:
                info = self._reference(p)
            finally:
                shutil.rmtree(placeholder, ignore_errors=True)
            with tempfile.TemporaryDirectory(prefix="lightning_ckpt-ray-") as tmp:
                write_reference(tmp, info)
                return storage.persist_current_checkpoint(ray.train.Checkpoint.from_directory(tmp), dir_name)

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(placeholder),
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC, delete_local_checkpoint_after_upload=False,
                         checkpoint_upload_fn=upload)

    # ------------------------------------------------------------------ Ray Tune
    def _report_tune(self, p: Any, metrics: dict) -> None:
        import ray.tune

        info = self._reference(p)
        with tempfile.TemporaryDirectory(prefix="lightning_ckpt-ray-") as tmp:
            write_reference(tmp, info)
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(tmp))

    # ------------------------------------------------------------------ the reference (rank 0)
    def _reference(self, p: Any) -> dict:
        """Wait for the save's commit; the record Ray keeps of it. A failed save re-reports the last committed
        checkpoint with ``on_save_error="continue"`` (Ray's count of reports stays that of the ranks), else fails
        the report (Ray then fails the attempt, and restarts it under its ``FailureConfig``)."""
        s = self.session
        try:
            res = p.result()
        except BaseException as e:  # noqa: BLE001
            if s.on_save_error == "continue" and self.last is not None:
                log.error("lightning_ckpt: the save of step %s failed (%r); Ray is told of %s again", p.step, e,
                          self.last["name"])
                return self.last
            raise CheckpointWriteError(f"the save of step {p.step} into {s.key} failed ({e!r}); it is not reported "
                                       "to Ray. Earlier checkpoints are intact") from e
        m = read_checkpoint_manifest(res.path)
        lin = lineage_of(m)
        self.last = {
            "format": REF_FORMAT, "version": 1, "folder": s.key, "name": res.name, "path": res.path,
            "uri": f"{s.staged_for}/{res.name}" if s.staged_for else None, "step": int(m["step"]), "epoch": m.get("epoch"),
            "run_name": lin.get("run_name"), "lineage_run": lin.get("run"), DIGEST: m.get(DIGEST),
            "tags": list(m.get("tags") or []),
        }
        return self.last


# ---------------------------------------------------------------------- where a restarted attempt starts
def reported_checkpoint() -> Optional[dict]:
    """The reference record of the checkpoint Ray hands this attempt (``get_checkpoint()``), or None (not in Ray,
    no checkpoint yet, or one this package did not report)."""
    mode = detect()
    if mode is None:
        return None
    if mode == "train":
        import ray.train

        ck = ray.train.get_checkpoint()
    else:
        import ray.tune

        ck = ray.tune.get_checkpoint()
    if ck is None:
        return None
    with ck.as_directory() as d:
        ref = read_reference(d)
        if ref is None:
            log.warning("lightning_ckpt: Ray's checkpoint %s is not a reference of this package; resume='auto' "
                        "ignores it", ck.path)
        return ref


def checkpoint_reader() -> Optional[Callable[[], Optional[dict]]]:
    """Under Ray: the function that reads the reference Ray hands this attempt (``session.start.decide`` calls it on
    rank 0 with ``resume="auto"``); None outside Ray (then the folder decides alone)."""
    return reported_checkpoint if detect() is not None else None


def _choose(session: "FolderSession", ref: dict) -> tuple[str, bool, bool]:
    """Rank 0: (path, branched, relative to the folder) of where to start from Ray's reference ``ref`` (the decision
    is ``session.start.from_reference``; relative: a node-local folder's checkpoint, read from each rank's copy)."""
    place = Place(session.key, session.dirpath, staged_for=session.staged_for, run_name=session.run_name,
                  node_local=session.writer.node_local)
    got = from_reference(place, ref)
    path, relative = shared(place, str(got.path), in_folder(place, got))
    return path, got.branch, relative
