"""PreemptionCheckpoint: on SIGTERM (or another signal), save at the next step boundary and exit cleanly."""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl

from .base import BaseCheckpointCallback

log = logging.getLogger("lightning_ckpt")


def _signal_number(s: Union[str, int]) -> int:
    if isinstance(s, int) and not isinstance(s, bool):
        return s
    name = str(s).upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    num = getattr(signal, name, None)
    if not isinstance(num, int):
        raise ValueError(f"signals contains {s!r}, which is not a signal name; use names such as 'SIGTERM', 'SIGUSR1'")
    return int(num)


class PreemptionCheckpoint(BaseCheckpointCallback):
    """When the process gets one of ``signals``, save the full training state at the next step boundary (never inside
    the signal handler), tag it ``preempt``, wait for its commit, and stop training cleanly.

    - SIGTERM: Lightning's own handler keeps working (it stops the loop after the step); this callback makes sure the
      state of that step is committed first. Under torchrun every rank takes the decision together (one small
      all-reduce per step on the training process group), so all ranks save the same step; with several ranks
      Lightning's own SIGTERM handler (which runs a collective inside the signal handler) is not called.
    - Other signals (for example SIGUSR1 sent by SLURM with ``--signal=USR1@90``): the handler that was installed
      before (such as Lightning's SLURM requeue handler) still runs; this callback then saves and asks the Trainer to
      stop at the end of the step.

    Args:
        dirpath: folder of the checkpoints (shared with the other saving callbacks on it).
        signals: signal names or numbers that mean "preempted".
        async_save, name_template, if_busy, fsync, distributed, save_timeout_s: see
            :class:`BaseCheckpointCallback`.
    """

    def __init__(
        self,
        dirpath: str,
        signals: Optional[list[str]] = None,
        async_save: bool = True,
        name_template: str = "step={step:06d}",
        if_busy: Literal["wait", "skip"] = "wait",
        fsync: bool = True,
        distributed: Literal["sharded", "rank0"] = "sharded",
        save_timeout_s: float = 600.0,
    ) -> None:
        super().__init__(dirpath, async_save=async_save, name_template=name_template, if_busy=if_busy, fsync=fsync,
                         distributed=distributed, save_timeout_s=save_timeout_s)
        names = ["SIGTERM"] if signals is None else list(signals)
        if not names:
            raise ValueError("signals is empty; give at least one signal name such as 'SIGTERM'")
        self.signals = [_signal_number(s) for s in names]
        self.received: Optional[int] = None
        self.preempted_step: Optional[int] = None
        self._previous: dict[int, Any] = {}
        self._world_size = 1

    # ----------------------------------------------------------------- signals
    def _handler(self, signum: int, frame: Any) -> None:
        self.received = signum  # only a flag: the save happens at the next step boundary
        prev = self._previous.get(signum)
        if signum == signal.SIGTERM and self._world_size > 1:
            # Lightning's SIGTERM handler runs a collective inside the signal handler, which can interleave with the
            # training thread's collectives; the ranks agree through this callback instead and stop cleanly
            return
        if callable(prev):
            prev(signum, frame)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # after Lightning registered its own handlers (it does so after on_fit_start), so that ours runs first
        super().on_train_start(trainer, pl_module)
        self._world_size = trainer.world_size
        if threading.current_thread() is not threading.main_thread():
            log.warning("lightning_ckpt: PreemptionCheckpoint can only install signal handlers in the main thread")
            return
        for s in self.signals:
            # ours runs first and then calls the one it replaces (Lightning's, except for SIGTERM with several ranks)
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._handler)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            for s, prev in self._previous.items():
                try:
                    signal.signal(s, prev if prev is not None else signal.SIG_DFL)
                except (TypeError, ValueError):
                    pass
        self._previous.clear()
        super().teardown(trainer, pl_module, stage)

    # ----------------------------------------------------------------- decisions
    def _agreed(self, trainer: "pl.Trainer") -> bool:
        """True on every rank when any rank was signalled (Lightning's own SIGTERM flag counts too)."""
        local = self.received is not None or bool(getattr(trainer, "received_sigterm", False))
        if trainer.world_size <= 1:
            return local
        # on the training process group, in the training thread: background saves use the checkpoint group
        return bool(trainer.strategy.reduce_boolean_decision(local, all=False))

    def _want_save_on_train_batch_end(self, trainer: "pl.Trainer"):
        if self.preempted_step is not None or not self._agreed(trainer):
            return None
        self.preempted_step = int(trainer.global_step)
        trainer.should_stop = True
        log.warning("lightning_ckpt: preemption signal received; saving step %d and stopping", self.preempted_step)
        return ("preempt",)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.preempted_step == int(trainer.global_step) and self._shared is not None and self._is_last(self._shared):
            # commit now: Lightning may end the process right after this step (SIGTERMException)
            self._flush(trainer)
            self._wait(raise_errors=False)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        shared = self._shared
        if (isinstance(exception, SIGTERMException) and shared is not None and self.preempted_step is None
                and shared.last_saved_step != int(trainer.global_step)):
            # the signal came after this step's check: the loop stopped at a step boundary, save that state
            self.preempted_step = int(trainer.global_step)
            shared.requests.clear()
            self.request_save(trainer, ("preempt",), force=True)
            self._flush(trainer)
        super().on_exception(trainer, pl_module, exception)

    def state_dict(self) -> dict[str, Any]:
        return {"dirpath": self.dirpath}
