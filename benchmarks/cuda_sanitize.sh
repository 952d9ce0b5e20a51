#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck of the CUDA kernel on small cases (needs a GPU and
# compute-sanitizer on PATH). Logs go to ${OUT:-.}/sanitize-*.log; exits non-zero on any error.
set -euo pipefail
OUT=$(realpath "${OUT:-.}")
cd "$(mktemp -d)"  # not the checkout: its reco/ (without the compiled core) would shadow the install
export RECO_CUDA_KERNEL=1
CASES='
import torch, reco
for B, N, d, dv, k, dt in [(1, 700, 33, 7, 5, torch.float16), (9, 3000, 64, 16, 40, torch.bfloat16),
                           (20, 2500, 17, 5, 300, torch.float32)]:
    q = torch.randn(B, d, device="cuda")
    keys = torch.randn(N, d, device="cuda").to(dt)
    values = torch.randn(N, dv, device="cuda").to(dt)
    ex = torch.randint(-1, N, (B, 6), device="cuda")
    aq = torch.randn(B, 3, dv, device="cuda")
    reco.fused_retrieve_attend(q, keys, values, k, attn_query=aq, exclude=ex)
    reco.fused_retrieve_attend(q, keys, values, k)
torch.cuda.synchronize()
print("ok")
'
for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 1 python -c "$CASES" \
        > "$OUT/sanitize-$tool.log" 2>&1 || { tail -40 "$OUT/sanitize-$tool.log"; exit 1; }
    tail -2 "$OUT/sanitize-$tool.log"
done
