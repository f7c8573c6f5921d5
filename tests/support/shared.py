"""2-rank torchrun runs that share one launch.

A test module declares a run at module level::

    ddp2 = two_ranks("ddp2", SCRIPT, lambda d: ["--dir", f"{d}/ckpts", ...])

which is a pytest fixture named ``ddp2``: its value is the run's own folder ``d`` (a ``pathlib.Path``), once the run
succeeded on both ranks (else the test fails with the run's output, as a failed ``torchrun`` would). The first test
that needs any of these runs starts one torchrun launch (``tests/support/_shared_launch.py``) that runs every
declared run the session's selected tests need, one after the other, in the same two ranks. ``prepare(d)`` runs
here, before the launch (say, to write a checkpoint the run resumes from); ``cwd=True`` runs the script in ``d``.

Only runs that need nothing but a healthy 2-rank world belong here: a run in which a rank dies or hangs, another
world size, a relaunch or two simulated nodes keeps its own launch (``support.torchrun``).
"""
from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass
from typing import Callable, Sequence

import pytest

from .launch import torchrun

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_shared_launch.py")


@dataclass
class Run:
    name: str
    script: str
    args: Callable[[pathlib.Path], Sequence[str]]
    prepare: Callable[[pathlib.Path], None] | None = None
    cwd: bool = False
    env: dict | None = None


REGISTRY: dict[str, Run] = {}


def two_ranks(name: str, script: str, args: Callable[[pathlib.Path], Sequence[str]], *,
              prepare: Callable[[pathlib.Path], None] | None = None, cwd: bool = False, env: dict | None = None):
    """Declares a run of ``script`` under a shared 2-rank launch; returns the fixture to bind to ``name``."""
    if name in REGISTRY:
        raise AssertionError(f"two shared 2-rank runs are named {name!r}")
    REGISTRY[name] = Run(name, script, args, prepare, cwd, env)

    @pytest.fixture(scope="session", name=name)
    def fixture(shared_launch):
        return shared_launch.result(name)

    return fixture


class SharedLaunch:
    """The session's shared launch: started by the first :meth:`result`, for every declared run in ``needed``."""

    def __init__(self, base: pathlib.Path, needed: Sequence[str]) -> None:
        self.base = base
        self.needed = [n for n in REGISTRY if n in set(needed)]  # in declaration (collection) order
        self.launched = False
        self.output = ""

    def launch(self) -> None:
        self.launched = True
        logs = self.base / ".logs"
        logs.mkdir(parents=True, exist_ok=True)
        plan = []
        for name in self.needed:
            run = REGISTRY[name]
            d = self.base / name
            d.mkdir(parents=True, exist_ok=True)
            if run.prepare is not None:
                run.prepare(d)
            plan.append({"name": name, "script": run.script, "argv": [str(a) for a in run.args(d)],
                         "cwd": str(d if run.cwd else self.base), "env": run.env or {}, "log_dir": str(logs)})
        with open(self.base / "plan.json", "w") as f:
            json.dump(plan, f, indent=1)
        p = torchrun(2, RUNNER, str(self.base / "plan.json"), ok=False, timeout=120 + 60 * len(plan))
        self.output = (p.stdout or "")[-3000:] + (p.stderr or "")[-5000:]

    def result(self, name: str) -> pathlib.Path:
        if name not in self.needed:  # a test the collection did not see (say, requested dynamically)
            self.needed.append(name)
            if self.launched:
                raise AssertionError(f"the shared 2-rank launch already ran; {name!r} was not in it")
        if not self.launched:
            self.launch()
        logs = self.base / ".logs"
        statuses, text = [], []
        for rank in (0, 1):
            status = logs / f"{name}.rank{rank}.status"
            statuses.append(int(status.read_text()) if status.exists() else None)
            log = logs / f"{name}.rank{rank}.log"
            if log.exists():
                text.append(f"--- rank {rank}:\n" + log.read_text(errors="replace")[-4000:])
        if statuses != [0, 0]:
            if statuses == [None, None]:
                raise AssertionError(f"{name} did not run: an earlier run of the shared 2-rank launch failed "
                                     f"(see its test); the launch's output:\n{self.output}")
            raise AssertionError(f"{name} failed under torchrun (exit status by rank: {statuses}):\n" + "\n".join(text)
                                 + f"\n--- torchrun:\n{self.output}")
        return self.base / name


def output(d: pathlib.Path, rank: int) -> str:
    """What rank ``rank`` of the run whose folder is ``d`` printed (stdout and stderr)."""
    return (d.parent / ".logs" / f"{d.name}.rank{rank}.log").read_text(errors="replace")
