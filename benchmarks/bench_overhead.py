"""Benchmark the fixed cost of one call: the public function, the registered torch op, and the
compiled core called directly with preallocated outputs, on a problem small enough that the
kernel's own work is negligible (and one where it is not, for scale).

    python benchmarks/bench_overhead.py

Prints a table and writes JSON. Times are means over many calls after a warm-up, in microseconds.
"""

from __future__ import annotations

import argparse
import time

import torch

import reco
from reco import ops

try:
    from . import common  # python -m benchmarks.bench_overhead
except ImportError:  # python benchmarks/bench_overhead.py
    import common

TABLE = common.Table(
    [
        ("N", 7),
        ("d", 4),
        ("k", 3),
        ("public us", 9, ".1f"),
        ("torch.ops us", 12, ".1f"),
        ("_C us", 7, ".1f"),
    ]
)


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
                q, keys, values, None, None, None, k, 1.0, out, w, idx, sc, threads
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
    print(TABLE.header())
    for n, d, k in ((1000, 64, 4), (100_000, 128, 16)):
        calls = args.calls if n <= 1000 else max(20, args.calls // 100)
        r = measure(n, d, k, calls)
        rows.append(r)
        print(TABLE.row(n, d, k, r["public_us"], r["torch_ops_us"], r["c_direct_us"]))
    common.write_json(args.json, {"machine": common.machine_info(), "results": rows})


if __name__ == "__main__":
    main()
