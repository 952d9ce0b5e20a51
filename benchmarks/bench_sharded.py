"""Benchmark a memory sharded over torch.distributed processes, and model larger deployments.

Measured: time per retrieval batch with 1, 2, ... gloo processes on this machine (each process one
shard; every process brings B queries), and the bytes each process exchanged.

Modelled (--model): time per batch and memory per GPU for 1e8 and 1e9 rows on 8-64 GPUs, from
stated per-GPU and interconnect figures (see model_rows). These are arithmetic, not measurements.

    python benchmarks/bench_sharded.py --rows 2000000 --dim 128 --worlds 1,2
    python benchmarks/bench_sharded.py --model
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reco.memory import EncoderInfo, MemoryWriter, ModalityInfo

try:
    from . import common  # python -m benchmarks.bench_sharded
except ImportError:  # python benchmarks/bench_sharded.py
    import common

MEASURED_TABLE = common.Table(
    [
        ("processes", 9),
        ("threads/proc", 12),
        ("ms/batch", 9, ".1f"),
        ("queries/s", 9, ".0f"),
        ("bytes/batch/proc", 16, ",.0f"),
    ]
)
MODEL_TABLE = common.Table(
    [
        ("rows", 6, ".0e"),
        ("GPUs", 4),
        ("GB/GPU", 7, ".1f"),
        ("fits 80GB", 9),
        ("search ms", 9, ".2f"),
        ("comm ms", 8, ".2f"),
        ("total ms", 8, ".2f"),
        ("queries/s", 9, ".0f"),
    ]
)


def make_memory(path: Path, rows: int, dim: int, dv: int) -> None:
    rng = np.random.default_rng(0)
    mods = {
        "image": ModalityInfo(dim, "float16", EncoderInfo("random")),
        "text": ModalityInfo(dv, "float16", EncoderInfo("random")),
    }
    with MemoryWriter(path, mods, shard_rows=1 << 18) as w:
        for r0 in range(0, rows, 1 << 16):
            n = min(1 << 16, rows - r0)
            x = rng.standard_normal((n, dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            w.add({"image": x, "text": rng.standard_normal((n, dv), dtype=np.float32)})


def worker(rank: int, world: int, init: str, mem: str, B: int, k: int, repeats: int, out: str):
    from reco.distributed import ShardedIndex

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=600),
    )
    index = ShardedIndex(mem, "image", "text")
    g = torch.Generator().manual_seed(rank)
    q = torch.nn.functional.normalize(torch.randn(B, index.dim, generator=g), dim=1)
    index.retrieve_attend(q, k)
    before = index.bytes_exchanged
    runs = common.time_runs(
        lambda: index.retrieve_attend(q, k), repeats, warmup=0, before=dist.barrier
    )
    if rank == 0:
        Path(out).write_text(
            json.dumps(
                {
                    "median_ms": runs.median_ms,
                    "bytes_per_batch": (index.bytes_exchanged - before) / repeats,
                    "threads_per_process": torch.get_num_threads(),
                }
            )
        )
    dist.destroy_process_group()


def measure(args: argparse.Namespace) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix="reco-sharded-"))
    rows = []
    try:
        make_memory(work / "mem", args.rows, args.dim, args.dv)
        print(
            f"memory: {args.rows} rows, keys {args.dim}-d, values {args.dv}-d, float16; "
            f"B={args.batch} per process, k={args.k}; {os.cpu_count()} cores"
        )
        print(MEASURED_TABLE.header())
        for world in common.int_list(args.worlds, "worlds"):
            out = work / f"w{world}.json"
            init = tempfile.mktemp(dir=work)
            mp.start_processes(
                worker,
                args=(world, init, str(work / "mem"), args.batch, args.k, args.repeats, str(out)),
                nprocs=world,
                join=True,
                start_method="spawn",
            )
            r = json.loads(out.read_text())
            r.update(processes=world, queries_per_s=world * args.batch / r["median_ms"] * 1e3)
            rows.append(r)
            print(
                MEASURED_TABLE.row(
                    world,
                    r["threads_per_process"],
                    r["median_ms"],
                    r["queries_per_s"],
                    r["bytes_per_batch"],
                )
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


# Per-GPU figures measured on an H100 80GB (copy bandwidth and fp16 GEMM rate, as stated in the
# CUDA issue of this project); interconnect figures are vendor nominal rates, derated.
HBM_BYTES_PER_S = 3.0e12
FP16_FLOP_PER_S = 733e12
NVLINK_BYTES_PER_S = 300e9  # intra-node, per GPU (H100 SXM NVLink 450 GB/s nominal, derated)
IB_BYTES_PER_S = 40e9  # inter-node, per GPU (400 Gb/s InfiniBand nominal, derated)
LINK_LATENCY_S = 20e-6  # per ring step
GPUS_PER_NODE = 8


def model_rows(B: int = 1024, k: int = 16, d: int = 512, dv: int = 512) -> list[dict]:
    """Training mode, every GPU bringing B queries. t_search = max(rows/W * d * 2 / HBM (one pass
    over the shard's fp16 keys), 2 * (B*W) * rows/W * d / FP16 (the score GEMM for all W*B
    gathered queries)); t_comm = (W - 1) * (B*d*4 + B*k*(dv*2 + 4 + 8)) / link + (W - 1) *
    latency (queries all-gathered as fp32, then an all-to-all of fp16 values, fp32 scores, int64
    ids), link = NVLink inside a node, InfiniBand across nodes; memory per GPU = rows/W * (d + dv)
    * 2 bytes (fp16 keys and values)."""
    out = []
    for N in (1e8, 1e9):
        for W in (8, 16, 32, 64):
            shard = N / W
            t_search = max(shard * d * 2 / HBM_BYTES_PER_S, 2 * B * W * shard * d / FP16_FLOP_PER_S)
            per_peer = B * d * 4 + B * k * (dv * 2 + 4 + 8)
            link = NVLINK_BYTES_PER_S if W <= GPUS_PER_NODE else IB_BYTES_PER_S
            t_comm = (W - 1) * per_peer / link + (W - 1) * LINK_LATENCY_S
            mem = shard * (d + dv) * 2 / 1e9
            out.append(
                {
                    "rows": N,
                    "gpus": W,
                    "memory_per_gpu_GB": mem,
                    "fits_80GB": mem < 75,
                    "search_ms": t_search * 1e3,
                    "comm_ms": t_comm * 1e3,
                    "total_ms": (t_search + t_comm) * 1e3,
                }
            )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dv", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("-k", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--worlds", default="1,2")
    p.add_argument("--model", action="store_true", help="print the model for 1e8/1e9 rows only")
    p.add_argument("--json", default="benchmarks/results/bench_sharded.json")
    args = p.parse_args()
    result = {"machine": common.machine_info(), "config": vars(args)}
    if not args.model:
        result["measured"] = measure(args)
    result["model"] = model_rows()
    print("\nmodel (B=1024 per GPU, k=16, d=dv=512, fp16 memory; formula in model_rows):")
    print(MODEL_TABLE.header())
    for r in result["model"]:
        qps = 1024 * r["gpus"] / r["total_ms"] * 1e3
        print(
            MODEL_TABLE.row(
                r["rows"],
                r["gpus"],
                r["memory_per_gpu_GB"],
                "yes" if r["fits_80GB"] else "no",
                r["search_ms"],
                r["comm_ms"],
                r["total_ms"],
                qps,
            )
        )
    common.write_json(args.json, result)


if __name__ == "__main__":
    main()
