#!/usr/bin/env python
"""How long the command line takes: ``lightning-ckpt --help``, ``ls``, ``show``, ``verify`` and ``diff`` on a small run
folder, each a fresh process (imports included), best and median of ``--repeats``. Also whether the verb imported
Lightning (it must not: the targets are under 1 s for ``--help`` and under 2 s for ``ls``/``verify`` on the 2-core CI
machine).

    python benchmarks/bench_cli.py [--repeats 5] [--json benchmarks/results/cli-cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {"--help": 1.0, "ls": 2.0, "verify": 2.0}
PROBE = ("import sys, runpy; sys.argv = ['lightning-ckpt'] + sys.argv[1:]\n"
         "try:\n    runpy.run_module('lightning_ckpt.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
         "finally:\n    print('LIGHTNING_IMPORTED=%d' % ('lightning' in sys.modules or 'lightning.pytorch' in sys.modules),"
         " file=sys.stderr)\n")


def make_run(d: str) -> list[str]:
    import torch

    sys.path.insert(0, ROOT)
    from lightning_ckpt import CheckpointWriter, list_checkpoints

    w = CheckpointWriter(d, async_save=False)
    g = torch.Generator().manual_seed(0)
    for step in (1, 2, 3):
        w.save({"state_dict": {f"layer{i}.weight": torch.randn(256, 256, generator=g) for i in range(8)},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": []}]}]}, step=step,
               metrics={"val_loss": 1.0 / step})
    w.close()
    return [c.path for c in list_checkpoints(d)]


def time_verb(args: list[str], repeats: int) -> dict:
    times, imported = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=ROOT)
        times.append(time.perf_counter() - t0)
        imported = "LIGHTNING_IMPORTED=1" in p.stderr
        if p.returncode not in (0,):
            raise SystemExit(f"{args} failed ({p.returncode}): {p.stderr[-2000:]}")
    return {"best_s": min(times), "median_s": statistics.median(times), "all_s": times, "imports_lightning": imported}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    d = tempfile.mkdtemp(prefix="lc-bench-cli-")
    try:
        paths = make_run(d)
        verbs = {"--help": ["--help"], "ls": ["ls", d], "show": ["show", paths[-1]], "verify": ["verify", paths[-1]],
                 "diff": ["diff", paths[0], paths[-1]], "lineage": ["lineage", d]}
        results = {}
        for name, args in verbs.items():
            r = time_verb(args, a.repeats)
            results[name] = r
            goal = TARGETS.get(name)
            goal_txt = f"  target < {goal:.0f} s: {'met' if r['median_s'] < goal else 'NOT met'}" if goal else ""
            print(f"lightning-ckpt {name:8s} best {r['best_s']:.2f} s, median {r['median_s']:.2f} s, "
                  f"imports Lightning: {'yes' if r['imports_lightning'] else 'no'}{goal_txt}", flush=True)
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = None
        out = {"verbs": results, "targets_s": TARGETS, "cores": os.cpu_count(), "load_avg_1min": load,
               "python": sys.version.split()[0], "when": time.strftime("%Y-%m-%d %H:%M")}
        if a.json:
            os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)
            print(f"wrote {a.json}")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
