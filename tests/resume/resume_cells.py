"""The resume matrix: each cell trains a run straight through and a run that stops (a crash right after a commit, the
end of ``fit``, an early stop, a preemption), resumes the second from its newest checkpoint in a new Trainer and
compares both bit for bit: the weights, optimizer and scheduler states, the loops' counters, the callbacks' states,
``global_step``, and the batches seen after the resume.

Used in process by ``test_matrix.py``/``test_models.py`` and, for the cells killed with SIGKILL, by ``fork_server.py``.
A cell either resumes exactly, or its checkpoint says why not (the manifest's ``resume`` record, and a warning at the
save); ``expect`` states which, and the test fails on any other outcome.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import signal
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

for _name in ("lightning.pytorch", "lightning.fabric", "lightning"):
    logging.getLogger(_name).setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*GPU available but not used.*")

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.utilities import CombinedLoader  # noqa: E402
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402
from torchdata.stateful_dataloader.sampler import RandomSampler as StatefulRandomSampler  # noqa: E402

from lightning_ckpt import latest_checkpoint  # noqa: E402
from lightning_ckpt.callbacks import BaseCheckpointCallback  # noqa: E402
from lightning_ckpt.read import read_checkpoint_manifest  # noqa: E402

N_TRAIN, BATCH = 40, 4  # 10 batches per epoch
SEED = 7


# ------------------------------------------------------------------------------------------------ data
def tensors(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, torch.tanh(x @ torch.randn(8, 1, generator=g)) + 0.1 * torch.randn(n, 1, generator=g)


class Stream(IterableDataset):
    """An iterable dataset with its own position (a stateful dataset: StatefulDataLoader saves it); each epoch
    yields the samples in a new order derived from the epoch number."""

    def __init__(self, n: int = N_TRAIN, sized: bool = True) -> None:
        self.x, self.y = tensors(n, 1)
        self.epoch, self.pos, self.sized = 0, 0, sized

    def __iter__(self):
        if self.pos >= len(self.x):  # the previous epoch was read to its end
            self.epoch, self.pos = self.epoch + 1, 0
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(100 + self.epoch))
        while self.pos < len(self.x):
            i = order[self.pos]
            self.pos += 1
            yield self.x[i], self.y[i]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.pos = s["epoch"], s["pos"]


class SizedStream(Stream):
    def __len__(self) -> int:
        return len(self.x)


def make_loader(kind: str) -> Any:
    ds = TensorDataset(*tensors(N_TRAIN, 1))
    if kind == "stateful":  # the recommended loader: its sampler seeds itself from the global RNG when built
        return StatefulDataLoader(ds, batch_size=BATCH, shuffle=True)
    if kind == "stateful_seq":
        return StatefulDataLoader(ds, batch_size=BATCH)
    if kind == "stateful_gen":
        return StatefulDataLoader(ds, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(3))
    if kind == "stateful_sampler_gen":  # the exact way to give a StatefulDataLoader its own generator
        return StatefulDataLoader(ds, batch_size=BATCH,
                                  sampler=StatefulRandomSampler(ds, generator=torch.Generator().manual_seed(3)))
    if kind == "plain":
        return DataLoader(ds, batch_size=BATCH)
    if kind == "plain_shuffle":
        return DataLoader(ds, batch_size=BATCH, shuffle=True)
    if kind == "plain_gen":
        return DataLoader(ds, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(3))
    if kind == "iterable":
        return StatefulDataLoader(SizedStream(), batch_size=BATCH)
    if kind == "iterable_unsized":
        return StatefulDataLoader(Stream(), batch_size=BATCH)
    if kind == "combined":
        return CombinedLoader({"a": make_loader("stateful"), "b": make_loader("stateful_seq")}, mode="max_size_cycle")
    raise ValueError(kind)


def val_loader() -> DataLoader:
    return DataLoader(TensorDataset(*tensors(12, 2)), batch_size=6)


def fingerprint(x: torch.Tensor) -> str:
    return hashlib.sha1(x.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ model
class Net(pl.LightningModule):
    """A small MLP with dropout (the global torch RNG); records every batch it trains on."""

    def __init__(self, sched: str = "step", dropout: float = 0.2, metric: bool = False, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 1))
        self.sched, self.lr = sched, lr
        self.seen: list = []
        self.epoch_log: list = []  # (epoch, the metric's value over the epoch) with metric=True
        if metric:
            import torchmetrics

            self.train_mse = torchmetrics.MeanSquaredError()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if isinstance(batch, dict):  # two loaders
            x = torch.cat([batch["a"][0], batch["b"][0]])
            y = torch.cat([batch["a"][1], batch["b"][1]])
        else:
            x, y = batch
        self.seen.append((int(self.trainer.global_step), int(self.current_epoch), int(batch_idx), fingerprint(x)))
        out = self(x)
        loss = nn.functional.mse_loss(out.float(), y)
        self.log("train_loss", loss)
        if hasattr(self, "train_mse"):
            self.train_mse(out.detach().float(), y)
            self.log("train_mse", self.train_mse, on_step=False, on_epoch=True)
        return loss

    def on_train_epoch_end(self) -> None:
        if hasattr(self, "train_mse"):
            self.epoch_log.append((int(self.current_epoch), self.train_mse.compute().item()))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x).float(), y))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.sched == "step":
            return [opt], [{"scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, 0.8), "interval": "step"}]
        if self.sched == "epoch":
            return [opt], [{"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5), "interval": "epoch"}]
        if self.sched == "plateau":
            s = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0, threshold=10.0)
            return [opt], [{"scheduler": s, "monitor": "val_loss", "interval": "epoch"}]
        if self.sched == "plateau_step":
            s = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.7, patience=1, threshold=10.0)
            return [opt], [{"scheduler": s, "monitor": "train_loss", "interval": "step", "frequency": 2}]
        return opt


# ------------------------------------------------------------------------------------------------ cells
class Crash(RuntimeError):
    """The process "dies" here (in process: an exception; see fork_server.py for kill -9)."""


class CrashAt(pl.Callback):
    """At the start of step ``step``, once the saves so far are committed, die (raise, or SIGKILL)."""

    def __init__(self, step: int, kill: bool = False) -> None:
        self.step, self.kill = step, kill

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            for cb in trainer.callbacks:
                if isinstance(cb, BaseCheckpointCallback):
                    cb.writer.wait()
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise Crash(f"crash at step {self.step}")


class SignalAt(pl.Callback):
    """Send ``signum`` to this process during step ``step`` (a scheduler's preemption notice)."""

    def __init__(self, step: int, signum: int = signal.SIGUSR1) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), self.signum)


