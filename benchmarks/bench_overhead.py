"""Benchmark the fixed cost of one call: the public function, the registered torch op, and the
compiled core called directly with preallocated outputs, on a problem small enough that the
kernel's own work is negligible (and one where it is not, for scale).

    python benchmarks/bench_overhead.py

Prints a table and writes JSON. Times are means over many calls after a warm-up, in microseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import reco
from reco import ops


def per_call_us(fn, calls: int) -> float:
    for _ in range(max(10, calls // 20)):
        fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def measure(n: int, d: int, k: int, calls: int) -> dict:
    """Per-call times of the three entry points on one problem (B = 1)."""
    g = torch.Generator().manual_seed(0)
    q, keys, values = (torch.randn(s, generator=g) for s in ((1, d), (n, d), (n, d)))
    out, w = torch.empty(1, 1, d), torch.empty(1, 1, k)
    idx, sc = torch.empty(1, k, dtype=torch.int64), torch.empty(1, k)
    threads = torch.get_num_threads()
    return {
        "N": n,
        "d": d,
        "k": k,
        "public_us": per_call_us(lambda: reco.fused_retrieve_attend(q, keys, values, k), calls),
        "torch_ops_us": per_call_us(
            lambda: torch.ops.reco.fused_retrieve_attend(q, keys, values, k, None, 1.0, None),
            calls,
        ),
        "c_direct_us": per_call_us(
            lambda: ops._C.retrieve_attend(
                q, keys, values, None, None, k, 1.0, out, w, idx, sc, threads
            ),
            calls,
        ),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--json", default="benchmarks/results/bench_overhead.json")
    args = p.parse_args()
    if ops._C is None:
        raise SystemExit("reco._C is not built")
    rows = []
    print(
        f"{'N':>7} | {'d':>4} | {'k':>3} | {'public us':>9} | {'torch.ops us':>12} | {'_C us':>7}"
    )
    for n, d, k in ((1000, 64, 4), (100_000, 128, 16)):
        calls = args.calls if n <= 1000 else max(20, args.calls // 100)
        r = measure(n, d, k, calls)
        rows.append(r)
        print(
            f"{n:7d} | {d:4d} | {k:3d} | {r['public_us']:9.1f} | {r['torch_ops_us']:12.1f} | "
            f"{r['c_direct_us']:7.1f}"
        )
    out_path = Path(args.json)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(
        json.dumps(
            {
                "machine": {
                    "platform": platform.platform(),
                    "cores": os.cpu_count(),
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                },
                "results": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
