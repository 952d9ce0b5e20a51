"""Benchmark reco.fused_retrieve_attend against faiss + torch aggregation and a naive torch path.

Each case (storage dtype, query dtype, batch size B) times every method in the same process on the
same data: random L2-normalised keys [N, d] and values [N, dv], random normalised queries [B, d].
Reported times are medians of --repeats runs after --warmup runs, in milliseconds.

    python benchmarks/bench_retrieve.py --shapes quick --repeats 2
    python benchmarks/bench_retrieve.py --shapes default --dtypes float32 --batch 1 --skip-naive

Prints a table and writes JSON (machine info, config, one record per case).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

import reco
from reco import ops as reco_ops

try:
    import faiss
except ImportError:
    faiss = None

try:
    from . import common  # python -m benchmarks.bench_retrieve
except ImportError:  # python benchmarks/bench_retrieve.py
    import common

Outputs = tuple[Tensor, Tensor, Tensor, Tensor]
"""(output [B, H, dv], weights [B, H, k], indices [B, k], scores [B, k]), as reco returns."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
SHORT_NAMES: dict[torch.dtype, str] = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
}
NAIVE_SCORE_BYTES = 2 << 30
"""The naive path scores keys in chunks that keep one B x chunk float32 score block below this."""

NAIVE_SCORING = (
    "scores = query.float() @ keys_chunk.float().T in float32 (low-precision keys are converted "
    "to float32 chunk by chunk inside every call), running top-k with torch.topk over the "
    "concatenated per-chunk candidates, then values[indices].float(), softmax over the scores, "
    "weighted sum"
)
FAISS_STORAGE = (
    "on CPU, faiss.IndexFlatIP stores float32 (faiss has no bfloat16/float16 CPU flat index); "
    "for low-precision dtypes it is built from the keys rounded to that dtype and converted back "
    "to float32, so its top-k is the exact top-k of the same rounded keys. On CUDA, "
    "faiss.GpuIndexFlatIP stores float16 (useFloat16; bfloat16 keys converted to float16). The "
    "query is passed as query.float(); the aggregation (gather values rows, softmax over the "
    "scores, weighted sum) runs in torch"
)


@dataclass(frozen=True)
class ShapeSet:
    """A named set of problem sizes: one memory (N, d, dv) and k, several batch sizes."""

    N: int
    d: int
    dv: int
    k: int
    batches: tuple[int, ...]


SHAPE_SETS: dict[str, ShapeSet] = {
    "default": ShapeSet(N=1_000_000, d=512, dv=512, k=16, batches=(1, 64, 1024)),
    "medium": ShapeSet(N=250_000, d=256, dv=256, k=16, batches=(1, 64, 256)),
    "quick": ShapeSet(N=100_000, d=128, dv=128, k=16, batches=(1, 64)),
    # For a GPU with room for 10 GB of 16-bit keys and as much again of values.
    "large": ShapeSet(N=10_000_000, d=512, dv=512, k=16, batches=(1, 16, 256, 1024)),
}


@dataclass
class BenchConfig:
    """Everything that defines a benchmark run."""

    device: str
    shapes: str
    N: int
    d: int
    dv: int
    k: int
    batches: list[int]
    dtypes: list[str]
    repeats: int
    warmup: int
    threads: int
    max_seconds_per_case: float
    seed: int
    run_faiss: bool
    run_naive: bool
    json_path: str


@dataclass
class Timing:
    """Wall-clock timings of one method on one case, in milliseconds."""

    method: str
    median_ms: float
    min_ms: float
    times_ms: list[float]
    repeats_run: int
    warmup_run: int
    guard_hit: bool
    queries_per_s: float
    x_vs_reco: float | None = None
    """other_time / reco_time: how many times faster reco is (None for reco itself)."""


