"""The resume matrix (issue 12): where the save happens x which trigger x which loader, each cell resumed in a new
Trainer and compared bit for bit with the run that went straight through (see resume_cells.py). Cells run in this
process; the reference runs are shared between the cells that train the same run."""
from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import EarlyStopping

from lightning_ckpt import BestMetricCheckpoint, EarlyStopAndSave, PeriodicCheckpoint, PreemptionCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from resume_cells import Cell, Net, check_cell, cut_and_resume, fit, tensors

pytestmark = pytest.mark.filterwarnings("ignore:.*set_vital.*:UserWarning")  # torchdata on torch 2.13

REFS: dict = {}
REPORT: dict = {}


def periodic(**kw):
    kw.setdefault("async_save", False)
    return lambda d, phase: [PeriodicCheckpoint(d, **kw)]


def reference(cell: Cell, tmp_path_factory):
    if cell.ref_key not in REFS:
        REFS[cell.ref_key] = fit(cell, str(tmp_path_factory.mktemp("ref")), "ref")
    return REFS[cell.ref_key]


MID, BOUNDARY = ("crash", 4), ("crash", 11)  # after the save of step 3 (mid-epoch) / of step 10 (epoch end)
EVERY3 = periodic(every_n_train_steps=3)
EPOCHS = periodic(every_n_epochs=1)
VAL5 = {"max_steps": 25, "val_check_interval": 5}


def early_stop_and_save(d, phase):
    # the cut run stops at its first check; the others never stop early (their state is the same until then)
    kw = {"stopping_threshold": 1e9} if phase == "cut" else {"patience": 100}
    return [EarlyStopAndSave(d, monitor="val_loss", async_save=False, restore_best_weights=False, **kw),
            PeriodicCheckpoint(d, every_n_epochs=1)]


def lightning_early_stopping(phase):
    return [EarlyStopping("val_loss", stopping_threshold=1e9 if phase == "cut" else None, patience=100)]


def preempt(sig: str = "SIGUSR1"):
    return lambda d, phase: [PreemptionCheckpoint(d, signals=[sig], async_save=False),
                             PeriodicCheckpoint(d, every_n_train_steps=100, async_save=False)]


