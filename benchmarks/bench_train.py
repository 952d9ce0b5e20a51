"""Benchmark training steps: samples/s of both methods (retrieval included) on random data.

    python benchmarks/bench_train.py --memory-rows 100000 --dim 512 --batch 256 --steps 20

Prints a table and writes JSON. Retrieval runs inside every step (exact, the fused op), as in
training; the frozen encoders do not (embeddings are precomputed).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn import functional as F

from reco.models import (
    RECO,
    FusionConfig,
    LinearHead,
    MemoryAttention,
    MemoryAttentionConfig,
    RECOConfig,
    RetrievalClassifier,
    Retriever,
)
from reco.train import EmbeddingDataset, LongTailTask, RECOTask, TrainConfig, Trainer

try:
    from . import common  # python -m benchmarks.bench_train
except ImportError:  # python benchmarks/bench_train.py
    import common

TABLE = common.Table([("method", 32), ("ms/step", 9, ".1f"), ("samples/s", 9, ".0f")], left=True)


def run(name: str, model, task, data, args) -> dict:
    cfg = TrainConfig(
        steps=args.steps + 2, batch_size=args.batch, warmup_steps=1, progress=False, log_every=10**9
    )
    trainer = Trainer(model, task, data, cfg)
    trainer.fit(2)  # warm-up steps (first-call set-up)
    t0 = time.perf_counter()
    trainer.fit()
    secs = time.perf_counter() - t0
    r = {
        "method": name,
        "samples_per_s": args.steps * args.batch / secs,
        "ms_per_step": secs / args.steps * 1e3,
        "device": str(trainer.device),
    }
    print(TABLE.row(name, r["ms_per_step"], r["samples_per_s"]))
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--memory-rows", type=int, default=100_000)
    p.add_argument("--train-rows", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", default="benchmarks/results/bench_train.json")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    d = args.dim
    keys = F.normalize(torch.randn(args.memory_rows, d, generator=g), dim=1)
    values = F.normalize(torch.randn(args.memory_rows, d, generator=g), dim=1)
    x = F.normalize(torch.randn(args.train_rows, d, generator=g), dim=1)
    y = torch.randint(0, args.classes, (args.train_rows,), generator=g)
    print(
        f"memory {args.memory_rows} x {d}, batch {args.batch}, k {args.k}, "
        f"{torch.get_num_threads()} threads"
    )
    print(TABLE.header())
    results = []
    lt_data = EmbeddingDataset({"image": x, "label": y})
    retriever = Retriever(keys, values, k=args.k)
    torch.manual_seed(0)
    model = RetrievalClassifier(None, LinearHead(d, args.classes))
    results.append(run("linear head", model, LongTailTask(None), lt_data, args))
    model = RetrievalClassifier(
        MemoryAttention(MemoryAttentionConfig(d, d, heads=8)), LinearHead(d, args.classes)
    )
    results.append(run("memory attention + linear", model, LongTailTask(retriever), lt_data, args))
    reco = RECO(RECOConfig(k=args.k, fusion=FusionConfig(dim=d)))
    retrievers = {
        "image": Retriever(keys, values, k=args.k),
        "text": Retriever(values, keys, k=args.k),
    }
    pairs = EmbeddingDataset(
        {"image": x, "text": F.normalize(torch.randn(len(x), d, generator=g), dim=1)}
    )
    results.append(run("RECO (2 fusion layers)", reco, RECOTask(retrievers), pairs, args))
    device = results[0]["device"] if results else "cpu"
    machine = common.machine_info(device.split(":")[0])
    common.write_json(args.json, {"machine": machine, "config": vars(args), "results": results})


if __name__ == "__main__":
    main()