@dataclass
class CaseResult:
    """All methods on one (storage dtype, query dtype, B) case."""

    label: str
    keys_dtype: str
    query_dtype: str
    B: int
    N: int
    d: int
    dv: int
    k: int
    timings: dict[str, Timing] = field(default_factory=dict)
    recall_vs: str | None = None
    recall_at_k: float | None = None
    """Mean fraction of reco's top-k indices found in the `recall_vs` method's top-k."""
    max_abs_diff_output: float | None = None
    """max |reco output - `recall_vs` output| over the whole [B, 1, dv] output."""
    limit_ms: float | None = None
    """The machine's limit for the search (CPU): the larger of B x N x d multiply-adds at the
    level's FMA peak (vdpbf16ps's for bf16 queries on bf16 keys at avx512bf16) and one read of
    the keys at the measured bandwidth."""
    limit_bound: str | None = None
    """Which of the two it is: "compute" or "read"."""
    pct_of_limit: dict[str, float] = field(default_factory=dict)
    """Per method: 100 x limit_ms / its median time."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--shapes", choices=sorted(SHAPE_SETS), default="default")
    p.add_argument(
        "--batch",
        type=str,
        default=None,
        help="comma-separated batch sizes overriding the shape set's, e.g. 1,64",
    )
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument(
        "--max-seconds-per-case",
        type=float,
        default=60.0,
        help="stop repeating a method once one run takes longer than this (<= 0: no limit)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=str, default=None, help="output path for the JSON results")
    p.add_argument("--skip-faiss", action="store_true")
    p.add_argument("--skip-naive", action="store_true")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> BenchConfig:
    """Resolves the shape set, batch override and output path into a BenchConfig."""
    shapes = SHAPE_SETS[args.shapes]
    batches = common.int_list(args.batch, "batch") if args.batch else list(shapes.batches)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        raise SystemExit("--repeats and --threads must be >= 1, --warmup >= 0")
    json_path = args.json or str(common.RESULTS / f"bench_retrieve_{args.device}.json")
    return BenchConfig(
        device=args.device,
        shapes=args.shapes,
        N=shapes.N,
        d=shapes.d,
        dv=shapes.dv,
        k=shapes.k,
        batches=batches,
        dtypes=list(dict.fromkeys(args.dtypes)),
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        max_seconds_per_case=args.max_seconds_per_case,
        seed=args.seed,
        run_faiss=not args.skip_faiss,
        run_naive=not args.skip_naive,
        json_path=json_path,
    )


def reco_backend(device: str) -> str:
    """Which implementation of reco's op runs on `device`."""
    if device == "cpu" and reco_ops._C is not None:
        return f"compiled cpu kernel ({reco_ops._C.default_cpu_level()})"
    if device == "cuda" and reco_ops.cuda_kernel_enabled():
        return (
            "compiled CUDA kernel (RECO_CUDA_KERNEL=1): tensor-core search for a 16-bit query of "
            "the keys' dtype, CUDA cores otherwise"
        )
    return f"pure-torch reference (no compiled reco kernel for {device})"


def machine_info(cfg: BenchConfig, faiss_note: str) -> dict[str, Any]:
    """Versions, hardware and the reco backend in use (the field names of earlier results)."""
    info = common.machine_info(
        cfg.device, cfg.threads, rename={"cpu": "cpu_model", "cores": "cpu_count"}
    )
    info.update(
        faiss=None if faiss is None else faiss.__version__,
        faiss_note=faiss_note,
        reco_backend=reco_backend(cfg.device),
    )
    return info


def random_unit_rows(
    n: int, dim: int, seed: int, dtype: torch.dtype, device: str, chunk: int = 1 << 16
) -> Tensor:
    """[n, dim] standard normal rows scaled to unit L2 norm, then stored in `dtype` on `device`.

    Generated in float32 chunks from one seeded generator, so every dtype and device sees the same
    numbers (up to rounding) and no full-size float32 copy exists for low-precision storage.
    """
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(n, dim, dtype=dtype, device=device)
    for i in range(0, n, chunk):
        x = torch.randn(min(chunk, n - i), dim, generator=gen)
        x /= x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        out[i : i + x.shape[0]].copy_(x)
    return out


