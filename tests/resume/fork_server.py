"""Fork server for the resume cells that die by SIGKILL (``test_kill.py``): imports torch, Lightning, transformers and
the cells once, then answers one JSON command per stdin line with one JSON line on stdout:

``{"cell": "<module>:<cell name>", "phase": "ref" | "cut" | "resume", "dir": D, "out": F, "kill_at": S}``
    fork a child that runs the phase of the cell (``cut``: SIGKILL itself at the start of step S, once the saves so
    far are committed; ``resume``: resume from the newest checkpoint in D, with another seed) and writes what
    ``resume_cells.Run`` holds to F (``torch.save``). The reply: ``{"exit": code}`` or ``{"signal": number}``.

Every run of a cell goes through here, the straight one included, so all of them compute with the same threads
(one: a forked child must not inherit an OpenMP pool).
"""
from __future__ import annotations

import json
import os
import sys

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import importlib  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(1)

import model_cells  # noqa: E402,F401
import resume_cells  # noqa: E402
from lightning_ckpt import latest_checkpoint  # noqa: E402
from transformers import GPT2LMHeadModel, ResNetForImageClassification  # noqa: E402,F401  (once, not per child)


def find(spec: str) -> resume_cells.Cell:
    module, name = spec.split(":", 1)
    m = importlib.import_module(module)
    return next(c for c in [*m.CELLS, *getattr(m, "KILL_CELLS", [])] if c.name == name)


def child(cmd: dict) -> None:
    cell = find(cmd["cell"])
    phase, d = cmd["phase"], cmd["dir"]
    if phase == "cut":
        run = resume_cells.fit(cell, d, "cut", extra_callbacks=[resume_cells.CrashAt(cmd["kill_at"], kill=True)])
    elif phase == "resume":
        ckpt = latest_checkpoint(d)
        run = resume_cells.fit(cell, d, "resume", ckpt_path=ckpt, seed=resume_cells.SEED + 1000)
    else:
        run = resume_cells.fit(cell, d, "ref")
    run.model = None
    torch.save(run.__dict__, cmd["out"])


def main() -> None:
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd.get("op") == "quit":
            return
        pid = os.fork()
        if pid == 0:
            os.dup2(2, 1)  # the protocol owns stdout
            code = 0
            try:
                child(cmd)
            except BaseException as e:  # noqa: BLE001 - reported through the exit status and stderr
                print(f"fork_server child failed: {e!r}", file=sys.stderr, flush=True)
                import traceback

                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        reply = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"exit": os.WEXITSTATUS(status)}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
