"""Lightning Fabric's ``fabric.save(path, state)`` / ``fabric.load(path, state)`` as checkpoint folders of this package.

Fabric hands its ``CheckpointIO`` the state with every module and optimizer already turned into its state dict (the
strategy's ``_convert_stateful_objects_in_state``), on global rank 0 only for DDP and single-device strategies; on
load every rank calls the IO and Fabric's strategy puts what the IO returns back into the passed modules and
optimizers (``load_state_dict``), and returns the rest. So the IO only has to turn that dictionary into a checkpoint
folder and back:

- The layout is the one the callbacks write, so that every tool reads it: one module's state dict is the
  checkpoint's ``state_dict`` (several: ``<entry>.<key>``, as a parent module with those children would name them),
  optimizer state dicts are ``optimizer_states``, and the ``fabric`` record keeps which entry was which plus the
  plain values (step counters, config, tensors of the user's own). ``load_weights``, ``merge``, ``export``,
  ``lightning-ckpt show/verify`` work unchanged, and model and optimizer tensors go to the model and optimizer files.
- An entry counts as a module's state dict when it is a non-empty mapping of names to tensors, and as an
  optimizer's when it has ``state`` and ``param_groups``; anything else is a value. A user's own dict of tensors is
  therefore stored as a module's; it comes back the same either way.
- ``path``'s folder is the checkpoint folder of a run (its lock, its content store, ``latest.json``); ``path``'s name
  is the checkpoint's name. One :class:`CheckpointWriter` per folder, created at the first save there and kept until
  ``teardown`` (Fabric calls it from ``strategy.teardown``) or the end of the process: the content store therefore
  deduplicates across saves as it does for the callbacks (a tensor unchanged since the previous save, frozen layers
  say, is written once into ``.blobs/`` and referenced afterwards).
- The writer is ``alone`` (see ``CheckpointWriter``): Fabric calls the IO on rank 0 only, so the save cannot be
  collective; DDP state is replicated, so rank 0 holds all of it. Strategies that shard the model (Fabric's FSDP and
  ModelParallel) save with their own code and never call the IO.
- A save to a path that already holds a checkpoint is refused (``torch.save`` would overwrite it): an earlier
  checkpoint is never replaced by surprise; save under a new name, or remove the old one first (the IO's
  ``remove_checkpoint``).
- The manifest's step is the state's ``step`` (or ``global_step``, ``iter_num``, ...) when it has an integer one,
  else the number of this IO's saves; its epoch, the state's integer ``epoch``.
"""
from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Mapping
from typing import Any

import torch

from ..compat import before_thread_shutdown
from ..format import manifest as mf
from ..store import is_remote
from ..writer import CheckpointWriter

log = logging.getLogger("lightning_ckpt")

RECORD = "fabric"
# what `lightning-ckpt show` says about resuming: the script decides what a resume restores
RESUME = {"exact": False, "position": None, "why": [
    "written by Lightning Fabric (fabric.save): a resume restores what the script passes to fabric.load; the data "
    "position and the RNG states are restored only if the script saved them in the state"]}
STEP_NAMES = ("step", "global_step", "iter_num", "step_count", "iteration", "steps")


def _is_module_state(v: Any) -> bool:
    return isinstance(v, Mapping) and bool(v) and all(isinstance(k, str) and torch.is_tensor(t) for k, t in v.items())


def _is_optimizer_state(v: Any) -> bool:
    return isinstance(v, Mapping) and "state" in v and "param_groups" in v


def to_checkpoint(state: Mapping[str, Any]) -> dict[str, Any]:
    """Fabric's converted state -> the checkpoint dictionary this package writes (the callbacks' layout)."""
    modules = [k for k, v in state.items() if _is_module_state(v)]
    optimizers = [k for k, v in state.items() if k not in modules and _is_optimizer_state(v)]
    out: dict[str, Any] = {}
    if len(modules) == 1:
        out["state_dict"] = dict(state[modules[0]])
    elif modules:
        out["state_dict"] = {f"{m}.{k}": v for m in modules for k, v in state[m].items()}
    if optimizers:
        out["optimizer_states"] = [state[o] for o in optimizers]
    taken = set(modules) | set(optimizers)
    out[RECORD] = {"modules": modules, "optimizers": optimizers,
                   "values": {k: v for k, v in state.items() if k not in taken}}
    return out


