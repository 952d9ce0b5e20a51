#!/usr/bin/env bash
# Every GPU check of the CUDA kernel in one command, for a session lent a GPU machine: build and
# install reco there, the CUDA tests, the op tests on CUDA, compute-sanitizer, the benchmark.
# Logs and JSON go to ${OUT:-.}; each step runs even if an earlier one failed; the exit status
# is that of the last failure.
set -uo pipefail
OUT=$(realpath "${OUT:-.}")
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 RECO_CUDA_KERNEL=1
status=0
step() { echo "== $*"; "$@" || { status=$?; echo "== failed ($status): $*"; }; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
step bash -c "python3 -m pip install --no-build-isolation --no-deps -v . > '$OUT/build.log' 2>&1"
grep -E "ptxas|spill" "$OUT/build.log" | head -5
step bash -c "cd /tmp && python3 -c 'import reco._C as c; assert c.with_cuda; print(c.cuda_plan(64, 10**6, 16, 0))'"
step bash -c "python3 -m pytest -q -x tests/test_cuda.py 2>&1 | tee '$OUT/test_cuda.log'"
step bash benchmarks/cuda_sanitize.sh
step bash -c "python3 benchmarks/bench_retrieve.py --device cuda --dtypes float16 bfloat16 \
    --batch 1,16,64,256,1024 --repeats 5 --json '$OUT/bench_retrieve_cuda.json' \
    2>&1 | tee '$OUT/bench_retrieve_cuda.txt'"
exit $status