def attend_topk(scores: Tensor, indices: Tensor, values: Tensor) -> Outputs:
    """softmax(scores) over the k retrieved rows weighting values[indices], in reco's layout."""
    v_sel = values[indices].float()  # [B, k, dv]
    weights = torch.softmax(scores, dim=-1).unsqueeze(1)  # [B, 1, k]
    return torch.bmm(weights, v_sel), weights, indices, scores


def score_gemm(query: Tensor, keys: Tensor, chunk: int = 1 << 18) -> Tensor:
    """query @ keys.T chunk by chunk, keeping only the last chunk (the GEMM's cost alone)."""
    out = query.new_empty(0)
    for start in range(0, keys.shape[0], chunk):
        out = query @ keys[start : start + chunk].T
    return out


def naive_retrieve_attend(query: Tensor, keys: Tensor, values: Tensor, k: int) -> Outputs:
    """Exact top-k by a float32 matmul over key chunks, then the same aggregation as reco."""
    B, N = query.shape[0], keys.shape[0]
    chunk = N if B * N * 4 <= NAIVE_SCORE_BYTES else max(k, NAIVE_SCORE_BYTES // (4 * B))
    q = query.float()
    best_s: Tensor | None = None
    best_i: Tensor | None = None
    for n0 in range(0, N, chunk):
        kc = keys[n0 : n0 + chunk]
        s = q @ (kc if kc.dtype == torch.float32 else kc.float()).T
        top_s, top_i = torch.topk(s, min(k, s.shape[1]), dim=1)
        del s
        top_i += n0
        if best_s is None or best_i is None:
            best_s, best_i = top_s, top_i
        else:
            best_s, pos = torch.topk(torch.cat([best_s, top_s], 1), k, dim=1)
            best_i = torch.cat([best_i, top_i], 1).gather(1, pos)
    assert best_s is not None and best_i is not None
    return attend_topk(best_s, best_i, values)


def build_faiss_index(keys: Tensor, device: str, chunk: int = 1 << 16) -> Any:
    """faiss's exact inner-product index over keys, filled chunk by chunk: on CPU a float32
    IndexFlatIP, on CUDA a GpuIndexFlatIP with float16 storage (fed CUDA tensors through
    faiss.contrib.torch_utils, without a round trip through the host)."""
    if device == "cuda":
        res = faiss.StandardGpuResources()
        config = faiss.GpuIndexFlatConfig()
        config.device = torch.cuda.current_device()
        config.useFloat16 = True
        index = faiss.GpuIndexFlatIP(res, keys.shape[1], config)
        index.referenced_objects = [res]
        for i in range(0, keys.shape[0], chunk):
            index.add(keys[i : i + chunk].float().contiguous())
        return index
    index = faiss.IndexFlatIP(keys.shape[1])
    for i in range(0, keys.shape[0], chunk):
        index.add(np.ascontiguousarray(keys[i : i + chunk].float().cpu().numpy()))
    return index


def faiss_retrieve_attend(index: Any, query: Tensor, values: Tensor, k: int) -> Outputs:
    """faiss exact search for the top-k, then gather values and attend in torch."""
    q = query.float()
    if q.is_cuda:
        scores, indices = index.search(q.contiguous(), k)
    else:
        d_np, i_np = index.search(np.ascontiguousarray(q.numpy()), k)
        scores, indices = torch.from_numpy(d_np), torch.from_numpy(i_np)
    return attend_topk(scores, indices, values)


def faiss_unavailable_reason(device: str) -> str | None:
    """Why faiss cannot run on `device` here, or None when it can."""
    if faiss is None:
        return "faiss is not importable"
    if device == "cuda":
        if not hasattr(faiss, "GpuIndexFlatIP") or faiss.get_num_gpus() < 1:
            return "this faiss build has no GPU support"
        try:
            importlib.import_module("faiss.contrib.torch_utils")
        except ImportError:
            return "faiss.contrib.torch_utils is not importable"
    return None


def time_method(
    fn: Callable[[], Outputs], cfg: BenchConfig, sync: Callable[[], None], B: int, method: str
) -> tuple[Timing, Outputs]:
    """Runs fn warmup + repeats times; returns its timings and the outputs of the last run.

    A run longer than cfg.max_seconds_per_case ends the method's remaining warmups or repeats;
    at least one timed run always happens.
    """
    runs = common.time_runs(
        fn, cfg.repeats, warmup=cfg.warmup, sync=sync, limit_s=cfg.max_seconds_per_case
    )
    timing = Timing(
        method=method,
        median_ms=runs.median_ms,
        min_ms=runs.min_ms,
        times_ms=runs.times_ms,
        repeats_run=len(runs.times_ms),
        warmup_run=len(runs.warmup_ms),
        guard_hit=runs.guard_hit,
        queries_per_s=B / (runs.median_ms / 1e3),
    )
    return timing, runs.out


def recall_at_k(found: Tensor, truth: Tensor) -> float:
    """Mean over queries of |found[b] ∩ truth[b]| / k."""
    hit = (found.unsqueeze(2) == truth.unsqueeze(1)).any(2)
    return float(hit.float().mean())


TABLE = common.Table(
    [
        ("dtype", 22),
        ("B", 5),
        ("N", 9),
        ("d", 4),
        ("k", 3),
        ("reco ms", 10),
        ("reco q/s", 10),
        ("faiss ms", 10),
        ("naive ms", 10),
        ("faiss/reco", 10),
        ("naive/reco", 10),
        ("recall", 6),
        ("read ms", 8),
        ("gemm ms", 8),
        ("reco/floor", 10),
        ("limit ms", 8),
        ("reco %lim", 9),
    ],
    left=True,
    rule=True,
)


def table_row(r: CaseResult) -> str:
    """One case as a table line; '*' marks times cut short by --max-seconds-per-case."""

    def ms(method: str) -> str:
        t = r.timings.get(method)
        if t is None:
            return "-"
        return f"{t.median_ms:.2f}{'*' if t.guard_hit else ''}"

    def ratio(method: str) -> str:
        t = r.timings.get(method)
        return "-" if t is None or t.x_vs_reco is None else f"{t.x_vs_reco:.2f}x"

    reco_t = r.timings.get("reco")
    # The floor: reading every key byte once, or (on CUDA) the score GEMM alone, whichever is
    # slower.
    floor = [r.timings[m].median_ms for m in ("read keys", "scores gemm") if m in r.timings]
    return TABLE.row(
        r.label,
        str(r.B),
        str(r.N),
        str(r.d),
        str(r.k),
        ms("reco"),
        "-" if reco_t is None else f"{reco_t.queries_per_s:.0f}",
        ms("faiss+gather"),
        ms("torch naive"),
        ratio("faiss+gather"),
        ratio("torch naive"),
        "-" if r.recall_at_k is None else f"{r.recall_at_k:.4f}",
        ms("read keys"),
        ms("scores gemm"),
        "-" if reco_t is None or not floor else f"{reco_t.median_ms / max(floor):.2f}",
        "-" if r.limit_ms is None else f"{r.limit_ms:.2f}",
        "-" if "reco" not in r.pct_of_limit else f"{r.pct_of_limit['reco']:.0f}% {r.limit_bound}",
    )


def query_dtypes(storage: torch.dtype) -> list[torch.dtype]:
    """float32 queries always; low-precision storage also gets queries in its own dtype."""
    return [torch.float32] if storage == torch.float32 else [torch.float32, storage]


def case_label(storage: torch.dtype, query_dtype: torch.dtype) -> str:
    """e.g. 'float32', 'bfloat16', 'bfloat16 (bf16 query)'."""
    name = str(storage).removeprefix("torch.")
    if query_dtype == torch.float32:
        return name
    return f"{name} ({SHORT_NAMES[query_dtype]} query)"


def run_case(
    cfg: BenchConfig,
    storage: torch.dtype,
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    index: Any,
    sync: Callable[[], None],
    limits: common.MachineLimits | None = None,
) -> CaseResult:
    """Times every enabled method on one case and cross-checks reco's indices and output."""
    B, k = query.shape[0], cfg.k
    result = CaseResult(
        label=case_label(storage, query.dtype),
        keys_dtype=str(storage).removeprefix("torch."),
        query_dtype=str(query.dtype).removeprefix("torch."),
        B=B,
        N=cfg.N,
        d=cfg.d,
        dv=cfg.dv,
        k=k,
    )
    methods: dict[str, Callable[[], Outputs]] = {
        "reco": lambda: tuple(reco.fused_retrieve_attend(query, keys, values, k)),
    }
    if index is not None:
        methods["faiss+gather"] = lambda: faiss_retrieve_attend(index, query, values, k)
    if cfg.run_naive:
        methods["torch naive"] = lambda: naive_retrieve_attend(query, keys, values, k)
    # The memory-bound floor measured beside the rest: one pass reading every key byte (16-bit
    # keys viewed as float32 words, so the pass costs the bytes, not a bf16 conversion).
    words = keys.reshape(-1)
    if keys.element_size() == 2 and words.numel() % 2 == 0:
        words = words.view(torch.float32)
    methods["read keys"] = lambda: (words.sum(),) * 4
    if query.is_cuda:
        # The compute-bound floor on a GPU: the B x N score GEMM on tensor cores (keys' dtype,
        # fp32 accumulation), chunked as the naive path is, with no top-k.
        q16 = query.to(keys.dtype)
        methods["scores gemm"] = lambda: (score_gemm(q16, keys),) * 4
    outputs: dict[str, Outputs] = {}
    for method, fn in methods.items():
        result.timings[method], outputs[method] = time_method(fn, cfg, sync, B, method)
    reco_ms = result.timings["reco"].median_ms
    for method, t in result.timings.items():
        if method != "reco":
            t.x_vs_reco = t.median_ms / reco_ms
    outputs.pop("read keys")
    outputs.pop("scores gemm", None)
    if limits is not None:
        # vdpbf16ps scores bfloat16 queries against bfloat16 keys (2 multiply-adds a lane).
        dot = limits.level == "avx512bf16" and storage == query.dtype == torch.bfloat16
        compute = limits.compute_ms(float(B) * cfg.N * cfg.d, bf16_dot=dot)
        read = limits.read_ms(keys.numel() * keys.element_size())
        result.limit_ms = max(compute, read)
        result.limit_bound = "compute" if compute >= read else "read"
        for method, t in result.timings.items():
            if method != "read keys":
                result.pct_of_limit[method] = 100 * result.limit_ms / t.median_ms
    ref = next((m for m in ("faiss+gather", "torch naive") if m in outputs), None)
    if ref is not None:
        result.recall_vs = ref
        result.recall_at_k = recall_at_k(outputs["reco"][2], outputs[ref][2])
        diff = (outputs["reco"][0].float() - outputs[ref][0].float()).abs().max()
        result.max_abs_diff_output = float(diff)
    return result


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark, prints the table and writes the JSON."""
    cfg = make_config(parse_args(argv))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    torch.set_num_threads(cfg.threads)
    faiss_note = "skipped (--skip-faiss)"
    index_on = cfg.run_faiss
    if cfg.run_faiss:
        reason = faiss_unavailable_reason(cfg.device)
        if reason is not None:
            print(f"faiss+gather skipped: {reason}")
            faiss_note = f"skipped: {reason}"
            index_on = False
        else:
            faiss.omp_set_num_threads(cfg.threads)
            faiss_note = FAISS_STORAGE
    info = machine_info(cfg, faiss_note)
    load_start = os.getloadavg()
    if load_start[0] > 0.5:
        print(f"note: 1-min load average {load_start[0]:.2f} at start; timings may be skewed")
    if reco_ops._C is None or cfg.device != "cpu":
        print(f"note: reco runs the {info['reco_backend']} (imported from {info['reco_path']})")
    warnings.filterwarnings("ignore", message="reco: no compiled fused_retrieve_attend kernel")

    device_desc = f"device {cfg.device}"
    if cfg.device == "cuda":
        device_desc += f" ({info['gpu']})"
    print(
        f"{device_desc} | machine: {info['cpu_model']}, {cfg.threads} threads "
        f"| torch {torch.__version__} | faiss {info['faiss'] or 'n/a'} "
        f"| reco {reco.__version__} [{info['reco_backend']}]"
    )
    print(
        f"shapes '{cfg.shapes}': N={cfg.N} d={cfg.d} dv={cfg.dv} k={cfg.k} B={cfg.batches} | "
        f"median of {cfg.repeats} after {cfg.warmup} warmup | times in ms"
    )
    print(TABLE.header(), flush=True)

    sync = common.synchronizer(cfg.device)
    results: list[CaseResult] = []
    queries = random_unit_rows(max(cfg.batches), cfg.d, cfg.seed + 2, torch.float32, cfg.device)
    with torch.inference_mode():
        for name in cfg.dtypes:
            storage = DTYPES[name]
            keys = random_unit_rows(cfg.N, cfg.d, cfg.seed, storage, cfg.device)
            values = random_unit_rows(cfg.N, cfg.dv, cfg.seed + 1, storage, cfg.device)
            index = build_faiss_index(keys, cfg.device) if index_on else None
            limits = common.machine_limits(keys, cfg.threads) if cfg.device == "cpu" else None
            if limits is not None:
                info.setdefault("limits", {})[name] = dataclasses.asdict(limits)
                print(f"{name} keys: {limits.summary()}", flush=True)
            for qdtype in query_dtypes(storage):
                for B in cfg.batches:
                    query = queries[:B].to(qdtype)
                    r = run_case(cfg, storage, query, keys, values, index, sync, limits)
                    results.append(r)
                    print(table_row(r), flush=True)
                    del query
            del keys, values, index
            gc.collect()
            if cfg.device == "cuda":
                torch.cuda.empty_cache()
    if any(t.guard_hit for r in results for t in r.timings.values()):
        print(f"* a run exceeded --max-seconds-per-case={cfg.max_seconds_per_case}; fewer repeats")
    ratios = (
        "faiss/reco, naive/reco = other time / reco time (> 1: reco faster); read = one pass "
        "summing the keys (torch), the memory-bound floor; gemm (CUDA only) = the score GEMM "
        "alone, the compute-bound floor; reco/floor = reco time / the larger of the two; "
        "limit = the machine's measured limit (CPU: the larger of the B x N x d multiply-adds at "
        "the level's FMA peak and one read of the keys at the measured bandwidth), reco %lim = "
        "100 x limit / reco time, with the bound (compute or read)"
    )
    recall_note = "recall = reco's top-k vs faiss's (naive's without faiss)"
    print(f"{ratios}; {recall_note}")

    info["loadavg_1_5_15_min"] = {"start": load_start, "end": os.getloadavg()}
    report = {
        "benchmark": "bench_retrieve",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [sys.executable, *sys.argv],
        "machine": info,
        "config": dataclasses.asdict(cfg),
        "methods": {
            "reco": "reco.fused_retrieve_attend(query, keys, values, k): output, weights, "
            "indices, scores",
            "faiss+gather": faiss_note,
            "torch naive": NAIVE_SCORING if cfg.run_naive else "skipped (--skip-naive)",
            "read keys": "one torch sum over the key bytes (16-bit keys viewed as float32 "
            "words): the memory-bound floor",
        },
        "timing": "wall clock (time.perf_counter, device synchronised before and after), ms; "
        "x_vs_reco = other median / reco median; queries_per_s = B / median",
        "results": [dataclasses.asdict(r) for r in results],
    }
    out = common.write_json(cfg.json_path, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
