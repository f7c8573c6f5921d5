"""Functional checks that need GPUs (run by gpu.sh before the benchmark; about a minute).

Lightning's ``FSDPStrategy(state_dict_type="sharded")`` (FSDP1: torch refuses it without a GPU) and
``ModelParallelStrategy`` (FSDP2) with ``PeriodicCheckpoint``, on as many GPUs as there are (up to 2):
save 4 steps, resume from step 4 to step 6, and check that the parameters as restored equal the trained ones
bit for bit, and that the optimizer's step count came along. Prints one PASS/FAIL line per strategy; exits 1 on
a failure.

    python benchmarks/gpu_checks.py [--dir /tmp/lc_gpu_checks]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "distributed", "model_parallel_script.py")


def run(n: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", SCRIPT,
           "--accelerator", "gpu", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def check(strategy: str, n: int, base: str) -> bool:
    import torch
    from safetensors.torch import load_file

    d = os.path.join(base, strategy)
    shutil.rmtree(d, ignore_errors=True)
    first = run(n, "--strategy", strategy, "--dir", os.path.join(d, "ckpts"), "--max-steps", "4", "--every", "2",
                "--out", os.path.join(d, "a.safetensors"))
    if first.returncode != 0:
        print(f"FAIL {strategy} x{n}: training and saving failed\n{first.stderr[-3000:]}")
        return False
    second = run(n, "--strategy", strategy, "--dir", os.path.join(d, "again"), "--max-steps", "6", "--every", "2",
                 "--resume", os.path.join(d, "ckpts", "step=000004"), "--out", os.path.join(d, "b.safetensors"))
    if second.returncode != 0:
        print(f"FAIL {strategy} x{n}: resuming failed\n{second.stderr[-3000:]}")
        return False
    trained = load_file(os.path.join(d, "a.safetensors"))
    restored = load_file(os.path.join(d, "b.safetensors.restored"))
    info = json.load(open(os.path.join(d, "b.safetensors.json")))
    bad = [k for k in trained if k not in restored or not torch.equal(trained[k], restored[k])]
    if bad or info["global_step"] != 6 or info["opt_steps"] != [6]:
        print(f"FAIL {strategy} x{n}: restored differs in {bad[:5]}; step {info['global_step']}, "
              f"optimizer steps {info['opt_steps']}")
        return False
    print(f"PASS {strategy} x{n}: saved, resumed bit-exact at step 4, optimizer steps {info['opt_steps']}")
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/lc_gpu_checks")
    a = ap.parse_args()
    import torch

    n = min(2, torch.cuda.device_count())
    if n == 0:
        print("FAIL: no GPU")
        sys.exit(1)
    ok = all([check(s, n, a.dir) for s in ("fsdp", "model_parallel")])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