CELLS = [
    # ---------------------------------------------------------------- where the save happens
    Cell("mid-epoch", EVERY3, MID, ref="base"),
    Cell("last batch of an epoch (step trigger)", periodic(every_n_train_steps=10), BOUNDARY, ref="base"),
    Cell("epoch end, with validation", EPOCHS, BOUNDARY, ref="base"),
    Cell("epoch end, without validation", EPOCHS, BOUNDARY, val=False, ref="noval"),
    Cell("after a mid-epoch validation", periodic(every_n_train_steps=5), ("crash", 6), trainer=VAL5, ref="val5"),
    Cell("end of fit by max_steps, at an epoch end (issue 12)", periodic(every_n_train_steps=5),
         ("fit", {"max_steps": 10}), loader="plain", val=False, model=lambda: Net(dropout=0.0),
         trainer={"max_steps": 20}, ref="issue12"),
    Cell("end of fit by max_steps, at an epoch end, dropout and shuffle", periodic(every_n_train_steps=5),
         ("fit", {"max_steps": 10}), ref="base"),
    Cell("end of fit by max_steps, mid-epoch", periodic(every_n_train_steps=5), ("fit", {"max_steps": 7}), ref="base"),
    Cell("end of fit by max_epochs", periodic(every_n_train_steps=4), ("fit", {"max_epochs": 1}),
         trainer={"max_epochs": 3}, ref="epochs3"),
    Cell("end of fit by early stopping (EarlyStopAndSave, mid-epoch)", early_stop_and_save, ("fit", {}),
         trainer=VAL5, ref="val5"),
    Cell("end of fit by early stopping (Lightning's EarlyStopping, epoch end)", EPOCHS, ("fit", {}),
         extra=lightning_early_stopping, ignore=("EarlyStopping",), ref="lightning-early-stopping"),
    Cell("preemption mid-epoch", preempt(), ("signal", 4), ref="base"),
    Cell("preemption at a validation step", preempt(), ("signal", 5), trainer=VAL5, ref="val5"),
    Cell("preemption at the last batch of an epoch", preempt(), ("signal", 10), ref="base"),
    Cell("preemption by SIGTERM, mid-epoch", preempt("SIGTERM"), ("sigterm", 4), ref="base"),
    Cell("preemption by SIGTERM at the last batch of an epoch, no validation", preempt("SIGTERM"), ("sigterm", 10),
         val=False, ref="noval"),
    # Lightning raises inside the validation that follows: the state is the one before it (SIGUSR1 waits for it), and
    # a resumed run skips that validation (its shuffling val loader then draws from the RNG in the straight run only)
    Cell("preemption by SIGTERM at a validation step", preempt("SIGTERM"), ("sigterm", 5), trainer=VAL5,
         make_val=lambda: DataLoader(TensorDataset(*tensors(12, 2)), batch_size=6, shuffle=True),
         expect="a preemption took the state before the end of its training step", differs=True, ref="val5-shuffled"),
    # ---------------------------------------------------------------- triggers
    Cell("every_n_seconds", periodic(every_n_seconds=1e-9), ("crash", 7), ref="base"),
    Cell("best metric at validation", lambda d, p: [BestMetricCheckpoint(d, monitor="val_loss", async_save=False)],
         ("crash", 9), trainer=VAL5, ref="val5"),
    Cell("several callbacks on one folder",
         lambda d, p: [PeriodicCheckpoint(d, every_n_train_steps=4), BestMetricCheckpoint(d, monitor="val_loss"),
                       EarlyStopAndSave(d, monitor="val_loss", patience=100, restore_best_weights=False)],
         ("crash", 13), trainer=VAL5, ref="val5"),
    Cell("async save, mid-epoch", periodic(every_n_train_steps=3, async_save=True), MID, ref="base"),
    # ---------------------------------------------------------------- loaders
    Cell("StatefulDataLoader with generator=, mid-epoch", EVERY3, MID, loader="stateful_gen",
         expect="is not restored exactly", differs=True, ref="stateful_gen"),
    Cell("StatefulDataLoader with generator=, epoch end", EPOCHS, BOUNDARY, loader="stateful_gen",
         expect="is not restored exactly", differs=True, ref="stateful_gen"),
    Cell("StatefulDataLoader with a sampler generator, mid-epoch", EVERY3, MID, loader="stateful_sampler_gen",
         ref="stateful_sampler_gen"),
    Cell("StatefulDataLoader with a sampler generator, epoch end", EPOCHS, BOUNDARY, loader="stateful_sampler_gen",
         ref="stateful_sampler_gen"),
    Cell("StatefulDataLoader unshuffled, epoch end", EPOCHS, BOUNDARY, loader="stateful_seq", ref="stateful_seq"),
    Cell("DataLoader, mid-epoch", EVERY3, MID, loader="plain", expect="does not save its position",
         differs=True, ref="plain"),
    Cell("DataLoader, epoch end", EPOCHS, BOUNDARY, loader="plain", ref="plain"),
    Cell("DataLoader shuffle=True, mid-epoch", EVERY3, MID, loader="plain_shuffle",
         expect="does not save its position", differs=True, ref="plain_shuffle"),
    Cell("DataLoader shuffle=True, epoch end", EPOCHS, BOUNDARY, loader="plain_shuffle", ref="plain_shuffle"),
    Cell("DataLoader shuffle=True with generator=, epoch end", EPOCHS, BOUNDARY, loader="plain_gen",
         expect="does not save its generator", differs=True, ref="plain_gen"),
    Cell("IterableDataset, mid-epoch", EVERY3, MID, loader="iterable", ref="iterable"),
    Cell("IterableDataset, epoch end", EPOCHS, BOUNDARY, loader="iterable", ref="iterable"),
    Cell("IterableDataset without __len__, mid-epoch", EVERY3, MID, loader="iterable_unsized",
         expect="without __len__", differs=True, ref="iterable_unsized"),
    Cell("IterableDataset without __len__, epoch end", EPOCHS, BOUNDARY, loader="iterable_unsized",
         expect="without __len__", differs=True, ref="iterable_unsized"),
    Cell("two training loaders (CombinedLoader), mid-epoch", EVERY3, MID, loader="combined", ref="combined"),
    Cell("two training loaders (CombinedLoader), epoch end", EPOCHS, BOUNDARY, loader="combined", ref="combined"),
    Cell("accumulate_grad_batches=2, mid-epoch", periodic(every_n_train_steps=2), ("crash", 3),
         trainer={"max_steps": 12, "accumulate_grad_batches": 2}, ref="accumulate"),
    Cell("accumulate_grad_batches=2, epoch end", EPOCHS, ("crash", 6),
         trainer={"max_steps": 12, "accumulate_grad_batches": 2}, ref="accumulate"),
    Cell("precision bf16-mixed, mid-epoch", EVERY3, MID, trainer={"max_steps": 25, "precision": "bf16-mixed"},
         ref="bf16"),
    Cell("precision bf16-mixed, epoch end", EPOCHS, BOUNDARY, trainer={"max_steps": 25, "precision": "bf16-mixed"},
         ref="bf16"),
]


@pytest.mark.parametrize("cell", CELLS, ids=[c.name for c in CELLS])
def test_resume_cell(cell: Cell, tmp_path, tmp_path_factory):
    ref = reference(cell, tmp_path_factory)
    cut, res, ckpt = cut_and_resume(cell, str(tmp_path))
    REPORT[cell.name] = check_cell(cell, ref, cut, res, ckpt)
