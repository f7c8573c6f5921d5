"""PreemptionCheckpoint: on SIGTERM (or another signal), save at the next step boundary and exit cleanly."""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from typing import Any, Optional, Union

import lightning.pytorch as pl

from ..policy.enums import Kind
from . import compat
from .base import BaseCheckpointCallback

log = logging.getLogger("lightning_ckpt")


def _signal_number(s: Union[str, int]) -> int:
    """A signal this process can catch, by name (``"SIGTERM"``, ``"USR1"``) or number; ValueError otherwise."""
    if isinstance(s, int) and not isinstance(s, bool):
        try:
            num = int(signal.Signals(s))
        except ValueError:
            raise ValueError(f"signals contains {s!r}, which is not a signal number of this system") from None
    else:
        name = str(s).upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        num = getattr(signal, name, None)
        if not isinstance(num, int) or name.startswith("SIG_"):
            raise ValueError(f"signals contains {s!r}, which is not a signal name; use names such as 'SIGTERM', 'SIGUSR1'")
    if num in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"signals contains {signal.Signals(num).name}, which no process can catch; use a signal the "
                         "scheduler sends before it kills, such as SIGTERM or SIGUSR1")
    return int(num)


def slurm_job_id() -> Optional[str]:
    """The id ``scontrol requeue`` takes for this job, as Lightning computes it: ``<array job id>_<task id>`` in an
    array job, else ``SLURM_JOB_ID``; ``None`` outside SLURM."""
    array_job_id = os.getenv("SLURM_ARRAY_JOB_ID")
    if array_job_id is not None:
        return f"{array_job_id}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.getenv("SLURM_JOB_ID")


def requeue_slurm_job() -> bool:
    """Run ``scontrol requeue <job id>`` as Lightning's SLURM auto-requeue does (with the same fallback to a shell
    when ``scontrol`` cannot be executed directly) and log the outcome. Returns True when ``scontrol`` succeeded."""
    job_id = slurm_job_id()
    if job_id is None or not re.fullmatch(r"[0-9_-]+", job_id):
        log.error("lightning_ckpt: cannot requeue: SLURM job id %r is missing or not a job id", job_id)
        return False
    cmd = ["scontrol", "requeue", job_id]
    log.warning("lightning_ckpt: requeuing SLURM job %s", job_id)
    try:
        result = subprocess.call(cmd)
    except FileNotFoundError:
        # as Lightning: `scontrol` may only be found from a shell; the id was checked above, so this is safe
        result = subprocess.call(" ".join(cmd), shell=True)
    if result == 0:
        log.info("lightning_ckpt: requeued SLURM job %s", job_id)
        return True
    log.warning("lightning_ckpt: requeuing SLURM job %s failed with error code %s", job_id, result)
    return False


