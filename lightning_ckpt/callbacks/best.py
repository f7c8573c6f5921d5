"""BestMetricCheckpoint: keep the ``top_k`` best checkpoints by a logged metric."""
from __future__ import annotations

import logging
import math
import threading
from typing import Any, Literal, Optional

import lightning.pytorch as pl

from ..store import open_store
from ..policy.conditions import Monitor
from . import compat
from .base import BaseCheckpointCallback, best_path_at, metric_value

log = logging.getLogger("lightning_ckpt")


class BestMetricCheckpoint(BaseCheckpointCallback):
    """Save when ``monitor`` enters the ``top_k`` best so far (tag ``best``) and delete the checkpoints that fall out.

    The metric is read when validation ends (or, with validation off, at the end of each training epoch; or every
    ``every_n_train_steps`` for a training metric). A checkpoint that another callback also wanted (another tag) is
    never deleted by this one. After a resume, the best-k list is rebuilt from the checkpoints on disk, so nothing the
    resumed run should keep is deleted.

    Example::

        BestMetricCheckpoint("ckpts/", monitor="val_loss", mode="min", top_k=3)

    Args:
        dirpath: folder for the checkpoints.
        monitor: metric logged with ``self.log``; an error lists the logged ones when it is missing.
        mode: ``"min"`` or ``"max"``.
        top_k: how many best checkpoints to keep (``-1`` keeps every improvement).
        min_delta: smallest change that counts as an improvement over the current k-th best.
        every_n_train_steps: also check the metric every N steps (for metrics logged in ``training_step``).
        save_top_k: Lightning's name for ``top_k``.
        **options: the options every saving callback shares (:class:`~lightning_ckpt.SaveOptions`).
    """

    def __init__(
        self,
        dirpath: Optional[str] = None,
        monitor: Optional[str] = None,
        mode: Literal["min", "max"] = "min",
        top_k: int = 1,
        min_delta: float = 0.0,
        every_n_train_steps: Optional[int] = None,
        save_top_k: Optional[int] = None,
        **options: Any,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"{type(self).__name__} needs monitor=, the name of a metric logged with self.log "
                             f"(got {monitor!r})")
        super().__init__(dirpath, **options)
        if save_top_k is not None:
            if top_k != 1 and top_k != save_top_k:
                raise ValueError(f"top_k={top_k} and save_top_k={save_top_k} are both set; they are the same setting "
                                 "(save_top_k is Lightning's name for it): keep one")
            top_k = save_top_k
        self.spec = Monitor(monitor, mode, min_delta)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k == 0 or top_k < -1:
            raise ValueError(f"top_k={top_k!r} is invalid; use a positive integer, or -1 to keep every improvement")
        if every_n_train_steps is not None and (not isinstance(every_n_train_steps, int) or every_n_train_steps < 1):
            raise ValueError(f"every_n_train_steps={every_n_train_steps!r} is invalid; it must be a positive integer or None")
        self.monitor = monitor
        self.mode = mode
        self.top_k = top_k
        self.every_n_train_steps = every_n_train_steps
        self.best_k: list[dict] = []  # [{"step", "score"}], best first
        self._evicted: list[int] = []  # steps to delete once a newer save committed
        # step -> [(name, tags)] of the best-tagged checkpoints committed or listed in this fit: protecting and evicting
        # them needs no listing of the folder at each save (a folder of thousands, or an s3:// one)
        self._known: dict[int, list[tuple[str, frozenset]]] = {}
        self._lock = threading.Lock()
        self._validated_this_epoch = False

    @property
    def state_key(self) -> str:
        return compat.state_key(self, dirpath=self.dirpath, monitor=self.monitor, mode=self.mode)

    @property
    def best_rule(self) -> dict:
        """How this callback ranks checkpoints; recorded in every manifest of the folder (``ckpt_path="best"``)."""
        return {"monitor": self.monitor, "mode": self.mode, "top_k": self.top_k}

    @property
    def best_model_path(self) -> Optional[str]:
        """Path of the best checkpoint so far (committed once ``fit`` returns)."""
        if not self.best_k:
            return None
        return self._path_of_step(self.best_k[0]["step"])

    @property
    def best_model_score(self) -> Optional[float]:
        return self.best_k[0]["score"] if self.best_k else None

    def _path_of_step(self, step: int) -> Optional[str]:
        return best_path_at(self.dirpath, run_name=self.options.run_name, step=step)

    def _rebuild_from_disk(self, upto_step: int) -> None:
        """The manifests on disk are the truth: tags and metrics are final once committed."""
        scored = []
        for c in self._own_checkpoints():
            v = c.metrics.get(self.monitor)
            if "best" in c.tags and c.step <= upto_step and isinstance(v, (int, float)) and math.isfinite(v):
                scored.append({"step": c.step, "score": float(v)})
        scored.sort(key=lambda d: (self.spec.sort_key(d["score"]), -d["step"]))
        with self._lock:
            self.best_k = scored if self.top_k == -1 else scored[: self.top_k]

    def protect(self) -> set[str]:
        with self._lock:
            steps = {d["step"] for d in self.best_k}
            known = {st: self._known[st] for st in steps if st in self._known}
        if len(known) == len(steps):
            return {name for entries in known.values() for name, _ in entries}
        return {c.name for c in self._learn(steps) if c.step in steps}

    def _learn(self, steps: set) -> list:
        """This run's best-tagged checkpoints of ``steps`` in the folder (listed), remembered from now on."""
        found = [c for c in self._own_checkpoints() if c.step in steps and "best" in c.tags]
        with self._lock:
            for st in steps:
                self._known[st] = [(c.name, frozenset(c.tags)) for c in found if c.step == st]
        return found

    # --------------------------------------------------------------- decisions
    def _check(self, trainer: "pl.Trainer"):
        value = metric_value(trainer, self.monitor, "BestMetricCheckpoint")
        step = int(trainer.global_step)
        if not math.isfinite(value):
            return None
        with self._lock:
            if any(d["step"] == step for d in self.best_k):
                return None
            if self.top_k == -1:  # keep every improvement: the value must beat the best so far
                if not self.spec.better(value, self.best_k[0]["score"] if self.best_k else None):
                    return None
            else:
                full = len(self.best_k) >= self.top_k
                worst = self.best_k[-1]["score"] if self.best_k else None
                if full and not self.spec.better(value, worst):
                    return None
            self.best_k.append({"step": step, "score": value})
            self.best_k.sort(key=lambda d: (self.spec.sort_key(d["score"]), -d["step"]))
            if self.top_k != -1:
                for d in self.best_k[self.top_k :]:
                    self._evicted.append(d["step"])
                self.best_k = self.best_k[: self.top_k]
        log.info("lightning_ckpt: %s=%.6g at step %d is among the best %s", self.monitor, value, step, self.top_k)
        return ("best",)

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._validated_this_epoch = False

    def _want_save_on_validation_end(self, trainer: "pl.Trainer"):
        self._validated_this_epoch = True
        return self._check(trainer)

    def _want_save_on_train_epoch_end(self, trainer: "pl.Trainer"):
        if self._validated_this_epoch:
            return None  # checked when validation ended
        if trainer.enable_validation and self.monitor not in trainer.callback_metrics:
            return None  # validation runs on a step schedule and has not produced the metric yet
        return self._check(trainer)

    def _want_save_on_train_batch_end(self, trainer: "pl.Trainer"):
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            return self._check(trainer)
        return None

    def after_commit(self, result: Any) -> None:
        """Runs in the committing thread. Deletes evicted best-only checkpoints once a newer best one is committed
        (the replacement exists before anything is deleted)."""
        shared = self._session
        if shared is None or "best" not in result.tags:
            return
        with self._lock:
            self._known.setdefault(result.step, []).append((result.name, frozenset(result.tags)))
            ready = [e for e in self._evicted if e < result.step]
            self._evicted = [e for e in self._evicted if e >= result.step]
            keep_steps = {d["step"] for d in self.best_k}
            doomed = {e for e in ready if e not in keep_steps}
            unknown = {e for e in doomed if e not in self._known}
            names = [name for e in doomed - unknown for name, tags in self._known[e] if tags <= {"best"}]
            for e in doomed - unknown:
                del self._known[e]
        if not ready:
            return
        if unknown:  # best checkpoints of before this fit: listed once
            names += [c.name for c in self._learn(unknown) if set(c.tags) <= {"best"}]
            with self._lock:
                for e in unknown:
                    self._known.pop(e, None)
        shared.delete(names, reason=f"no longer among the best {self.top_k} by {self.monitor}")

    # --------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"monitor": self.monitor, "mode": self.mode, "top_k": self.top_k, "best_k": [dict(d) for d in self.best_k]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # the best-k list is rebuilt from the manifests on disk (on_load_checkpoint): they are the truth

    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        if open_store(self.dirpath).exists():
            self._rebuild_from_disk(int(checkpoint.get("global_step", 0)))
