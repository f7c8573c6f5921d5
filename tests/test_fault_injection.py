"""kill -9 of the training process at chosen and at random moments during write, commit, retention, upload, the
content store's garbage collection (local and S3) and while it holds the folder's lock.

After every kill: ``latest_checkpoint`` returns a checkpoint that verifies and loads (once any save committed), no
``.partial-*`` folder is ever listed, the relaunch resumes from the newest valid checkpoint and loses at most one
checkpoint interval, leftovers of the previous crash are cleaned up, and on S3 nothing partial is visible: every
checkpoint listed there pulls and verifies, and ``latest.json`` names one of them. Every few trials a Trainer really
resumes from the newest checkpoint. A few times the local folder is deleted (the machine is gone) and the newest
checkpoint on S3 is restored, alternately by ``resume_path`` here and by the relaunched run itself (once killed while
it downloads).

Deduplicated checkpoints: every committed checkpoint, local and on S3, references only packs that are there and
verify; every collection the child ran (after retention, locally and on S3) left no pack it should have removed
(locally: none that no committed manifest references and no pending save holds; on S3: none of those unreferenced
that the run uploaded or that are older than the grace); the packs a crash left unreferenced are gone after the
relaunch's first collection, and a run that ends normally leaves no unreferenced pack at all. The folder's lock is
free after every kill (the kernel released it) and the relaunch takes it.

The job: the demo model fine-tuned (frozen layers, refreshed every few steps so that packs are written, reused and
collected: ``BackboneRefresh``), a deduplicated checkpoint every step, ``RetentionPolicy(keep_last=2)``, backups to S3
with the location's own retention (keep 3), ``resume="auto"`` (see ``training_setup`` in
``tests/faults/kill_trials.py``).

Starting Python with torch and Lightning costs seconds, so one fork server (``tests/faults/kill_trials.py``) imports
everything once and forks a child per trial; see its docstring. It is itself started as a child of the session's
fork server (``tests/support/_forkserver.py``), which has already imported all of it. The trials are driven from
here, in sequence, so each trial's kill plan can depend on what earlier trials did (every phase is hit until it has
enough kills).

The schedule is random with a fixed seed; ``LC_FAULT_SEED=<n>`` replays or varies it (timing still differs from run
to run: the random kills land wherever the child happens to be).
"""
from __future__ import annotations

import json
import os
import queue
import random
import shutil
import signal
import subprocess
import threading
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import pytest
import torch

from lightning_ckpt import CheckpointNotFoundError, latest_checkpoint, list_checkpoints, load_checkpoint, resume_path, verify_checkpoint
from lightning_ckpt.format import manifest as mf
from lightning_ckpt.read import read_checkpoint_manifest
from lightning_ckpt.store.blobs import BlobStore
from lightning_ckpt.store.lock import FolderLock
from lightning_ckpt.store.s3 import S3Store
from lightning_ckpt.folder.transfer import pull_checkpoint

from support import ROOT, TESTS, list_remote, remote_steps, start_python
from support.files import tail

pytestmark = [pytest.mark.faults, pytest.mark.slow]

SERVER_SCRIPT = os.path.join(TESTS, "faults", "kill_trials.py")
BUCKET = "faults"  # the s3 fixture's bucket for this module (the session's server)

SEED = int(os.environ.get("LC_FAULT_SEED", "1234"))
PHASES = ("write", "commit", "retention", "upload", "gc", "lock")
# deliberate kills that must fire in each phase (the lock's points are passed once per run, at its start)
KILLS_PER_PHASE = {"write": 8, "commit": 9, "retention": 9, "upload": 9, "gc": 10, "lock": 4}
MIN_PER_PHASE = {ph: n - 2 for ph, n in KILLS_PER_PHASE.items()}  # asserted
RANDOM_KILLS = 14             # kills by the server after a random delay
MIN_TRIALS = 60               # asserted: trials that ended in SIGKILL
MAX_TRIALS = 110              # safety cap on the schedule
BUDGET = 6                    # training steps per child (if it is not killed first)
RESUME_EVERY = 8              # a real Trainer resume from the newest checkpoint every N trials (and at the end)
FRESH_EVERY = 6               # every N-th trial runs in a fresh folder with a fresh S3 prefix
DELETE_LOCAL_EVERY = 9        # after every N-th trial in it, the crash-looping folder is deleted (restored from S3)
TRIAL_TIMEOUT_S = 90.0        # a child running longer is stuck: killed, and the test fails