class PreemptionCheckpoint(BaseCheckpointCallback):
    """When the process gets one of ``signals``, save the full training state at the next step boundary (never inside
    the signal handler), tag it ``preempt``, wait for its commit, and stop training cleanly.

    - SIGTERM: Lightning's own handler keeps working (it stops the loop after the step); this callback makes sure the
      state of that step is committed first. Under torchrun every rank takes the decision together (one small
      all-reduce per step on the training process group), so all ranks save the same step; with several ranks
      Lightning's own SIGTERM handler (which runs a collective inside the signal handler) is not called.
    - Other signals (for example SIGUSR1 sent by SLURM with ``--signal=USR1@90``): the handler that was installed
      before still runs; this callback then saves and asks the Trainer to stop at the end of the step.
    - SLURM auto-requeue (``Trainer(plugins=[SLURMEnvironment(auto_requeue=True)])``, or SLURM detected by
      Lightning, whose default is ``auto_requeue=True``): Lightning's requeue handler is replaced, see
      ``slurm_requeue``.

    Args:
        dirpath: folder of the checkpoints (shared with the other saving callbacks on it).
        signals: signal names or numbers that mean "preempted".
        slurm_requeue: when the Trainer's cluster environment is a ``SLURMEnvironment`` with ``auto_requeue`` and
            Lightning installed its requeue handler, take over the requeue: the environment's ``requeue_signal``
            (SIGUSR1 by default; send it with ``#SBATCH --signal=USR1@90``) is listened to as well, even if it is not
            in ``signals``, and Lightning's handler (which writes a pickled ``hpc_ckpt_N.ckpt`` into
            ``default_root_dir`` inside the signal handler, on every rank, then requeues) is not called. Instead a
            checkpoint tagged ``preempt`` is saved at the next step boundary (every rank the same step), training
            stops cleanly, and once that checkpoint is committed global rank 0 runs ``scontrol requeue <job id>``
            (``<array job id>_<task id>`` in an array job) at the end of ``fit``, after every other saving callback
            finished. If the save fails, the error is raised and the job is not requeued. The requeued job must
            resume itself: ``trainer.fit(model, data, ckpt_path=lightning_ckpt.resume_path(dirpath))`` (no
            ``hpc_ckpt`` is written, so Lightning's own SLURM resume finds nothing). ``False``: Lightning's handler
            stays as it is (it runs on the requeue signal, and this callback only reacts to it when it is listed in
            ``signals``). Nothing changes outside SLURM, without ``auto_requeue``, or when a handler for the requeue
            signal existed before ``fit`` (Lightning then installs none and does not requeue).
        **options: the options every saving callback shares (:class:`~lightning_ckpt.SaveOptions`; backups and
            ``resume`` act on the whole folder: locations given to any saving callback on it receive every checkpoint
            of the folder, ``preempt`` ones included). A preempt checkpoint is always a full one.
    """

    def __init__(
        self,
        dirpath: Optional[str] = None,
        signals: Optional[list[str]] = None,
        slurm_requeue: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(dirpath, **options)
        if self.options.content != Kind.FULL or self.options.partial:
            raise ValueError("PreemptionCheckpoint saves the full state (the run resumes from it); drop content, "
                             "include and exclude")
        names = ["SIGTERM"] if signals is None else list(signals)
        if not names:
            raise ValueError("signals is empty; give at least one signal name such as 'SIGTERM'")
        self.signals = [_signal_number(s) for s in names]
        if not isinstance(slurm_requeue, bool):
            raise ValueError(f"slurm_requeue={slurm_requeue!r} is invalid; use True or False")
        self.slurm_requeue = slurm_requeue
        self.received: Optional[int] = None
        self.preempted_step: Optional[int] = None
        self.requeued: Optional[bool] = None  # outcome of `scontrol requeue` (global rank 0), None if not attempted
        self._previous: dict[int, Any] = {}  # handlers we replaced, restored at teardown
        self._chain: dict[int, Any] = {}  # handlers we call after ours
        self._world_size = 1
        self._requeue_signal: Optional[int] = None  # the SLURM requeue signal, when we took Lightning's requeue over
        self._requeue_received = False  # this rank got the requeue signal
        self._requeue = False  # all ranks agreed: requeue the job once the preempt checkpoint is committed

    # ----------------------------------------------------------------- signals
    def _handler(self, signum: int, frame: Any) -> None:
        self.received = signum  # only a flag: the save happens at the next step boundary
        if signum == self._requeue_signal:
            self._requeue_received = True
        prev = self._chain.get(signum)
        if signum == signal.SIGTERM and self._world_size > 1:
            # Lightning's SIGTERM handler runs a collective inside the signal handler, which can interleave with the
            # training thread's collectives; the ranks agree through this callback instead and stop cleanly
            return
        if callable(prev):
            prev(signum, frame)

    def _install(self, trainer: "pl.Trainer") -> None:
        # after Lightning registered its own handlers (it does so after on_fit_start), so that ours runs first
        self._world_size = trainer.world_size
        if self._previous:
            return  # already installed in this fit (at the sanity check)
        if threading.current_thread() is not threading.main_thread():
            log.warning("lightning_ckpt: PreemptionCheckpoint can only install signal handlers in the main thread")
            return
        self._requeue_signal, self._requeue_received, self._requeue = None, False, False
        chain: dict[int, Any] = {}
        env = compat.cluster_environment(trainer)
        from lightning.fabric.plugins.environments import SLURMEnvironment

        if self.slurm_requeue and isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None:
            sig = int(env.requeue_signal)
            found, rest = compat.without_lightning_requeue(signal.getsignal(sig))
            if found:  # Lightning installed its requeue handler: ours replaces it (any other handler still runs)
                self._requeue_signal = sig
                chain[sig] = rest
        signals = list(self.signals)
        if self._requeue_signal is not None and self._requeue_signal not in signals:
            signals.append(self._requeue_signal)
        for s in signals:
            # ours runs first and then calls the one it replaces (Lightning's, except for SIGTERM with several ranks
            # and for its SLURM requeue handler, which this callback takes over)
            self._previous[s] = signal.getsignal(s)
            self._chain[s] = chain.get(s, self._previous[s])
            signal.signal(s, self._handler)

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_fit_start(trainer, pl_module)
        # a fit that ended in an exception never ran teardown: forget the handlers of that fit
        self._previous.clear()
        self._chain.clear()

    def on_sanity_check_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_sanity_check_start(trainer, pl_module)
        self._install(trainer)  # a requeue signal during the sanity check must not reach Lightning's hpc handler

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_train_start(trainer, pl_module)
        self._install(trainer)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_fit_end(trainer, pl_module)
        # the very end of a fit that stopped for the SLURM requeue signal: every saving callback (and the backups)
        # finished in on_train_end, after the last commit; on a real cluster `scontrol requeue` ends this job
        if self._requeue:
            self._requeue_after_commit(trainer)

    def _requeue_after_commit(self, trainer: "pl.Trainer", session: Any = None) -> None:
        self._requeue = self._requeue_received = False
        if not trainer.is_global_zero:
            return
        session = session or self._session
        history = session.writer.history if session is not None else []
        step = self.preempted_step
        if step is None or not any(r.step == step and "preempt" in r.tags for r in history):
            log.error("lightning_ckpt: the preempt checkpoint of step %s was not committed; not requeuing the SLURM job", step)
            self.requeued = False
            return
        self.requeued = requeue_slurm_job()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            for s, prev in self._previous.items():
                # only where ours is still installed: Lightning restores its originals first (Trainer._teardown),
                # and putting back the handler we replaced would leave its stale handler installed after fit
                if signal.getsignal(s) != self._handler:
                    continue
                try:
                    signal.signal(s, prev if prev is not None else signal.SIG_DFL)
                except (TypeError, ValueError):
                    pass
        self._previous.clear()
        self._chain.clear()
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
        if self._requeue_signal is not None:  # the same on every rank: the environment and Lightning's handlers are
            self._requeue = self._requeue_received
            if trainer.world_size > 1:  # rank 0 requeues if any rank got the requeue signal
                self._requeue = bool(trainer.strategy.reduce_boolean_decision(self._requeue, all=False))
        log.warning("lightning_ckpt: preemption signal received; saving step %d and stopping%s", self.preempted_step,
                    " (the SLURM job is requeued once it is committed)" if self._requeue else "")
        # urgent: committed before this hook returns, as Lightning may end the process right after the step
        self.request_save(trainer, ("preempt",), force=True, urgent=True)
        return None

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        fit = self._fit
        session = fit.session if fit is not None else None
        if (isinstance(exception, SIGTERMException) and fit is not None and self.preempted_step is None
                and fit.session.last_saved_step != int(trainer.global_step)):
            # the signal came after this step's check: the loop stopped at a step boundary, save that state
            self.preempted_step = int(trainer.global_step)
            fit.session.requests.clear()
            self.request_save(trainer, ("preempt",), force=True)
            fit.session.flush(fit.context(trainer))
        super().on_exception(trainer, pl_module, exception)  # waits for the commit
        if isinstance(exception, SIGTERMException) and (self._requeue or self._requeue_received):
            # Lightning stopped the loop (a SIGTERM too, or SIGTERM is the requeue signal): requeue all the same once
            # the preempt checkpoint is committed (no collective here: rank 0 decides alone in the exception path)
            self._requeue_after_commit(trainer, session)

    def state_dict(self) -> dict[str, Any]:
        return {"dirpath": self.dirpath}
