#!/usr/bin/env bash
# compute-sanitizer memcheck, racecheck and synccheck of the CUDA kernels on small cases: the
# tensor-core search (a 16-bit query of the keys' dtype; float32 queries split into terms), the
# int8 search, the CUDA-core search (few float32 queries, odd d, large k), with heads and exclude
# lists. Needs a GPU and compute-sanitizer on PATH. Logs go to ${OUT:-.}/sanitize-*.log; exits
# non-zero on any error.
set -euo pipefail
OUT=$(realpath "${OUT:-.}")
cd "$(mktemp -d)"  # not the checkout: its reco/ (without the compiled core) would shadow the install
export RECO_CUDA_KERNEL=1
CASES='
import torch, reco
cases = [  # B, N, d, dv, k, keys dtype, query in the keys dtype
    (1, 700, 33, 7, 5, torch.float16, False),
    (9, 3000, 64, 16, 40, torch.bfloat16, False),
    (20, 2500, 17, 5, 300, torch.float32, False),
    (3, 900, 40, 8, 7, torch.float16, True),
    (70, 1300, 96, 16, 64, torch.bfloat16, True),
    (20, 1700, 64, 8, 16, torch.float16, False),
    (12, 900, 48, 8, 10, torch.bfloat16, False),
]
for B, N, d, dv, k, dt, same in cases:
    q = torch.randn(B, d, device="cuda")
    q = q.to(dt) if same else q
    keys = torch.randn(N, d, device="cuda").to(dt)
    values = torch.randn(N, dv, device="cuda").to(dt)
    ex = torch.randint(-1, N, (B, 6), device="cuda")
    aq = torch.randn(B, 3, dv, device="cuda")
    reco.fused_retrieve_attend(q, keys, values, k, attn_query=aq, exclude=ex)
    reco.fused_retrieve_attend(q, keys, values, k)
    if d % 16 == 0:  # the int8 search (d a multiple of 16)
        codes, scales = reco.quantize_keys(keys)
        reco.fused_retrieve_attend_int8(q, codes, scales, keys, values, min(k, 16),
                                        attn_query=aq, exclude=ex)
torch.cuda.synchronize()
print("ok")
'
for tool in memcheck racecheck synccheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 1 python -c "$CASES" \
        > "$OUT/sanitize-$tool.log" 2>&1 || { tail -40 "$OUT/sanitize-$tool.log"; exit 1; }
    tail -2 "$OUT/sanitize-$tool.log"
done