@dataclass
class Cell:
    """One configuration of the matrix.

    ``callbacks(dirpath, phase)`` builds the saving callbacks for ``phase`` in ``("ref", "cut", "resume")``;
    ``stop`` says how the cut run ends: ``("crash", step)`` (in-process crash once the saves so far are committed),
    ``("kill", step)`` (SIGKILL, see fork_server.py), ``("signal" | "sigterm", step)`` (a preemption notice, SIGUSR1
    or SIGTERM, during ``step``) or ``("fit", trainer overrides)`` (the run ends by itself: ``max_steps``,
    ``max_epochs``, an early stop). ``expect``: ``"exact"``, or a phrase of the reason
    the checkpoint must record (and the warning must give).
    """

    name: str
    callbacks: Callable[[str, str], list]
    stop: tuple
    expect: str = "exact"
    loader: str = "stateful"
    val: bool = True
    model: Callable[[], pl.LightningModule] = field(default=lambda: Net())
    trainer: dict = field(default_factory=lambda: {"max_steps": 25})
    differs: bool = False  # a not-exact cell whose resume is known to differ (asserted)
    extra: Callable[[str], list] = field(default=lambda phase: [])  # callbacks other than ours (all phases)
    make_train: Optional[Callable[[], Any]] = None
    make_val: Optional[Callable[[], Any]] = None
    ref: str = ""  # name of the reference run (cells that share it train the same run straight)
    ignore: tuple = ()  # callbacks whose state is not compared (configured differently in the cut run)

    @property
    def ref_key(self) -> str:
        return self.ref or self.name