# ------------------------------------------------------------------------------------------------- fork server
class ForkServer:
    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.stderr_path = os.path.join(workdir, "server.stderr")
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self._stderr = open(self.stderr_path, "wb")
        self.proc = start_python(  # a fork-server child: its own process group (setsid), children included
            [SERVER_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, cwd=ROOT, env=env,
            text=True,
        )
        self._lines: "queue.Queue[str | None]" = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.ready: dict | None = None
        self._n = 0

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _reply(self, timeout: float) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the fork server did not answer within {timeout:.0f}s; its stderr:\n{self.stderr_tail()}") from None
        if line is None:
            raise AssertionError(f"the fork server exited (rc={self.proc.poll()}); its stderr:\n{self.stderr_tail()}")
        return json.loads(line)

    def wait_ready(self) -> dict:
        if self.ready is None:
            self.ready = self._reply(timeout=180)
            assert self.ready.get("ready"), self.ready
            assert self.ready["threads"] == 1, (
                f"the fork server has {self.ready['threads']} OS threads after its imports; forking it could deadlock "
                "the children (a library started a thread pool at import)"
            )
        return self.ready

    def call(self, cmd: dict, timeout: float) -> dict:
        self.wait_ready()
        self._n += 1
        cmd = dict(cmd, id=self._n)
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        rep = self._reply(timeout)
        assert rep.get("id") == self._n, f"out-of-order reply {rep} to {cmd}"
        assert rep.get("outcome") != "error", f"the fork server failed on {cmd}: {rep.get('error')}"
        return rep

    def children(self) -> list[int]:
        """Processes whose parent is the server (there must be none between trials)."""
        out = []
        for e in os.listdir("/proc"):
            if not e.isdigit():
                continue
            try:
                with open(f"/proc/{e}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == self.proc.pid and fields[0] != "Z":
                out.append(int(e))
        return out

    def stderr_tail(self, n: int = 3000) -> str:
        return tail(self.stderr_path, n)

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.proc.stdin.write('{"op": "quit"}\n')
                    self.proc.stdin.flush()
                except (BrokenPipeError, ValueError):
                    pass
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            try:  # whatever is left in its process group (a stuck child included) goes with it
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait(timeout=10)
            self._stderr.close()


@pytest.fixture(scope="module")
def fork_server(forkserver, tmp_path_factory):
    server = ForkServer(str(tmp_path_factory.mktemp("fork-server")))
    try:
        yield server
    finally:
        server.close()


# ------------------------------------------------------------------------------------------------- bookkeeping
@dataclass
class Folder:
    dir: str
    prefix: str
    last_step: int | None = None        # newest committed step after the previous trial (None: nothing yet)
    trials: int = 0
    remote_only: bool = False           # the folder was deleted: the next run restores `last_step` from S3 itself
    blobs_debris: set = field(default_factory=set)  # entries of .blobs other than packs after the previous trial
    unreferenced: set = field(default_factory=set)  # packs no committed checkpoint referenced after the previous trial

    @property
    def uri(self) -> str:
        return f"s3://{BUCKET}/{self.prefix}"


@dataclass
class Campaign:
    seed: int
    root: str
    s3: object
    server: ForkServer
    rng: random.Random = field(init=False)
    counts: dict = field(default_factory=dict)          # kill point -> passes per run (from calibration)
    t_train: float = 1.0                                 # seconds of training per run (from calibration)
    t_setup: float = 0.3
    fired: Counter = field(default_factory=Counter)      # phase -> deliberate kills that fired
    fired_points: Counter = field(default_factory=Counter)
    random_kills: int = 0
    random_events: Counter = field(default_factory=Counter)  # phase of the last event before a random kill
    killed: int = 0
    completed: int = 0
    resumes: int = 0
    restores: int = 0                                    # resume_path restored a deleted folder from S3
    child_restores: int = 0                              # a relaunch restored a deleted folder from S3 by itself
    s3_checked: dict = field(default_factory=dict)       # (prefix, name) -> signature of its verified objects
    s3_complete: set = field(default_factory=set)        # (prefix, name) ever seen complete on S3
    s3_orphans: dict = field(default_factory=dict)       # prefix -> names with objects but no manifest on S3
    s3_packs_of: dict = field(default_factory=dict)      # (manifest key, ETag) -> the packs that manifest references
    collections: Counter = field(default_factory=Counter)  # "local"/"s3" -> collections the children completed
    packs_removed: Counter = field(default_factory=Counter)  # "local"/"s3" -> packs those collections removed
    crash_packs_collected: int = 0                       # unreferenced packs a crash left, removed by the relaunch
    crash_debris_collected: int = 0                      # temp files a crash left in .blobs, removed by the relaunch
    sweeps_left_packs: int = 0                           # kills at gc.mid_sweep that left unreferenced packs
    log: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)


def _expected_model_shapes() -> dict:
    from lightning_ckpt.demo import DemoModel

    return {k: tuple(v.shape) for k, v in DemoModel(**MODEL_KW).state_dict().items()}


def read_gc_log(path: str) -> list[dict]:
    try:
        with open(path) as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except FileNotFoundError:
        return []


def _listing(d: str) -> str:
    if not os.path.isdir(d):
        return "(no folder)"
    rows = []
    for e in sorted(os.listdir(d)):
        p = os.path.join(d, e)
        rows.append(f"{e}/ {sorted(os.listdir(p))}" if os.path.isdir(p) else e)
    return "\n    ".join(rows)


def _step_of(name: str) -> int:
    return int(name.split("=", 1)[1].split("-", 1)[0])


# ------------------------------------------------------------------------------------------------- checks
def check_local(c: Campaign, f: Folder, rep: dict, leftovers_before: set, shapes: dict, gc_log: list[dict]) -> str | None:
    """Everything that must hold in the run folder after the child died. Returns the newest checkpoint's path."""
    fired = rep.get("fired") or {}
    point = fired.get("point", "")
    ckpts, latest = [], None  # no folder: the child was killed before it created it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if os.path.isdir(f.dir):
            ckpts = list_checkpoints(f.dir)
            latest = latest_checkpoint(f.dir)
    bad = [str(w.message) for w in caught if "lightning_ckpt" in str(w.message)]
    if not os.path.isdir(f.dir):  # killed before the run made its folder: only the missing-folder warning
        bad = [b for b in bad if "does not exist: no checkpoint to resume from" not in b]
    assert not bad, f"listing or choosing the latest checkpoint warned about a broken checkpoint: {bad}"
    names = [ck.name for ck in ckpts]
    assert not [n for n in names if n.startswith(".")], f"a partial/trash folder is listed as a checkpoint: {names}"
    present = set(BlobStore(f.dir).names()) if os.path.isdir(f.dir) else set()
    referenced = {p for ck in ckpts for p in ck.manifest.get("packs") or {}}
    for ck in ckpts:  # every committed checkpoint is complete, not only the newest
        packs = ck.manifest.get("packs") or {}
        missing = sorted(set(packs) - present)
        assert not missing, f"{ck.name} references packs that are not in {f.dir}/{mf.BLOBS}: {missing}"
        for p, entry in packs.items():
            size = os.path.getsize(BlobStore(f.dir).pack(p))
            assert size == int(entry["size"]), f"{ck.name} references {p} of {entry['size']} bytes; it has {size}"
        verify_checkpoint(ck.path)  # every byte, the packs it references included
    latest_step = None
    if latest is not None:
        assert os.path.basename(latest) == ckpts[-1].name, f"latest_checkpoint={latest} is not the newest of {names}"
        latest_step = ckpts[-1].step
        ck = load_checkpoint(latest)
        assert ck["global_step"] == latest_step, f"{latest}: global_step {ck['global_step']} != manifest step {latest_step}"
        sd = ck["state_dict"]
        assert {k: tuple(v.shape) for k, v in sd.items()} == shapes, f"{latest}: model tensors differ from the model's"
        assert all(bool(torch.isfinite(v).all()) for v in sd.values()), f"{latest}: non-finite weights"
        assert ck.get("optimizer_states") and ck.get("loops"), f"{latest}: no optimizer or loop state to resume from"

    # the relaunch resumed from the newest valid checkpoint, and the newest never goes backwards
    started = rep.get("started_step")
    if started is not None:
        assert started == (f.last_step or 0), (
            f"the child started training at step {started}, but the newest valid checkpoint was {f.last_step}"
        )
    if f.last_step is not None and not (f.remote_only and latest_step is None and started is None):
        assert latest_step is not None and latest_step >= f.last_step, (
            f"the newest checkpoint went from step {f.last_step} to {latest_step}"
            + (" (the folder had been deleted; the relaunch should have restored it from S3)" if f.remote_only else "")
        )
    # at most one checkpoint interval (1 step) lost: when the child was at the start of step p+1, step p-1 was committed
    progress = rep.get("progress")
    if progress is not None and started is not None and progress > started and progress - 1 >= 1:
        assert latest_step is not None and latest_step >= progress - 1, (
            f"training had reached step {progress} but the newest checkpoint is {latest_step}: more than one "
            "checkpoint interval lost"
        )
    if point in ("restore.after_download", "restore.mid_pack_copy"):
        assert f.remote_only and latest is None, f"killed while restoring from S3, yet the folder has {latest}"
    if PHASES_OF_POINT.get(point) in ("retention", "upload") or point in COMMITTED_POINTS:
        assert latest is not None, f"killed at {point}, after a commit, yet there is no checkpoint"

    # local latest.json, if any, names a committed checkpoint
    lj = os.path.join(f.dir, "latest.json")
    if os.path.exists(lj):
        with open(lj) as fh:
            named = json.load(fh)["name"]
        assert named in names, f"latest.json names {named!r}, which is not a committed checkpoint ({names})"
        if point == "commit.after_latest":
            assert named == fired["name"], f"killed after latest.json was replaced, but it names {named!r}"

    # what the kill point says about the checkpoint it interrupted
    name = fired.get("name")
    if point in UNCOMMITTED_POINTS:
        assert name not in names, f"killed at {point} before {name} was committed, yet it is listed: {names}"
    if point in COMMITTED_POINTS:
        assert latest is not None and os.path.basename(latest) == name, (
            f"killed at {point}, after {name} was renamed into place, but the newest checkpoint is {latest}"
        )
    if point == "retention.before_trash":
        assert set(fired["names"]) <= set(names), f"retention was killed before renaming {fired['names']}, yet some are gone"
    if point in ("retention.after_trash", "retention.before_remove", "retention.mid_remove"):
        assert name not in names, f"{name} was renamed to the trash, yet it is listed"

    # leftovers of the previous crash are removed when the next run starts (cleanup_partials in setup)
    if rep.get("train_started"):
        still = leftovers_before & set(os.listdir(f.dir))
        assert not still, f"leftovers of an earlier crash were not cleaned up by the relaunch: {sorted(still)}"

    # the content store: every collection the child completed left nothing it should have removed; the packs left
    # unreferenced before the relaunch are gone after its first collection; a run that ended leaves none at all
    for rec in gc_log:
        assert rec["readable"], f"a manifest could not be read during a collection: {rec}"
        assert not rec["left"], (
            f"a {rec['where']} collection left packs it should have removed: {rec['left']} (it removed {rec['removed']})")
    unreferenced = present - referenced
    blobs = os.path.join(f.dir, mf.BLOBS)
    debris = {e for e in os.listdir(blobs) if e not in present} if os.path.isdir(blobs) else set()
    if any(rec["where"] == "local" for rec in gc_log):
        stale = f.unreferenced & unreferenced
        assert not stale, f"packs left unreferenced by the previous crash survived the relaunch's collection: {sorted(stale)}"
        c.crash_packs_collected += len(f.unreferenced - present)
        stale = f.blobs_debris & debris
        assert not stale, f"what a crash left in {blobs} survived the relaunch's collection: {sorted(stale)}"
        c.crash_debris_collected += len(f.blobs_debris)
    f.unreferenced, f.blobs_debris = unreferenced, debris
    if rep["outcome"] == "exit":
        assert not unreferenced, f"the run ended normally but left unreferenced packs: {sorted(unreferenced)}"
    if point == "gc.mid_sweep" and unreferenced:
        c.sweeps_left_packs += 1

    # the lock: free once its holder is dead (flock is released by the kernel), and a relaunch can take it
    if os.path.isdir(f.dir):
        assert FolderLock(f.dir).holder() is None, f"the lock of {f.dir} is still held after its holder died"
        lock = FolderLock(f.dir)
        lock.acquire({"run_id": "test_fault_injection"})
        lock.release()
    return latest


def check_s3(c: Campaign, f: Folder, rep: dict) -> list[str]:
    """Nothing partial is visible on S3: every listed checkpoint pulls and verifies; latest.json names one of them."""
    s3 = c.s3.client()
    objs: dict[str, list] = defaultdict(list)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f.prefix + "/"):
        for o in page.get("Contents", []):
            rel = o["Key"][len(f.prefix) + 1:]
            if "/" in rel:
                objs[rel.split("/", 1)[0]].append((o["Key"], o["ETag"], o["Size"]))
    names = list_remote(f.uri)
    c.s3_orphans[f.prefix] = sorted(set(objs) - set(names) - {mf.BLOBS})  # of interrupted uploads/deletes
    packs = {k.rsplit("/", 1)[-1]: (k, e, sz) for k, e, sz in objs.get(mf.BLOBS, ())}
    scratch = os.path.join(c.root, "s3-pulls")
    for n in list(names):
        # its packs are there, with their sizes (a pull may find them in the read cache and not notice)
        refs = {}
        man = [(k, e) for k, e, _ in objs.get(n, ()) if k.endswith("/" + mf.MANIFEST)]
        if man:
            if man[0] not in c.s3_packs_of:
                try:
                    c.s3_packs_of[man[0]] = S3Store(f.uri).read_manifest(n)[0].get("packs") or {}
                except CheckpointNotFoundError:
                    c.s3_packs_of[man[0]] = {}  # deleted since the listing (see below)
            refs = c.s3_packs_of[man[0]]
        missing = sorted(p for p, e in refs.items() if p not in packs or packs[p][2] != int(e["size"]))
        assert not missing, f"S3 lists {f.uri}/{n}, whose packs {missing} are missing or of another size on S3"
        sig = tuple(sorted(objs.get(n, ()))) + tuple(sorted(packs[p] for p in refs))
        if c.s3_checked.get((f.prefix, n)) == sig:
            continue
        try:
            got = pull_checkpoint(f"{f.uri}/{n}", scratch)  # downloads every file and verifies every byte
        except CheckpointNotFoundError:
            # the child's last request, a retention delete of this manifest, may land just after the listing
            if n in list_remote(f.uri):
                raise
            names.remove(n)
            continue
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"S3 lists {f.uri}/{n} (its manifest is there), but it does not pull and verify: "
                                 f"{type(e).__name__}: {e}; its objects: {sorted(k for k, _, _ in objs.get(n, ()))}") from None
        shutil.rmtree(got)
        c.s3_checked[(f.prefix, n)] = sig
        c.s3_complete.add((f.prefix, n))
    try:
        body = s3.get_object(Bucket=BUCKET, Key=f"{f.prefix}/latest.json")["Body"].read()
    except s3.exceptions.NoSuchKey:
        body = None
    if body is not None:
        named = json.loads(body)["name"]
        assert named in names, f"S3 latest.json names {named!r}, which is not a complete checkpoint on S3 ({names})"
    fired = rep.get("fired") or {}
    point, name = fired.get("point", ""), fired.get("name")
    if point in ("upload.before_object", "upload.mid_object", "upload.after_object", "upload.before_manifest"):
        if (f.prefix, name) not in c.s3_complete:
            assert name not in names, f"killed at {point} of {name}: its manifest was not uploaded, yet it is listed"
    if point == "upload.after_manifest":
        assert name in names, f"killed after the manifest of {name} was uploaded, yet it is not listed on S3"
    if point == "retention.s3_after_manifest":
        assert name not in names, f"killed after the S3 manifest of {name} was deleted, yet it is listed on S3"
    if point == "upload.after_latest":
        assert body is not None and json.loads(body)["name"] == name, f"killed after S3 latest.json named {name}, it names {body!r}"
    return names


