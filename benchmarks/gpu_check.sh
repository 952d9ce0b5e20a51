#!/usr/bin/env bash
# Every GPU check of the CUDA kernels, for a session lent a GPU machine, in two stages that each
# fit one device command (10 minutes):
#   gpu_check.sh check   build and install reco there (ptxas report in build.log), the CUDA tests,
#                        compute-sanitizer
#   gpu_check.sh bench   (re)install, then bench_retrieve on CUDA: the default shapes (N = 1e6)
#                        and the large ones (N = 1e7), beside torch naive, the floor and faiss;
#                        bench_int8 (recall and speed of the int8 variant)
#   gpu_check.sh profile Nsight Compute on the search kernels (B = 1 and 1024, N = 1e6)
# Logs and JSON go to ${OUT:-.}; each step runs even if an earlier one failed; the exit status
# is that of the last failure.
set -uo pipefail
OUT=$(realpath "${OUT:-.}")
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 RECO_CUDA_KERNEL=1
stage=${1:-check}
status=0
step() { echo "== $*"; "$@" || { status=$?; echo "== failed ($status): $*"; }; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
step bash -c "python3 -m pip install --no-build-isolation --no-deps -v . > '$OUT/build.log' 2>&1"
grep -E "ptxas|spill" "$OUT/build.log" | grep -v " 0 bytes spill stores, 0 bytes spill loads" |
    grep -E "spill" | head -5
step bash -c "cd /tmp && python3 -c 'import reco._C as c; assert c.with_cuda; \
print(c.cuda_plan(1024, 10**6, 512, 16, True, 0), c.cuda_plan(1, 10**6, 512, 16, False, 0))'"
case $stage in
check)
    step bash -c "python3 -m pytest -q -x -rs tests/test_cuda.py 2>&1 | tee '$OUT/test_cuda.log'"
    step bash benchmarks/cuda_sanitize.sh
    ;;
bench)
    for shapes in default large; do
        batch=$([ $shapes = default ] && echo "--batch 1,16,64,256,1024")
        step bash -c "python3 benchmarks/bench_retrieve.py --device cuda --shapes $shapes $batch \
            --dtypes float16 bfloat16 --repeats 5 --json '$OUT/bench_retrieve_cuda_$shapes.json' \
            2>&1 | tee '$OUT/bench_retrieve_cuda_$shapes.txt'"
    done
    # The CPU table's random case first: its recall must equal RESULTS.md's (same coarse scores).
    step bash -c "python3 benchmarks/bench_int8.py --device cuda --data random --n 1000000 \
        --d 512 --batch 256 --json '$OUT/bench_int8_cuda_check.json' 2>&1 | tee '$OUT/bench_int8_cuda_check.txt'"
    step bash -c "python3 benchmarks/bench_int8.py --device cuda --data random --n 10000000 \
        --d 512 --batch 1,16,256,1024 --json '$OUT/bench_int8_cuda.json' \
        2>&1 | tee '$OUT/bench_int8_cuda.txt'"
    ;;
profile)
    # One launch of each search kernel under Nsight Compute: tensor and memory throughput
    # against the GPU's peaks (is it tensor-bound at B = 1024, bandwidth-bound at B = 1?).
    PROFILE='
import torch, reco
keys = torch.nn.functional.normalize(torch.randn(1_000_000, 512, device="cuda"), dim=1).half()
values = torch.randn(1_000_000, 512, device="cuda").half()
codes, scales = reco.quantize_keys(keys)
for B in (1, 1024):
    q = torch.nn.functional.normalize(torch.randn(B, 512, device="cuda"), dim=1)
    for query in (q.half(), q):
        reco.fused_retrieve_attend(query, keys, values, 16)
    reco.fused_retrieve_attend_int8(q, codes, scales, keys, values, 16)
torch.cuda.synchronize()
'
    step bash -c "cd /tmp && ncu --kernel-name regex:search --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
        python3 -c '$PROFILE' > '$OUT/ncu_search.txt' 2>&1; tail -60 '$OUT/ncu_search.txt'"
    ;;
*) echo "usage: gpu_check.sh check|bench|profile" >&2; exit 2 ;;
esac
exit $status
