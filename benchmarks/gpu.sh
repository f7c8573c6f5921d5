#!/usr/bin/env bash
# One script, under 5 minutes on one H100/H200: training time lost per checkpoint for a ~6.4 GB model + Adam state
# (Lightning ModelCheckpoint, Lightning + AsyncCheckpointIO, DCP async_save with pinned staging, lightning_ckpt
# async), the pinned device-to-host floor, GPU memory during saves, host memory over 10 saves, restore onto the GPU.
#   bash benchmarks/gpu.sh [extra args for bench_gpu.py]
# Needs: torch with CUDA, lightning, safetensors, crc32c (install wheels in .whl/ first if present).
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import crc32c" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/lc_site .whl/*.whl
  export PYTHONPATH="/tmp/lc_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
df -h /tmp | tail -1
python3 benchmarks/gpu_checks.py || echo "gpu_checks failed (see above); the benchmark runs anyway"
python3 benchmarks/bench_gpu.py --dir "${LC_BENCH_DIR:-/tmp/lc_bench}" --json "$out/gpu_bench.json" "$@"
# the 2-rank sharded vs rank-0 save and the merge, on this machine's cores, on its disk and on tmpfs
python3 benchmarks/bench_distributed.py --gb 1 --dir "${LC_BENCH_DIR:-/tmp/lc_bench}-dist" --json "$out/dist_disk.json"
python3 benchmarks/bench_distributed.py --gb 1 --dir /dev/shm/lc_dist --repeats 5 --json "$out/dist_shm.json"
rm -rf /dev/shm/lc_dist "${LC_BENCH_DIR:-/tmp/lc_bench}-dist"
