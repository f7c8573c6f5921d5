"""Deletions against random histories of two processes (hypothesis stateful testing): a writer process (a fork-server
child, as a training run would be) saves deduplicated checkpoints, crashes (with or without a failure note, with a
save half-written), is relaunched (resuming its run's newest, or branching from any checkpoint under a run name of
its own), while this process runs ``prune`` (rules, ``--failed``), ``remove_checkpoint`` and collections beside it,
with the folder lock on or disabled (``LIGHTNING_CKPT_LOCK=0``).

The model knows, independently of the package's own answer, what runs need: the newest checkpoint of each run line,
the best of each line (lowest loss among the ones tagged best), every checkpoint a relaunch started from, and the
live writer's save in progress. After every step: none of those was deleted, every listed checkpoint is one the
model expects and loads exactly what was saved into it, no manifest references a missing pack, every save of the
live writer commits, and a run a relaunch resumed from is not failed."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import zlib

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lightning_ckpt import list_checkpoints, load_checkpoint
from lightning_ckpt.policy.retention import RetentionRules
from lightning_ckpt.store.blobs import BlobStore
from lightning_ckpt.store import LocalStore
from lightning_ckpt.store.lock import FolderBusyError
from lightning_ckpt.store.base import owner_gone
from lightning_ckpt.folder.needed import failed_runs
from lightning_ckpt.tools.prune import CheckpointProtectedError, prune, remove_checkpoint

import support

pytestmark = pytest.mark.usefixtures("forkserver")

# The writer process: one command per line on stdin, one JSON answer per line on stdout.
WRITER = r"""
import json, os, sys, zlib
import torch
from lightning_ckpt import CheckpointWriter, load_checkpoint
from lightning_ckpt.store import LocalStore
from lightning_ckpt.folder.lineage import start_lineage
from lightning_ckpt.folder.needed import hold_resume_point, record_failed_run, settle_resumed

folder, seed, parent, run_id, line, locked = sys.argv[1:7]
parent = parent or None
line = line or None
lock = LocalStore(folder).lock({"run_id": run_id}) if locked == "1" else None
if parent:
    model = {k: v.clone() for k, v in load_checkpoint(parent)["state_dict"].items()}
    step = int(json.load(open(os.path.join(parent, "manifest.json")))["step"])
    settle_resumed(folder, parent, run_id)  # as a run's session does when it resumes or branches
    hold_resume_point(folder, parent, run_id)
else:
    g = torch.Generator().manual_seed(int(seed))
    model = {k: torch.randn(32 + 8 * i, generator=g) for i, k in enumerate(["f0", "f1", "t0", "t1"])}
    step = 0
lineage = start_lineage(parent, folder, branched=line is not None and parent is not None, run_name=line)
template = (line + "-" if line else "") + "step={step:06d}"
w = CheckpointWriter(folder, async_save=True, auto_seal=False, fsync=False, name_template=template)
best, pending, committed = None, None, 0
print(json.dumps({"ready": True}), flush=True)
for cmd in sys.stdin:
    cmd = json.loads(cmd)
    op = cmd["op"]
    if op == "write":
        if cmd["train"]:
            for k in ("t0", "t1"):
                model[k].add_(0.25)
        if cmd["touch"]:
            model["f0"].mul_(-1.0)
        step += 1
        loss = cmd["loss"]
        tag = "best" if best is None or loss < best else "periodic"
        best = loss if best is None else min(best, loss)
        pending = w.save({"state_dict": dict(model)}, step=step, tags=[tag], metrics={"loss": loss}, sync=True,
                         stable=["state_dict/f0", "state_dict/f1"],
                         meta={"run_id": run_id, "resumed_from": parent, "lineage": lineage,
                               "best_rule": [{"monitor": "loss", "mode": "min", "top_k": 1}]})
        crc = {k: zlib.crc32(v.numpy().tobytes()) for k, v in model.items()}
        print(json.dumps({"crc": crc, "tag": tag}), flush=True)
    elif op == "commit":
        w.seal()
        try:
            res = pending.result()
        except Exception as e:
            print(json.dumps({"error": repr(e)}), flush=True)
            continue
        committed += 1
        print(json.dumps({"name": res.name}), flush=True)
    elif op == "fail":  # what a run's session does when fit ends in an exception, then the process ends
        if committed:
            record_failed_run(folder, run_id, "RuntimeError('boom')", 0.0)
        os._exit(3)
