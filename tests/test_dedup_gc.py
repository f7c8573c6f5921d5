"""Reference counting and garbage collection of the content store against random sequences of saves, branches
(new writers on the same folder, as a resumed or branched process) and deletions (hypothesis stateful testing),
including deletions and collections between a save's write and its commit, and frozen tensors returning to bytes
the store held before (found by content hash, maybe collected since).

After every step: every committed checkpoint verifies and loads exactly what was saved into it, no committed manifest
references a missing pack, and after a collection no pack is left that neither a committed manifest references nor a
live writer may still reuse."""
from __future__ import annotations

import os
import shutil
import tempfile

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lightning_ckpt import CheckpointWriter, list_checkpoints, load_checkpoint, verify_checkpoint
from lightning_ckpt.format import manifest as mf
from lightning_ckpt.store import LocalStore
from lightning_ckpt.store.blobs import BlobStore

FROZEN = ["f0", "f1", "f2"]
TRAINED = ["t0", "t1"]
STABLE = [f"state_dict/{k}" for k in FROZEN]


def fresh_model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(64 + 8 * i, generator=g) for i, k in enumerate(FROZEN + TRAINED)}


class Branch:
    def __init__(self, folder: str, model: dict) -> None:
        self.model = model
        self.initial = {k: v.clone() for k, v in model.items()}
        # each save is written at once (sync) and committed when sealed: something can happen in between
        self.writer = CheckpointWriter(folder, async_save=True, auto_seal=False)
        self.step = 0


class ContentStoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="lc-dedup-")
        self.branches: list[Branch] = []
        self.expected: dict[str, dict[str, torch.Tensor]] = {}  # committed name -> its model
        self.collected = False

    @initialize(seed=st.integers(0, 3))
    def start(self, seed):
        self.branches.append(Branch(self.dir, fresh_model(seed)))

    @rule(i=st.integers(0, 7), train=st.booleans(),
          touch_frozen=st.sampled_from([None, "inplace", "data", "replace", "revert"]),
          delete_before_commit=st.one_of(st.none(), st.integers(0, 100)))
    def save(self, i, train, touch_frozen, delete_before_commit):
        b = self.branches[i % len(self.branches)]
        if train:
            for k in TRAINED:
                b.model[k].add_(0.25)
        if touch_frozen == "inplace":
            b.model["f0"].mul_(-1.0)
        elif touch_frozen == "data":  # the version counter does not see this one
            b.model["f1"].data.add_(3.0)
        elif touch_frozen == "replace":
            b.model["f2"] = b.model["f2"] + 1.0
        elif touch_frozen == "revert":  # the bytes of the branch's first save, in a pack maybe collected since
            for k in FROZEN:
                b.model[k].copy_(b.initial[k])
        b.step += 1
        pending = b.writer.save({"state_dict": dict(b.model)}, step=b.step, stable=STABLE, sync=True)
        if delete_before_commit is not None and self.expected:  # retention and a collection between write and commit
            names = sorted(self.expected)
            name = names[delete_before_commit % len(names)]
            assert LocalStore(self.dir).delete(name)
            del self.expected[name]
            LocalStore(self.dir).collect_packs()
        b.writer.seal()
        res = pending.result()
        self.expected[res.name] = {k: v.clone() for k, v in b.model.items()}
        self.collected = False

    @precondition(lambda self: self.expected)
    @rule(pick=st.integers(0, 100))
    def branch(self, pick):
        names = sorted(self.expected)
        name = names[pick % len(names)]
        sd = load_checkpoint(os.path.join(self.dir, name))["state_dict"]
        self.branches.append(Branch(self.dir, {k: v.clone() for k, v in sd.items()}))

    @precondition(lambda self: len(self.branches) > 1)
    @rule(i=st.integers(0, 7))
    def end_branch(self, i):
        b = self.branches.pop(i % len(self.branches))
        b.writer.close()  # its pins go: what only it could reuse is collectable now
        self.collected = False

    @precondition(lambda self: self.expected)
    @rule(pick=st.integers(0, 100), collect=st.booleans())
    def delete(self, pick, collect):
        names = sorted(self.expected)
        name = names[pick % len(names)]
        assert LocalStore(self.dir).delete(name)
        del self.expected[name]
        self.collected = False
        if collect:
            self.collect()

    @rule()
    def collect(self):
        LocalStore(self.dir).collect_packs()
        self.collected = True

    @invariant()
    def every_checkpoint_is_whole(self):
        ckpts = list_checkpoints(self.dir)
        assert {c.name for c in ckpts} == set(self.expected)
        present = set(BlobStore(self.dir).names())
        referenced = set()
        for c in ckpts:
            packs = set(c.manifest.get("packs") or {})
            assert packs <= present, f"{c.name} references missing packs {packs - present}"
            referenced |= packs
            verify_checkpoint(c.path)
            got = load_checkpoint(c.path)["state_dict"]
            exp = self.expected[c.name]
            assert set(got) == set(exp)
            for k in exp:
                assert torch.equal(got[k], exp[k]), (c.name, k)
        if self.collected:
            leftover = present - referenced - BlobStore(self.dir).pinned()
            assert not leftover, f"unreferenced packs survived a collection: {leftover}"

    def teardown(self):
        for b in self.branches:
            b.writer.close()
        assert not BlobStore(self.dir).pinned()
        LocalStore(self.dir).collect_packs()
        referenced = {p for c in list_checkpoints(self.dir) for p in (c.manifest.get("packs") or {})}
        assert set(BlobStore(self.dir).names()) == referenced
        assert not os.path.exists(os.path.join(self.dir, mf.BLOBS)) or referenced or not os.listdir(
            os.path.join(self.dir, mf.BLOBS))
        shutil.rmtree(self.dir, ignore_errors=True)


ContentStoreMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("LC_DEDUP_EXAMPLES", "25")), stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestContentStore = ContentStoreMachine.TestCase
