"""Filtered search: reco.search with an `allow` mask against faiss-cpu IndexFlatIP with an
IDSelectorBitmap (SearchParameters(sel=...)), in the same run, on the same keys.

For each keys dtype and batch, each allowed fraction (a random mask): reco's time, its ratio to
reco's unfiltered time (the two timed alternately), faiss's time with the selector
and faiss's own unfiltered time. faiss stores float32 (it has no bfloat16/float16 CPU flat index),
so its figures are the same for both key dtypes and measured once per batch. Medians of
--repeats runs in one process.

--crossover also times fractions between 20% and 90% with the kernel's gathered row list forced
on (RECO_GATHER_BELOW=1) and off (=0), to place the switch between its two paths.

    python benchmarks/bench_filter.py                       # N = 1e6, d = 512, B = 1 and 64
    python benchmarks/bench_filter.py --n 200000 --crossover
"""

from __future__ import annotations

import argparse
import os
import statistics
from functools import partial
from typing import Any

import numpy as np
import torch

import reco

try:
    from . import common  # python -m benchmarks.bench_filter
except ImportError:  # python benchmarks/bench_filter.py
    import common

try:
    import faiss
except ImportError:  # the faiss columns are left out
    faiss = None

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--batch", default="1,64", help="comma-separated query counts")
    p.add_argument("-k", type=int, default=16)
    p.add_argument("--fractions", default="1,0.1,0.01,0.001", help="allowed fractions")
    p.add_argument("--dtypes", default="bfloat16,float32", help=f"keys' dtypes ({sorted(DTYPES)})")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--crossover", action="store_true", help="time both kernel paths at 20-90%%")
    p.add_argument("--skip-faiss", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="output path (default: benchmarks/results/bench_filter.json)")
    args = p.parse_args(argv)
    args.batch = common.int_list(args.batch, "batch")
    args.fractions = [float(f) for f in args.fractions.split(",")]
    args.dtypes = args.dtypes.split(",")
    for name in args.dtypes:
        if name not in DTYPES:
            raise SystemExit(f"--dtypes: {name!r} is not one of {sorted(DTYPES)}")
    return args


def faiss_search(index, query: np.ndarray, k: int, bitmap: np.ndarray | None):
    if bitmap is None:
        return index.search(query, k)
    params = faiss.SearchParameters()
    params.sel = faiss.IDSelectorBitmap(index.ntotal, faiss.swig_ptr(bitmap))
    return index.search(query, k, params=params)


def paired(a, b, repeats: int) -> tuple[float, float]:
    """Median ms of a and of b, timed alternately (a, b, a, b, ...) after one warm-up each."""
    a()
    b()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(common.time_runs(a, 1, warmup=0).median_ms)
        tb.append(common.time_runs(b, 1, warmup=0).median_ms)
    return statistics.median(ta), statistics.median(tb)


def with_gather(value: str | None):
    """Sets RECO_GATHER_BELOW (None: unset) for the kernel's next calls."""
    if value is None:
        os.environ.pop("RECO_GATHER_BELOW", None)
    else:
        os.environ["RECO_GATHER_BELOW"] = value


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    g = torch.Generator().manual_seed(args.seed)
    keys32 = torch.nn.functional.normalize(torch.randn(args.n, args.d, generator=g), dim=1)
    queries = torch.nn.functional.normalize(
        torch.randn(max(args.batch), args.d, generator=g), dim=1
    )
    masks = {f: torch.rand(args.n, generator=g) < f for f in args.fractions}
    index = None
    if faiss is not None and not args.skip_faiss:
        index = faiss.IndexFlatIP(args.d)
        index.add(keys32.numpy())
    time = lambda fn: common.time_runs(fn, args.repeats).median_ms  # noqa: E731

    rows: list[dict[str, Any]] = []
    table = common.Table(
        [("keys", 8), ("B", 4), ("allowed", 8), ("reco ms", 10, ".1f"), ("/ unfiltered", 12, ".3f"),
         ("faiss ms", 10, ".1f"), ("faiss / unf.", 12, ".3f"), ("faiss / reco", 12, ".2f")],
        rule=True,
    )  # fmt: skip
    print(table.header())
    faiss_ms: dict[tuple[int, float | None], float] = {}
    for name in args.dtypes:
        keys = keys32.to(DTYPES[name])
        for B in args.batch:
            q = queries[:B].contiguous()
            qn = q.numpy()
            plain = partial(reco.search, q, keys, args.k)
            if index is not None and (B, None) not in faiss_ms:
                faiss_ms[(B, None)] = time(partial(faiss_search, index, qn, args.k, None))
            for f, allow in masks.items():
                # Filtered and unfiltered runs alternate, so that drift hits both alike.
                got, base_f = paired(partial(reco.search, q, keys, args.k, allow=allow), plain,
                                     args.repeats)  # fmt: skip
                fm = None
                if index is not None:
                    if (B, f) not in faiss_ms:
                        bitmap = np.packbits(allow.numpy(), bitorder="little")
                        faiss_ms[(B, f)] = time(partial(faiss_search, index, qn, args.k, bitmap))
                    fm = faiss_ms[(B, f)]
                fu = faiss_ms.get((B, None))
                row = dict(keys=name, batch=B, allowed=f, reco_ms=got, reco_unfiltered_ms=base_f,
                           faiss_ms=fm, faiss_unfiltered_ms=fu)  # fmt: skip
                rows.append(row)
                print(table.row(
                    name, B, f"{f:.1%}", got, got / base_f,
                    "-" if fm is None else fm, "-" if fm is None else fm / fu,
                    "-" if fm is None else fm / got,
                ))  # fmt: skip

    crossover: list[dict[str, Any]] = []
    if args.crossover:
        ctable = common.Table(
            [("keys", 8), ("B", 4), ("allowed", 8), ("scan ms", 10, ".1f"),
             ("gather ms", 10, ".1f"), ("gather/scan", 12, ".3f")],
            rule=True,
        )  # fmt: skip
        print("\nthe kernel's two paths: every row scanned, mask tested (RECO_GATHER_BELOW=0) "
              "vs the allowed rows gathered (=1)")  # fmt: skip
        print(ctable.header())
        for name in args.dtypes:
            keys = keys32.to(DTYPES[name])
            for B in args.batch:
                q = queries[:B].contiguous()
                for f in (0.2, 0.35, 0.5, 0.65, 0.8, 0.9):
                    allow = torch.rand(args.n, generator=g) < f
                    ms = {}
                    for path, value in (("scan", "0"), ("gather", "1")):
                        with_gather(value)
                        ms[path] = time(partial(reco.search, q, keys, args.k, allow=allow))
                    with_gather(None)
                    crossover.append(dict(keys=name, batch=B, allowed=f, scan_ms=ms["scan"],
                                          gather_ms=ms["gather"]))  # fmt: skip
                    print(ctable.row(name, B, f"{f:.0%}", ms["scan"], ms["gather"],
                                     ms["gather"] / ms["scan"]))  # fmt: skip

    payload = {
        "machine": {**common.machine_info("cpu"), "faiss": getattr(faiss, "__version__", None)},
        "config": {"n": args.n, "d": args.d, "k": args.k, "repeats": args.repeats},
        "results": rows,
        "crossover": crossover,
    }
    out = common.write_json(args.json or common.RESULTS / "bench_filter.json", payload)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
