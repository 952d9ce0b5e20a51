"""Benchmark building and searching an on-disk memory.

1. Import throughput (rows/s) of clip-retrieval embeddings (the LAION layout) into a memory.
2. Search latency on the memory-mapped result with each backend, B queries, k neighbours.
3. Optionally (--images N) build throughput from generated images with a tiny open_clip model
   (measures the builder's own overhead: decoding, hashing, writing; a real encoder dominates).

    python benchmarks/bench_memory.py --rows 1000000 --dim 512
    python benchmarks/bench_memory.py --rows 100000 --dim 128 --images 2000

Prints a table and writes JSON (machine, config, results).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from reco import ingest as builders
from reco.index import Index
from reco.memory import Memory

try:
    from . import common  # python -m benchmarks.bench_memory
except ImportError:  # python benchmarks/bench_memory.py
    import common


SEARCH_TABLE = common.Table(
    [
        ("backend", 8),
        ("B", 5),
        ("first ms", 9, ".1f"),
        ("median ms", 9, ".1f"),
        ("queries/s", 9, ".0f"),
    ],
    left=True,
)


def make_clip_retrieval(root: Path, rows: int, dim: int, per_file: int, seed: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for n, r0 in enumerate(range(0, rows, per_file)):
        m = min(per_file, rows - r0)
        for sub in ("img_emb", "text_emb"):
            x = rng.standard_normal((m, dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            np.save(root / sub / f"{sub}_{n}.npy", x.astype(np.float16))
        caps = [f"item {r0 + i}" for i in range(m)]
        table = pa.table({"caption": caps, "url": caps})
        pq.write_table(table, root / "metadata" / f"metadata_{n}.parquet")


def time_calls(fn, repeats: int) -> tuple[float, float]:
    """(first call, median of the next `repeats`) in ms."""
    runs = common.time_runs(fn, repeats)
    return runs.warmup_ms[0], runs.median_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--per-file", type=int, default=250_000, help="rows per clip-retrieval file")
    p.add_argument("--shard-rows", type=int, default=1 << 18)
    p.add_argument("--batch", default="1,64", help="comma-separated query batch sizes")
    p.add_argument("-k", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backends", default="fused,faiss")
    p.add_argument("--images", type=int, default=0, help="also build from this many images")
    p.add_argument("--workdir", help="where the memory is written (default: a temporary folder)")
    p.add_argument("--json", default="benchmarks/results/bench_memory.json")
    args = p.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="reco-bench-"))
    results: dict = {"machine": common.machine_info(), "config": vars(args)}
    try:
        src = work / "clip-retrieval"
        make_clip_retrieval(src, args.rows, args.dim, args.per_file, seed=0)
        t0 = time.perf_counter()
        rep = builders.import_clip_retrieval(
            work / "memory",
            src,
            image_encoder="random",
            dtype="float16",
            shard_rows=args.shard_rows,
            chunk_rows=1 << 16,
            progress_bar=False,
        )
        secs = time.perf_counter() - t0
        results["import"] = {"rows": rep.rows, "seconds": secs, "rows_per_s": rep.rows / secs}
        print(
            f"import clip-retrieval: {rep.rows} rows x {args.dim} in {secs:.1f} s "
            f"= {rep.rows / secs:,.0f} rows/s (dedup on, sha256 of every file)"
        )

        mem = Memory.open(work / "memory")
        g = torch.Generator().manual_seed(1)
        search = []
        print(
            f"\nsearch on the memory-mapped memory ({mem.rows} rows, "
            f"{len(mem.manifest.shards)} shards, float16), k={args.k}"
        )
        print(SEARCH_TABLE.header())
        for backend in args.backends.split(","):
            try:
                index = Index.from_memory(mem, "image", "text", backend=backend)
            except ImportError as e:
                print(SEARCH_TABLE.row(backend, f"skipped: {e}"))
                continue
            for B in common.int_list(args.batch, "batch"):
                q = torch.nn.functional.normalize(torch.randn(B, args.dim, generator=g), dim=1)
                first, med = time_calls(
                    lambda index=index, q=q: index.search(q, args.k), args.repeats
                )
                search.append(
                    {
                        "backend": backend,
                        "B": B,
                        "first_ms": first,
                        "median_ms": med,
                        "qps": B / med * 1e3,
                    }
                )
                print(SEARCH_TABLE.row(backend, B, first, med, B / med * 1e3))
        results["search"] = search

        if args.images:
            results["images"] = bench_images(work, args.images)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    out = common.write_json(args.json, results)
    print(f"\nwrote {out}")


def bench_images(work: Path, n: int) -> dict:
    import open_clip
    from PIL import Image

    from reco.encoders import OpenCLIPEncoder

    cfg = Path(__file__).resolve().parents[1] / "tests" / "data" / "reco-tiny-clip.json"
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    weights = work / "tiny.pt"
    torch.save({"state_dict": open_clip.create_model("reco-tiny-clip").state_dict()}, weights)
    rng = np.random.default_rng(0)
    rows = []
    (work / "img").mkdir()
    for i in range(n):
        path = work / "img" / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        rows.append(json.dumps({"path": str(path), "caption": f"image {i}"}))
    (work / "items.jsonl").write_text("\n".join(rows))
    enc = OpenCLIPEncoder("reco-tiny-clip", weights, device="cpu")
    t0 = time.perf_counter()
    rep = builders.build_from_items(
        work / "image-memory",
        builders.iter_caption_table(work / "items.jsonl"),
        image_encoder=enc,
        progress_bar=False,
    )
    secs = time.perf_counter() - t0
    print(
        f"\nbuild from {n} images (tiny open_clip model, CPU): {secs:.1f} s = "
        f"{rep.rows / secs:,.0f} rows/s"
    )
    return {
        "rows": rep.rows,
        "seconds": secs,
        "rows_per_s": rep.rows / secs,
        "encoder": "reco-tiny-clip (tests/data)",
    }


if __name__ == "__main__":
    main()