def real_resume(c: Campaign, latest: str, tag: str) -> None:
    """A Trainer resumes from ``latest`` for 2 steps (in a forked child) and exits 0."""
    d = os.path.join(c.root, f"resume-{tag}")
    rep = c.server.call({"op": "resume", "path": latest, "dir": d, "steps": 2, "log": d + ".log", "timeout": TRIAL_TIMEOUT_S},
                        timeout=TRIAL_TIMEOUT_S + 60)
    if rep["outcome"] != "exit" or rep.get("rc") != 0:
        pytest.fail(f"resuming a Trainer from {latest} (after trial {tag}, LC_FAULT_SEED={c.seed}) failed "
                    f"({rep['outcome']}, rc={rep.get('rc')}); its log:\n{rep.get('log_tail')}", pytrace=False)
    shutil.rmtree(d, ignore_errors=True)
    c.resumes += 1


def newest_remote_has_packs(uri: str) -> bool:
    """Whether the newest complete checkpoint at ``uri`` references packs of the content store."""
    newest = remote_steps(uri)
    return bool(newest) and bool(read_checkpoint_manifest(f"{uri}/{newest[0][1]}").get("packs"))


def delete_local(c: Campaign, f: Folder, restore_here: bool) -> None:
    """The machine is gone: delete the run folder. Either ``resume_path`` (here) or the relaunched run (by itself)
    must restore the newest valid checkpoint on S3."""
    shutil.rmtree(f.dir)
    f.unreferenced, f.blobs_debris = set(), set()
    newest = remote_steps(f.uri)  # every one of them was pulled and verified by check_s3
    if not restore_here:
        f.last_step = newest[0][0] if newest else None
        f.remote_only = bool(newest)
        return
    got = resume_path(f.dir, f.uri)
    if not newest:
        assert got is None, f"nothing on S3, yet resume_path returned {got}"
        f.last_step = None
        return
    assert got is not None and os.path.basename(got) == newest[0][1], (
        f"resume_path restored {got}, the newest checkpoint on S3 is {newest[0][1]}"
    )
    verify_checkpoint(got)
    assert load_checkpoint(got)["global_step"] == newest[0][0]
    f.last_step = newest[0][0]
    c.restores += 1