@dataclass
class Run:
    dump: dict
    seen: list
    global_step: int
    ckpt: Optional[str] = None
    warnings: list = field(default_factory=list)
    model: Any = None


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def base_trainer_kwargs() -> dict:
    return dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                num_sanity_val_steps=2, deterministic=False)


def fit(cell: Cell, dirpath: str, phase: str, ckpt_path: Optional[str] = None, seed: int = SEED,
        extra_callbacks: Optional[list] = None, trainer_overrides: Optional[dict] = None) -> Run:
    """Train ``cell``'s run for ``phase``; the RNG is seeded with ``seed`` before anything is built (a resumed run
    gets another seed: only the restore may make it match)."""
    seed_all(seed)
    model = cell.model()
    train = cell.make_train() if cell.make_train else make_loader(cell.loader)
    val = (cell.make_val() if cell.make_val else val_loader()) if cell.val else None
    kw = base_trainer_kwargs()
    kw.update(cell.trainer)
    if not cell.val:
        kw["limit_val_batches"] = 0
    kw.update(trainer_overrides or {})
    callbacks = (cell.callbacks(dirpath, phase) if phase != "ref" else []) + cell.extra(phase) + list(extra_callbacks or [])
    kw["enable_checkpointing"] = any(isinstance(c, pl.callbacks.Checkpoint) for c in callbacks)  # else Lightning adds one
    trainer = pl.Trainer(callbacks=callbacks, default_root_dir=dirpath, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(model, train, val, ckpt_path=ckpt_path)
        except (Crash, SIGTERMException):
            pass
    return Run(dump=comparable_state(trainer), seen=list(model.seen), global_step=int(trainer.global_step),
               ckpt=ckpt_path, warnings=[str(w.message) for w in caught if "lightning_ckpt" in str(w.message)],
               model=model)


def comparable_state(trainer: pl.Trainer) -> dict:
    """The training state as Lightning would checkpoint it now, without what legitimately differs between two runs
    (our callbacks' folder names)."""
    ckpt = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    for k in ("pytorch-lightning_version", "hparams_name", "hyper_parameters", "lightning_ckpt"):
        ckpt.pop(k, None)
    ckpt["callbacks"] = {k: v for k, v in ckpt.get("callbacks", {}).items()
                         if not any(n in k for n in ("PeriodicCheckpoint", "BestMetricCheckpoint", "EarlyStopAndSave",
                                                     "PreemptionCheckpoint"))}
    module = trainer.lightning_module
    metrics = {}
    for name, m in module.named_modules():
        if hasattr(m, "metric_state") and hasattr(m, "update_count"):
            metrics[name] = {"state": dict(m.metric_state), "updates": m.update_count}
    ckpt["torchmetrics"] = metrics
    ckpt["callback_metrics"] = dict(trainer.callback_metrics)
    return ckpt


def diff(a: Any, b: Any, path: str = "") -> Optional[str]:
    """The first difference between two states (bit for bit), or None."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{path}: {type(a).__name__} vs {type(b).__name__}"
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{path}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        if not torch.equal(a, b) and not (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                          and torch.equal(a.nan_to_num(), b.nan_to_num())):
            d = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else "-"
            return f"{path}: values differ (max abs diff {d})"
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{path}: keys {sorted(map(str, set(a) ^ set(b)))[:6]} in only one"
        for k in a:
            d = diff(a[k], b[k], f"{path}/{k}")
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            d = diff(x, y, f"{path}/{i}")
            if d:
                return d
        return None
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None
    if type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
        return f"{path}: {a!r} vs {b!r}"
    return None if a == b else f"{path}: {a!r} vs {b!r}"


def seen_before(ref: Run, step: int) -> int:
    """How many batches the straight run trained before the checkpoint of ``step`` (batches whose optimizer step
    counts up to ``step``)."""
    return sum(1 for s in ref.seen if s[0] < step)


def compare(ref: Run, res: Run, ckpt: str, ignore: tuple = ()) -> Optional[str]:
    """Why the resumed run differs from the straight one (None when it is the same, bit for bit)."""
    step = int(read_checkpoint_manifest(ckpt)["step"])
    expected = ref.seen[seen_before(ref, step):]
    if res.seen != expected:
        first = next((i for i, (a, b) in enumerate(zip(res.seen, expected)) if a != b), min(len(res.seen), len(expected)))
        return (f"batches after the resume differ at #{first}: resumed {res.seen[first:first + 2]} vs straight "
                f"{expected[first:first + 2]} ({len(res.seen)} vs {len(expected)} batches)")
    if res.global_step != ref.global_step:
        return f"global_step {res.global_step} vs {ref.global_step}"
    log_ref, log_res = getattr(ref.model, "epoch_log", []), getattr(res.model, "epoch_log", [])
    if log_res != log_ref[len(log_ref) - len(log_res):]:
        return f"metric values per epoch differ: resumed {log_res} vs straight {log_ref}"
    a, b = ({**r.dump, "callbacks": {k: v for k, v in r.dump.get("callbacks", {}).items()
                                      if not any(n in k for n in ignore)}} for r in (ref, res))
    return diff(a, b)


def resume_record(ckpt: str) -> dict:
    return read_checkpoint_manifest(ckpt).get("resume") or {}


def cut_and_resume(cell: Cell, tmp: str) -> tuple[Run, Run, str]:
    """The cut run (in process), then a resume of its newest checkpoint in a new Trainer with a scrambled RNG."""
    d = os.path.join(tmp, "ckpts")
    kind, arg = cell.stop
    if kind == "crash":
        cut = fit(cell, d, "cut", extra_callbacks=[CrashAt(arg)])
    elif kind == "fit":
        cut = fit(cell, d, "cut", trainer_overrides=arg)
    elif kind == "signal":
        cut = fit(cell, d, "cut", extra_callbacks=[SignalAt(arg)])
    elif kind == "sigterm":  # Lightning stops the fit with a SIGTERMException
        cut = fit(cell, d, "cut", extra_callbacks=[SignalAt(arg, signal.SIGTERM)])
    else:
        raise ValueError(kind)
    ckpt = latest_checkpoint(d)
    assert ckpt is not None, f"{cell.name}: the cut run saved nothing"
    res = fit(cell, d, "resume", ckpt_path=ckpt, seed=SEED + 1000)
    cut.ckpt = ckpt
    return cut, res, ckpt


def check_cell(cell: Cell, ref: Run, cut: Run, res: Run, ckpt: str) -> str:
    """Assert the cell's outcome; returns its status for the report: "exact" or "not exact: <reasons>"."""
    record = resume_record(ckpt)
    assert record, f"{cell.name}: {ckpt} has no resume record"
    problem = compare(ref, res, ckpt, cell.ignore)
    if cell.expect == "exact":
        assert record["exact"], f"{cell.name}: expected an exact resume, the checkpoint says: {record['why']}"
        assert problem is None, f"{cell.name}: resumed from {os.path.basename(ckpt)}, not exact: {problem}"
        step = read_checkpoint_manifest(ckpt)["step"]
        own = [w for w in cut.warnings if f"checkpoint of step {step} will not reproduce" in w]
        assert not own, f"{cell.name}: spurious warning {own}"
        return "exact"
    assert not record["exact"], f"{cell.name}: the checkpoint claims an exact resume (expected: {cell.expect})"
    why = " | ".join(record["why"])
    assert cell.expect in why, f"{cell.name}: expected a reason with {cell.expect!r}, got: {why}"
    assert any(cell.expect in w for w in cut.warnings), f"{cell.name}: no warning at the save: {cut.warnings}"
    if cell.differs:
        assert problem is not None, f"{cell.name}: warned as not exact, but the resume was exact"
    return f"not exact ({cell.expect})" + ("" if problem is None else f"; differs: {problem}")