"""


def crcs(sd: dict) -> dict:
    return {k: zlib.crc32(v.numpy().tobytes()) for k, v in sd.items()}


class Writer:
    def __init__(self, folder: str, seed: int, parent: str | None, run_id: str, line: str | None, locked: bool) -> None:
        self.parent, self.run_id, self.line = parent, run_id, line
        self.proc = support.start_python(
            ["-c", WRITER, folder, str(seed), parent or "", run_id, line or "", "1" if locked else "0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
        assert self.ask(None) == {"ready": True}
        self.pending: dict | None = None

    def ask(self, cmd: dict | None) -> dict:
        if cmd is not None:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the writer process ended (exit {self.proc.wait(10)})"
        return json.loads(line)

    def end(self, how: str) -> None:
        if how == "kill":
            self.proc.kill()
        else:
            self.proc.stdin.write(json.dumps({"op": "fail"}) + "\n")
            self.proc.stdin.flush()
        self.proc.wait(30)
        for f in (self.proc.stdin, self.proc.stdout):
            f.close()


class DeletionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="lc-delete-")
        self.writer: Writer | None = None
        self.expected: dict[str, dict] = {}  # name -> {"crc", "line", "loss", "tag", "run_id"}
        self.parents: dict[str, str] = {}  # run id of a branch (a new run of the folder) -> the checkpoint it started from
        self.resumed_runs: set[str] = set()  # run ids of those checkpoints' writers
        self.runs = 0
        self.env = os.environ.get("LIGHTNING_CKPT_LOCK")

    @initialize(locked=st.sampled_from([False, False, True]), seed=st.integers(0, 3))
    def start(self, locked, seed):
        self.locked = locked
        if not locked:
            os.environ["LIGHTNING_CKPT_LOCK"] = "0"
        self.launch(seed, None, None)

    def launch(self, seed: int, parent: str | None, line: str | None) -> None:
        self.runs += 1
        self.writer = Writer(self.dir, seed, parent and os.path.join(self.dir, parent), f"run{self.runs}", line,
                             self.locked)

    # ---------------------------------------------------------------- the writer process
    @precondition(lambda self: self.writer is not None)
    @rule(saves=st.lists(st.tuples(st.booleans(), st.booleans(), st.integers(0, 20)), min_size=1, max_size=3),
          hold=st.booleans())
    def save(self, saves, hold):
        """Saves committed one after the other; ``hold``: the last one stays written but not committed (a save in
        progress while the next steps run)."""
        for i, (train, touch, loss) in enumerate(saves):
            if self.writer.pending is not None:
                self.commit()
            got = self.writer.ask({"op": "write", "train": train, "touch": touch, "loss": loss / 4})
            self.writer.pending = {"crc": got["crc"], "tag": got["tag"], "loss": loss / 4}
            if not (hold and i == len(saves) - 1):
                self.commit()

    @precondition(lambda self: self.writer is not None and self.writer.pending is not None)
    @rule()
    def commit(self):
        got = self.writer.ask({"op": "commit"})
        assert "name" in got, f"a live writer's save failed: {got}"  # nothing it needed was deleted beside it
        self.expected[got["name"]] = {**self.writer.pending, "line": self.writer.line, "run_id": self.writer.run_id}
        self.writer.pending = None

    @precondition(lambda self: self.writer is not None)
    @rule(how=st.sampled_from(["kill", "fail"]))
    def crash(self, how):
        self.writer.end(how)  # a save in progress stays as a dead writer's partial folder
        self.writer = None

    @precondition(lambda self: self.writer is None and self.expected)
    @rule(pick=st.one_of(st.none(), st.integers(0, 100)), seed=st.integers(0, 3))
    def relaunch(self, pick, seed):
        if pick is None:  # resume="auto": the newest of the main line, or a fresh start
            main = self.ordered(None)
            parent, line = (main[-1] if main else None), None
        else:  # a branch from any checkpoint, under a run name of its own
            names = sorted(self.expected)
            parent, line = names[pick % len(names)], f"b{self.runs}"
        if parent is not None:
            if line is not None:  # a branch; a relaunch of the main line from its newest goes on with its run
                self.parents[f"run{self.runs + 1}"] = parent
            self.resumed_runs.add(self.expected[parent]["run_id"])
        self.launch(seed, parent, line)

    @precondition(lambda self: self.writer is not None and self.expected)
    @rule(how=st.sampled_from(["kill", "fail"]), pick=st.one_of(st.none(), st.integers(0, 100)), seed=st.integers(0, 3),
          then=st.one_of(st.none(), st.tuples(st.one_of(st.none(), st.integers(1, 3)), st.booleans())))
    def restart(self, how, pick, seed, then):
        """A crash and its relaunch at once (the common case, reached in fewer steps); ``then``: a prune right after,
        before the relaunched run recorded anything in a manifest."""
        self.crash(how)
        self.relaunch(pick, seed)
        if then is not None:
            self.prune(*then)

    # ---------------------------------------------------------------- deletions in this process
    def needed(self) -> set[str]:
        """What runs need, by the model: each line's newest and best, every branch's start, and the live run's start
        (a relaunch that goes on with its run pins where it resumed only while it runs: later it is an older
        checkpoint of the same line)."""
        runs = {e["run_id"] for e in self.expected.values()}  # a branch is known from its manifests once it committed
        out = {p for rid, p in self.parents.items() if rid in runs and p in self.expected}
        if self.writer is not None and self.writer.parent is not None:
            out.add(os.path.basename(self.writer.parent))
        for line in {e["line"] for e in self.expected.values()}:
            names = self.ordered(line)
            out.add(names[-1])
            best = [n for n in names if self.expected[n]["tag"] == "best"]
            if best:
                out.add(min(best, key=lambda n: (self.expected[n]["loss"], -self.step(n))))
        return out

    def step(self, name: str) -> int:
        return int(name.rsplit("=", 1)[1].split("-")[0])

    def ordered(self, line: str | None) -> list[str]:
        return sorted((n for n, e in self.expected.items() if e["line"] == line), key=self.step)

    def busy(self) -> bool:
        return self.locked and self.writer is not None

    @rule(keep_last=st.one_of(st.none(), st.integers(1, 3)), failed=st.booleans())
    def prune(self, keep_last, failed):
        if keep_last is None and not failed:
            failed = True
        need = self.needed()
        partials = {e for e in os.listdir(self.dir) if e.startswith(".partial-")}
        rules = RetentionRules(keep_last=keep_last) if keep_last else None
        if self.busy():
            with pytest.raises(FolderBusyError):
                prune(self.dir, rules, failed=failed)
            return
        report = prune(self.dir, rules, failed=failed)
        gone = {os.path.basename(d["path"]) for d in report.deleted}
        assert not gone & need, f"prune deleted what a run needs: {gone & need}"
        for n in gone:
            del self.expected[n]
        if self.writer is not None and self.writer.pending is not None:  # its save in progress is left alone
            live = {p for p in partials if not owner_gone(p.split("~")[1])}  # (a dead writer's may go)
            assert {e for e in os.listdir(self.dir) if e.startswith(".partial-")} >= live

    @precondition(lambda self: self.expected)
    @rule(pick=st.integers(0, 100))
    def remove(self, pick):
        names = sorted(self.expected)
        name = names[pick % len(names)]
        if self.busy():
            with pytest.raises(FolderBusyError):
                remove_checkpoint(os.path.join(self.dir, name))
        elif name in self.needed():
            with pytest.raises(CheckpointProtectedError):
                remove_checkpoint(os.path.join(self.dir, name))
        else:
            remove_checkpoint(os.path.join(self.dir, name))
            del self.expected[name]

    @precondition(lambda self: self.writer is None or self.writer.pending is None)
    @rule()
    def collect(self):
        LocalStore(self.dir).collect_packs()

    # ---------------------------------------------------------------- after every step
    @invariant()
    def nothing_needed_is_lost_and_everything_loads(self):
        ckpts = list_checkpoints(self.dir)
        assert {c.name for c in ckpts} == set(self.expected)
        present = set(BlobStore(self.dir).names())
        for c in ckpts:
            packs = set(c.manifest.get("packs") or {})
            assert packs <= present, f"{c.name} references missing packs {packs - present}"
            assert crcs(load_checkpoint(c.path)["state_dict"]) == self.expected[c.name]["crc"], c.name
        if self.writer is not None and self.writer.parent is not None:
            assert os.path.isdir(self.writer.parent), "the live run's resume point was deleted"
        if ckpts and not (self.locked and self.writer is not None):
            assert not failed_runs(self.dir, ckpts) & self.resumed_runs, "a resumed run is still counted as failed"

    def teardown(self):
        if self.writer is not None:
            self.writer.end("kill")
        if self.env is None:
            os.environ.pop("LIGHTNING_CKPT_LOCK", None)
        else:
            os.environ["LIGHTNING_CKPT_LOCK"] = self.env
        shutil.rmtree(self.dir, ignore_errors=True)


DeletionMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("LC_DELETE_EXAMPLES", "8")), stateful_step_count=25, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow])
TestDeletions = DeletionMachine.TestCase