# kill points (see tests/faults/kill_trials.py)
UNCOMMITTED_POINTS = {"write.mid_file", "write.after_file", "commit.before_manifest", "commit.mid_manifest", "commit.before_rename",
                      "gc.after_adopt"}
COMMITTED_POINTS = {"commit.after_rename", "commit.before_latest", "commit.mid_latest", "commit.after_latest"}
PHASES_OF_POINT: dict[str, str] = {}


def _literal(name: str):
    """A constant of the server script, read without importing it (it imports torch and Lightning)."""
    import ast

    with open(SERVER_SCRIPT) as fh:
        tree = ast.parse(fh.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not found in kill_trials.py")


KILL_POINTS = _literal("KILL_POINTS")
MODEL_KW = _literal("MODEL_KW")
PHASES_OF_POINT.update({p: ph for ph, pts in KILL_POINTS.items() for p in pts})


# ------------------------------------------------------------------------------------------------- schedule
def plan_kill(c: Campaign, phase: str, cycle: dict) -> dict:
    """A deliberate kill: the next point of ``phase`` (each point in turn, shuffled), at a random pass ``k``."""
    if not cycle.get(phase):
        pts = [p for p in KILL_POINTS[phase] if c.counts.get(p, 0) > 0]
        assert pts, f"no kill point of phase {phase} was passed during calibration: {c.counts}"
        c.rng.shuffle(pts)
        cycle[phase] = pts
    point = cycle[phase].pop()
    n = c.counts[point]
    # early in the run (where retention and uploads happen too); uploads and retention lag training, so stay low
    hi = max(1, int(n * (0.6 if phase in ("retention", "upload", "gc") else 0.5)))
    return {"point": point, "k": 1 + c.rng.randrange(hi)}


def run_trial(c: Campaign, f: Folder, n: int, plan: dict | None, random_kill: dict | None, shapes: dict,
              count: bool = False) -> dict:
    tdir = os.path.join(c.root, "trials")
    os.makedirs(tdir, exist_ok=True)
    leftovers = set()
    if os.path.isdir(f.dir):
        leftovers = {e for e in os.listdir(f.dir) if e.startswith((".partial-", ".trash-", ".tmp-"))}
    cmd = {"op": "trial", "trial": n, "dir": f.dir, "uri": f.uri, "budget": BUDGET, "seed": n, "plan": plan,
           "random_kill": random_kill, "marker": os.path.join(tdir, f"{n}.marker"), "log": os.path.join(tdir, f"{n}.log"),
           "gc_log": os.path.join(tdir, f"{n}.gc.jsonl"), "timeout": TRIAL_TIMEOUT_S}
    if count:
        cmd["counts_file"] = os.path.join(tdir, f"{n}.counts")
    rep = c.server.call(cmd, timeout=TRIAL_TIMEOUT_S + 60)
    t_check = time.monotonic()
    what = (f"plan={plan}" if plan else f"random kill {random_kill}" if random_kill else "no kill")
    context = (
        f"\n  seed: LC_FAULT_SEED={c.seed} (rerun with this environment variable to replay the schedule)"
        f"\n  trial {n} in {f.dir} (its trial #{f.trials} there; S3 {f.uri}): {what}"
        f"\n  outcome: {rep['outcome']} signal={rep.get('signal')} rc={rep.get('rc')} wall={rep.get('wall')}s"
        f"\n  kill point fired: {rep.get('fired')}"
        f"\n  child: started at step {rep.get('started_step')}, reached step {rep.get('progress')}, "
        f"last event {rep.get('last_event')!r} ({rep.get('events')} events)"
        f"\n  newest checkpoint before the trial: step {f.last_step}"
    )
    failure = None
    try:
        assert rep["outcome"] != "timeout", f"the child was stuck for {TRIAL_TIMEOUT_S:.0f}s and was killed"
        if rep["outcome"] == "exit":
            assert rep.get("rc") == 0, f"the child failed with exit code {rep.get('rc')}"
        else:
            assert rep.get("signal") == signal.SIGKILL, f"the child died of signal {rep.get('signal')}"
        if plan is not None and rep.get("fired"):
            assert rep["fired"]["point"] == plan["point"]
        gc_log = read_gc_log(cmd["gc_log"])
        latest = check_local(c, f, rep, leftovers, shapes, gc_log)
        s3_names = check_s3(c, f, rep)
        assert not c.server.children(), f"a child of the fork server survived: {c.server.children()}"
    except Exception as e:  # noqa: BLE001 - an assertion, or a corrupt checkpoint found by verify/load/pull
        e = e if isinstance(e, AssertionError) else f"{type(e).__name__}: {e}"
        s3_now = ""
        try:
            s3_now = str(list_remote(f.uri))
        except Exception as err:  # noqa: BLE001
            s3_now = repr(err)
        log = rep.get("log_tail") or tail(cmd["log"], missing="(no log)")
        failure = (
            f"fault-injection trial {n} failed: {e}{context}"
            f"\n  folder listing:\n    {_listing(f.dir)}"
            f"\n  complete checkpoints on S3: {s3_now}"
            f"\n  child log (tail):\n{log}"
        )
    if failure is not None:
        pytest.fail(failure, pytrace=False)
    newest = os.path.basename(latest) if latest else None
    if latest is not None:
        f.last_step = _step_of(newest)
        if f.remote_only:
            c.child_restores += 1
        f.remote_only = False
    f.trials += 1
    for rec in gc_log:
        c.collections[rec["where"]] += 1
        c.packs_removed[rec["where"]] += len(rec["removed"])
    if rep["outcome"] == "killed":
        c.killed += 1
    else:
        c.completed += 1
    fired = rep.get("fired")
    if fired:
        c.fired[fired["phase"]] += 1
        c.fired_points[fired["point"]] += 1
    if random_kill is not None and rep.get("killed_by_server"):
        c.random_kills += 1
        ev = (rep.get("last_event") or "").split(" ", 1)[0]
        c.random_events[PHASES_OF_POINT.get(ev, ev.split("@", 1)[0] or "setup")] += 1
    c.log.append(f"trial {n:3d} {os.path.basename(f.dir):9s} {what[:70]:70s} -> {rep['outcome']:6s} "
                 f"fired={fired['point'] if fired else '-':24s} last_event={rep.get('last_event')!r} "
                 f"steps {rep.get('started_step')}->{rep.get('progress')} newest={newest} s3={len(s3_names)} "
                 f"{rep.get('wall')}s (setup {rep.get('train_start_s')}s) + checks {time.monotonic() - t_check:.2f}s")
    rep["latest"] = latest
    return rep


# ------------------------------------------------------------------------------------------------- the test
def test_kill9_during_write_commit_retention_upload(fork_server, s3, tmp_path):
    print(f"\nLC_FAULT_SEED={SEED}")
    t_start = time.monotonic()
    fork_server.call({"op": "env", "env": s3.env()}, timeout=180)
    c = Campaign(SEED, str(tmp_path), s3, fork_server)
    shapes = _expected_model_shapes()
    loop = Folder(str(tmp_path / "loop"), "loop")
    fresh_n = 0
    try:
        # calibration: two uninterrupted runs (a fresh start and a relaunch over existing checkpoints) count how often
        # each kill point is passed per run and how long a run takes
        cal = Folder(str(tmp_path / "cal"), "cal")
        first = run_trial(c, cal, 0, None, None, shapes, count=True)
        rep = run_trial(c, cal, 1, None, None, shapes, count=True)
        # a point counts as passed when either run passed it (trials are fresh starts and relaunches alike): how much
        # a run's own retention and collection find to delete depends on how far its uploads got, i.e. on timing
        c.counts = {p: max(first["counts"].get(p, 0), rep["counts"].get(p, 0))
                    for p in set(first["counts"]) | set(rep["counts"])}
        print(f"kill point passes in the fresh and the relaunched run of {BUDGET} steps each: {c.counts}")
        never = [p for ph in PHASES for p in KILL_POINTS[ph] if not c.counts.get(p)]
        assert not never, (
            f"the uninterrupted run never passed the kill points {never}: the package no longer goes through the "
            "functions tests/faults/kill_trials.py wraps (install_kill_points); update them"
        )
        c.t_setup = max(0.05, rep.get("train_start_s") or 0.3)
        c.t_train = max(0.2, rep["wall"] - c.t_setup)
        assert cal.last_step == 2 * BUDGET, f"the uninterrupted runs ended at step {cal.last_step}"
        real_resume(c, latest_checkpoint(cal.dir), "cal")

        # the schedule: deliberate kills round-robin over the phases (until each has KILLS_PER_PHASE that fired),
        # a random kill after every fourth one; mostly one crash-looping folder, sometimes a fresh folder
        cycle: dict = {}
        restore_kill_due = False  # after the folder was deleted: kill the relaunch while it pulls from S3
        n = 2
        phase_i = 0
        deliberate_since_random = 0
        def restore_missing() -> list[str]:
            return [p for p in KILL_POINTS["restore"] if not c.fired_points.get(p)]

        while True:
            need = [ph for ph in PHASES if c.fired[ph] < KILLS_PER_PHASE[ph]]
            if (not need and c.random_kills >= RANDOM_KILLS and c.killed >= MIN_TRIALS
                    and not restore_missing()) or n >= MAX_TRIALS:
                break
            if n % FRESH_EVERY == 0:
                fresh_n += 1
                f = Folder(str(tmp_path / f"fresh{fresh_n}"), f"fresh{fresh_n}")
            else:
                f = loop
            plan = random_kill = None
            if f is loop and restore_kill_due:
                restore_kill_due = False
                point = restore_missing()[0]
                plan = {"point": point, "k": 1 + c.rng.randrange(3) if point == "restore.after_download" else 1}
            elif (deliberate_since_random >= 4 or not need) and c.random_kills < RANDOM_KILLS + 10:
                deliberate_since_random = 0
                if c.rng.random() < 0.2:  # during start-up: resume, S3 pull, clean-up of leftovers
                    random_kill = {"after": "fork", "delay": round(c.rng.uniform(0, c.t_setup * 1.2), 3)}
                else:
                    random_kill = {"after": "train", "delay": round(c.rng.uniform(0, c.t_train * 0.9), 3)}
            else:
                deliberate_since_random += 1
                phase = need[phase_i % len(need)] if need else PHASES[phase_i % len(PHASES)]
                phase_i += 1
                plan = plan_kill(c, phase, cycle)
            rep = run_trial(c, f, n, plan, random_kill, shapes)
            if n % RESUME_EVERY == 0 and rep["latest"] is not None:
                real_resume(c, rep["latest"], str(n))
            regular = loop.trials % DELETE_LOCAL_EVERY == 0
            # the quota is met but a restore kill point has not fired yet: delete the folder again sooner
            overdue = not need and restore_missing() and loop.trials % 3 == 0
            if f is loop and (regular or overdue):
                here = regular and (loop.trials // DELETE_LOCAL_EVERY) % 2 == 1
                missing = restore_missing()
                # a pack copy can only be killed when the checkpoint the relaunch pulls references packs (every
                # fourth save has its frozen layers in its own files: see BackboneRefresh)
                restore_kill_due = not here and bool(missing) and (
                    missing[0] != "restore.mid_pack_copy" or newest_remote_has_packs(loop.uri))
                failure = None
                try:
                    delete_local(c, loop, restore_here=here)
                except AssertionError as e:
                    failure = (f"after trial {n} (LC_FAULT_SEED={SEED}), restoring the deleted folder from S3: {e}"
                               f"\n  complete on S3: {list_remote(loop.uri)}")
                if failure is not None:
                    pytest.fail(failure, pytrace=False)
            n += 1

        # the end: the crash-looping job finally runs to completion from where it is, and a Trainer resumes from it
        rep = run_trial(c, loop, n, None, None, shapes)
        assert rep["outcome"] == "exit" and loop.last_step is not None
        real_resume(c, rep["latest"], "final")
    finally:
        print("\n".join(c.log))
        print(f"deliberate kills per phase: {dict(c.fired)}; per point: {dict(sorted(c.fired_points.items()))}")
        print(f"random kills: {c.random_kills} (last event before them, by phase: {dict(c.random_events)})")
        orphans = {p: v for p, v in c.s3_orphans.items() if v}
        print(f"S3 objects left behind by interrupted uploads/deletions (no manifest, never listed): {orphans}")
        print(f"collections completed: {dict(c.collections)}, packs they removed: {dict(c.packs_removed)}; packs a "
              f"crash left unreferenced, collected by the relaunch: {c.crash_packs_collected}; gc.mid_sweep kills that "
              f"left unreferenced packs behind: {c.sweeps_left_packs}; temp files a crash left in .blobs, removed by "
              f"the relaunch: {c.crash_debris_collected}")
        print(f"trials: {len(c.log)}, killed {c.killed}, completed {c.completed}; Trainer resumes {c.resumes}; "
              f"restores from S3: by resume_path {c.restores}, by the relaunched run {c.child_restores}; {time.monotonic() - t_start:.1f}s")

    for ph in PHASES:
        assert c.fired[ph] >= MIN_PER_PHASE[ph], f"only {c.fired[ph]} deliberate kills fired in phase {ph!r} (seed {SEED})"
    # the content store was exercised: packs collected locally and on S3, some of them left behind by a crash
    assert c.packs_removed["local"] >= 10 and c.packs_removed["s3"] >= 5, dict(c.packs_removed)
    assert c.crash_packs_collected >= 1, "no pack left unreferenced by a crash was seen collected by the relaunch"
    assert c.killed >= MIN_TRIALS, f"only {c.killed} trials ended in kill -9 (seed {SEED})"
    assert c.random_kills >= RANDOM_KILLS // 2, f"only {c.random_kills} random kills landed (seed {SEED})"
    assert c.fired["restore"] >= 1, "no relaunch was killed while it restored the deleted folder from S3"
    assert c.fired_points["restore.mid_pack_copy"] >= 1, "no relaunch was killed while it copied a pack it restored"
    assert c.restores >= 1 and c.child_restores >= 1 and c.resumes >= 5
    assert not fork_server.children()
