"""Recall and speed of reco.fused_retrieve_attend_int8 (coarse int8 search, exact re-rank).

For each number of candidates, recall@k is |int8 top-k & exact top-k| / k, averaged over queries,
against reco.fused_retrieve_attend on the same keys; "top-1" is how often the exact best row
comes first. Recall depends only on the data and the algorithm, not on the device: the coarse
scores are computed bit for bit alike by the CPU kernel, the reference and the CUDA kernel. The
int8 op is also timed beside the exact op and beside one pass reading the int8 codes (its
memory-bound floor), medians of --repeats runs in one process.

    python benchmarks/bench_int8.py --data random --n 200000 --d 512
    python benchmarks/bench_int8.py --keys keys.npy --queries queries.npy   # your embeddings
    python benchmarks/bench_int8.py --device cuda --n 10000000 --batch 1,16,256,1024

Keys and queries are L2-normalised. --data clustered draws keys around 1,000 random centres
(noise 0.5 per unit norm), a harder case for quantisation than isotropic random vectors because
near neighbours are close. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import reco
from reco import ops as reco_ops

try:
    from . import common  # python -m benchmarks.bench_int8
except ImportError:  # python benchmarks/bench_int8.py
    import common

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--data", choices=("random", "clustered"), default="random")
    p.add_argument("--keys", help=".npy [N, d] embeddings to use as keys (instead of --data)")
    p.add_argument("--queries", help=".npy [B, d] queries (with --keys; default: 1,000 keys)")
    p.add_argument("--n", type=int, default=200_000, help="rows of generated keys")
    p.add_argument("--d", type=int, default=512, help="dimension of generated keys")
    p.add_argument("--batch", default="256", help="comma-separated query counts")
    p.add_argument("-k", type=int, default=16)
    p.add_argument("--candidates", default="16,32,64", help="comma-separated candidate counts")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="keys' dtype")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="output path (default: benchmarks/results/bench_int8_<dev>.json)")
    return p.parse_args(argv)


def make_data(args: argparse.Namespace, n_queries: int) -> tuple[Tensor, Tensor, str]:
    """(keys [N, d] float32, queries [B, d] float32, description), both L2-normalised."""
    g = torch.Generator().manual_seed(args.seed)
    if args.keys:
        keys = torch.from_numpy(np.load(args.keys)).float()
        if args.queries:
            queries = torch.from_numpy(np.load(args.queries)).float()
        else:  # held-out rows of the keys themselves
            pick = torch.randperm(keys.shape[0], generator=g)
            queries, keys = keys[pick[:n_queries]], keys[pick[n_queries:]]
        name = f"{Path(args.keys).name} (N={keys.shape[0]}, d={keys.shape[1]})"
    elif args.data == "clustered":
        centres = torch.nn.functional.normalize(torch.randn(1000, args.d, generator=g), dim=1)
        noise = 0.5 / args.d**0.5
        pick = torch.randint(0, 1000, (args.n + n_queries,), generator=g)
        both = centres[pick] + noise * torch.randn(args.n + n_queries, args.d, generator=g)
        keys, queries = both[: args.n], both[args.n :]
        name = f"clustered (N={args.n}, d={args.d})"
    else:
        keys = torch.randn(args.n, args.d, generator=g)
        queries = torch.randn(n_queries, args.d, generator=g)
        name = f"random (N={args.n}, d={args.d})"
    norm = torch.nn.functional.normalize
    return norm(keys, dim=1), norm(queries, dim=1), name


def median_ms(fn, repeats: int, sync) -> float:
    """Median wall time of fn in milliseconds over `repeats` runs after one warm-up."""
    return common.time_runs(fn, repeats, sync=sync).median_ms


def main(argv: list[str] | None = None) -> None:
    """Runs every (B, candidates) case, prints the table and writes the JSON."""
    args = parse_args(argv)
    batches = common.int_list(args.batch, "batch")
    cands = common.int_list(args.candidates, "candidates")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    dev = torch.device(args.device)
    sync = common.synchronizer(dev.type)
    keys32, queries32, data_name = make_data(args, max(batches))
    dtype = DTYPES[args.dtype]
    keys = keys32.to(dev, dtype)
    values = torch.zeros(keys.shape[0], 8, device=dev, dtype=dtype)  # the search is measured
    codes, scales = reco.quantize_keys(keys)
    timed = args.device == "cuda" or reco_ops._C is not None
    if args.device == "cuda":
        backend = "CUDA kernel" if reco_ops.cuda_kernel_enabled() else "reference (no kernel)"
    elif reco_ops._C is not None:
        vnni = "AVX512-VNNI" if reco_ops._C.coarse_int8_uses_vnni() else "integer loop"
        backend = f"CPU kernel ({vnni}, {torch.get_num_threads()} threads)"
    else:
        backend = "reference (no compiled core)"
    print(f"{data_name}, keys {args.dtype}, k={args.k}, device {args.device}: int8 op = {backend}")
    columns = [("B", 6), ("cand", 5), ("recall@k", 8, ".4f"), ("top-1", 6, ".3f")]
    if timed:
        columns += [("exact ms", 9, ".3f"), ("int8 ms", 8, ".3f"), ("read int8", 9, ".3f")]
        columns += [("exact/int8", 10)]
    table = common.Table(columns, rule=True)
    print(table.header())
    records: list[dict[str, Any]] = []
    for B in batches:
        q = queries32[:B].to(dev)
        exact = reco.fused_retrieve_attend(q, keys, values, args.k)
        exact_ms = read_ms = None
        if timed:
            exact_ms = median_ms(
                lambda q=q: reco.fused_retrieve_attend(q, keys, values, args.k), args.repeats, sync
            )
            flat = codes.reshape(-1)
            words = flat[: flat.numel() // 8 * 8].view(torch.int64)  # every byte, 8 at a time
            read_ms = median_ms(lambda w=words: w.sum(), args.repeats, sync)
        want = exact.indices.cpu()
        for c in cands:
            if not args.k <= c <= keys.shape[0]:
                continue

            def run(c=c, q=q):
                return reco.fused_retrieve_attend_int8(
                    q, codes, scales, keys, values, args.k, candidates=c
                )

            got = run().indices.cpu()
            hits = [len(set(got[b].tolist()) & set(want[b].tolist())) for b in range(B)]
            recall = sum(hits) / (B * args.k)
            top1 = float((got[:, 0] == want[:, 0]).float().mean())
            rec: dict[str, Any] = dict(B=B, candidates=c, recall=recall, top1=top1)
            cells = [B, c, recall, top1]
            if timed:
                int8_ms = median_ms(run, args.repeats, sync)
                rec.update(exact_ms=exact_ms, int8_ms=int8_ms, read_int8_ms=read_ms)
                cells += [exact_ms, int8_ms, read_ms, f"{exact_ms / int8_ms:.2f}x"]
            print(table.row(*cells))
            records.append(rec)
    machine = {**common.machine_info(args.device), "int8_backend": backend}
    config = {k: v for k, v in vars(args).items() if k != "json"}
    payload = {"machine": machine, "data": data_name, "config": config, "cases": records}
    out = common.write_json(args.json or common.RESULTS / f"bench_int8_{args.device}.json", payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