def from_checkpoint(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint dictionary -> what ``fabric.save`` was given (modules and optimizers as state dicts). A
    checkpoint written by the callbacks (no ``fabric`` record) comes back as it is."""
    record = ckpt.get(RECORD)
    if not isinstance(record, dict):
        return ckpt
    out: dict[str, Any] = {}
    modules = list(record.get("modules") or [])
    sd = ckpt.get("state_dict") or {}
    if len(modules) == 1:
        out[modules[0]] = sd
    elif modules:
        parts: dict[str, dict] = {m: {} for m in modules}
        for key, value in sd.items():  # the longest entry name first: "enc" must not take "enc2.weight"
            owner = max((m for m in modules if key.startswith(m + ".")), key=len)
            parts[owner][key[len(owner) + 1:]] = value
        out.update(parts)
    for name, osd in zip(record.get("optimizers") or [], ckpt.get("optimizer_states") or []):
        out[name] = osd
    out.update(record.get("values") or {})
    return out


def _int_value(values: Mapping[str, Any], names: tuple[str, ...]) -> int | None:
    for n in names:
        v = values.get(n)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return v
        if torch.is_tensor(v) and v.numel() == 1 and not v.is_floating_point():
            return int(v.item())
    return None


class FabricFolders:
    """The writers of one ``LightningCkptIO`` under Fabric: one per checkpoint folder, each holding its lock."""

    def __init__(self, *, async_save: bool, dedup: bool, fsync: bool) -> None:
        self.async_save, self.dedup, self.fsync = async_save, dedup, fsync
        self.writers: dict[str, tuple[CheckpointWriter, Any]] = {}
        self.saves = 0

    def save(self, state: Mapping[str, Any], path: Any) -> str:
        """Write ``state`` as the checkpoint ``path`` (returns its path once written; with ``async_save`` the
        commit may still be under way: :meth:`wait`)."""
        if is_remote(path):
            raise ValueError(
                f"fabric.save({path!r}): LightningCkptIO writes Fabric checkpoints into a local (or shared) folder; "
                "save there and copy them to S3 with `lightning-ckpt push PATH s3://bucket/prefix`.")
        target = os.path.abspath(os.fspath(path))
        folder, name = os.path.split(target.rstrip(os.sep))
        if not mf.is_plain_name(name):
            raise ValueError(
                f"fabric.save({os.fspath(path)!r}): a lightning_ckpt checkpoint is a folder named by the path's last "
                f"part, and {name!r} is not a plain name (letters, digits and '_.=+@,-', not starting with '.'); "
                "save to a path such as 'checkpoints/step-000100'.")
        writer = self._writer(folder)
        if os.path.lexists(target) or (writer.pending is not None and writer.pending.name == name):
            raise ValueError(
                f"fabric.save({os.fspath(path)!r}): {target} already exists; a lightning_ckpt checkpoint is never "
                "overwritten in place. Save under a new name (say with the step in it), or delete the old one first "
                "with the IO's remove_checkpoint(path).")
        ckpt = to_checkpoint(state)
        values = ckpt[RECORD]["values"]
        self.saves += 1
        step = _int_value(values, STEP_NAMES)
        epoch = _int_value(values, ("epoch",))
        writer.save(ckpt, step=self.saves if step is None else step, epoch=epoch, name=name, if_busy="wait",
                    meta={"resume": RESUME})
        return target

    def _writer(self, folder: str) -> CheckpointWriter:
        got = self.writers.get(folder)
        if got is not None:
            return got[0]
        writer = CheckpointWriter(folder, async_save=self.async_save, fsync=self.fsync, dedup=self.dedup, alone=True)
        writer.prepare_dir()
        lock = writer.store.lock({"run_id": f"fabric-{writer.writer_id}"})
        try:
            writer.store.cleanup(everyone=True)  # the lock holder alone writes here: a dead writer's leftovers go
        except OSError as e:
            log.warning("lightning_ckpt: could not clean up %s: %r", folder, e)
        if not self.writers:
            _close_at_exit(self)
        self.writers[folder] = (writer, lock)
        return writer

    def wait(self) -> None:
        """Every save of this IO is committed (raises the error of a failed background save)."""
        for writer, _ in list(self.writers.values()):
            writer.wait()

    def close(self) -> None:
        writers, self.writers = self.writers, {}
        try:
            for writer, _ in writers.values():
                writer.close()
        finally:
            for _, lock in writers.values():
                lock.release()


def _close_at_exit(folders: FabricFolders) -> None:
    """Fabric has no end of training to wait at: the last ``fabric.save`` of a script may still be writing when
    the script ends. The writer's threads use ``concurrent.futures``, which refuses new work once the interpreter
    starts shutting down, before ``atexit`` handlers run; so the writers are closed (every save committed) from
    ``threading``'s own exit hooks, which run before that refusal (they run in reverse order of registration, and
    ``concurrent.futures`` registers its hook when it is imported)."""
    ref = weakref.ref(folders)

    def close() -> None:
        f = ref()
        if f is not None and f.writers:
            try:
                f.close()
            except Exception as e:  # noqa: BLE001 - reported, as a failed background save is
                log.error("lightning_ckpt: a Fabric save did not complete at exit: %r", e)

    before_thread_shutdown(close)
