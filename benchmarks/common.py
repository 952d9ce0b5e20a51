"""What every benchmarks/bench_*.py shares: the machine block of its JSON, the timing loop, its
plain-text tables, comma-separated integer flags and writing the JSON.

The scripts run as `python benchmarks/bench_x.py` (this folder is then sys.path[0]) or as
`python -m benchmarks.bench_x` (from the repository root); each imports this module as

    try:
        from . import common  # python -m benchmarks.bench_x
    except ImportError:  # python benchmarks/bench_x.py
        import common
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import reco
from reco import ops as reco_ops

RESULTS = Path(__file__).resolve().parent / "results"
"""benchmarks/results/, where the scripts write their JSON unless told otherwise."""

SIMD_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_bf16",
    "amx_int8",
    "neon",
    "asimd",
    "sve",
    "sve2",
)
"""The CPU flags that decide which of reco's kernels can run (x86 and Arm names)."""


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, or platform's guess elsewhere."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def simd_flags() -> list[str]:
    """Which of SIMD_FLAGS this CPU reports, in that order."""
    info = _cpuinfo()
    have = set((info.get("flags") or info.get("Features") or "").split())
    return [f for f in SIMD_FLAGS if f in have]


def machine_info(
    device: str = "cpu", threads: int | None = None, rename: dict[str, str] | None = None
) -> dict[str, Any]:
    """The machine a figure was measured on: platform, CPU model, cores, SIMD flags, versions,
    reco's build (compiled core, CPU levels, CUDA), the device benchmarked and the GPU, if any.

    threads: the torch threads the benchmark ran with (default: torch's current setting).
    rename: field names an older JSON layout used, e.g. {"cpu": "cpu_model"}, so that results
    written before and after this module stay comparable field for field.
    """
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads() if threads is None else threads,
        "simd": simd_flags(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "reco": reco.__version__,
        "reco_path": str(Path(reco.__file__).parent),
        "reco_compiled_core": reco_ops._C is not None,
        "reco_cpu_level_env": os.environ.get("RECO_CPU_LEVEL"),
    }
    if reco_ops._C is not None:
        info["reco_cpu_level"] = reco_ops._C.default_cpu_level()
        info["reco_cpu_levels"] = list(reco_ops._C.cpu_levels())
        info["reco_with_cuda"] = bool(reco_ops._C.with_cuda)
    info["device"] = device
    cuda = torch.cuda.is_available()
    info["gpu"] = torch.cuda.get_device_name() if cuda else None
    info["cuda"] = torch.version.cuda if cuda else None
    if rename:
        info = {rename.get(key, key): value for key, value in info.items()}
    return info


@dataclass
class MachineLimits:
    """The machine's own limits, measured by reco._C's benchmark loops on the threads a benchmark
    runs with: the multiply-add peak of each CPU level's vectors and the read bandwidth over an
    array (a key matrix), so that a figure can be given as a % of what the machine allows."""

    level: str
    """The CPU level the op runs at (RECO_CPU_LEVEL, else the best)."""
    threads: int
    fma_gmacs: dict[str, float]
    """Per level: float32 vector FMA chains (generic: multiply then add), 1e9 multiply-adds/s."""
    bf16_dot_gmacs: float | None
    """vdpbf16ps chains (2 multiply-adds a lane) where the CPU and build have them."""
    read_gbs: float
    """One pass reading the array with the level's vector loads, median of the repeats, GB/s."""
    read_bytes: int

    def compute_ms(self, macs: float, bf16_dot: bool = False) -> float:
        """The time `macs` multiply-adds take at the level's peak (bf16_dot: vdpbf16ps's)."""
        rate = self.bf16_dot_gmacs if bf16_dot and self.bf16_dot_gmacs else None
        return macs / ((rate or self.fma_gmacs[self.level]) * 1e9) * 1e3

    def read_ms(self, nbytes: float) -> float:
        """The time reading `nbytes` takes at the measured bandwidth."""
        return nbytes / (self.read_gbs * 1e9) * 1e3

    def summary(self) -> str:
        peaks = ", ".join(f"{name} {rate:.1f}" for name, rate in self.fma_gmacs.items())
        dot = f" (vdpbf16ps {self.bf16_dot_gmacs:.1f})" if self.bf16_dot_gmacs else ""
        return (
            f"limits on {self.threads} threads: FMA peak {peaks}{dot} GMAC/s; read "
            f"{self.read_gbs:.1f} GB/s over {self.read_bytes / 1e9:.2f} GB (level {self.level})"
        )


def machine_limits(array: torch.Tensor, threads: int, repeats: int = 5) -> MachineLimits | None:
    """Measures MachineLimits on `threads` threads, the read over `array` (contiguous, CPU);
    None without the compiled core."""
    C = reco_ops._C
    if C is None:
        return None
    level = C.default_cpu_level()
    fma = {name: C.bench_fma_rate(name, threads) / 1e9 for name in C.cpu_levels()}
    dot = C.bench_fma_rate(level, threads, bf16_dot=True) / 1e9
    C.bench_read_seconds(array, threads, level)  # warm-up: pages mapped, caches as in a search
    times = [C.bench_read_seconds(array, threads, level) for _ in range(repeats)]
    nbytes = array.numel() * array.element_size()
    return MachineLimits(
        level=level,
        threads=threads,
        fma_gmacs=fma,
        bf16_dot_gmacs=dot or None,
        read_gbs=nbytes / statistics.median(times) / 1e9,
        read_bytes=nbytes,
    )


def synchronizer(device: str) -> Callable[[], None]:
    """A function that waits for the device's queued work."""
    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


@dataclass
class Runs:
    """What time_runs measured: wall times in milliseconds and the last timed run's result."""

    times_ms: list[float]
    """The timed runs, in order."""
    warmup_ms: list[float]
    """The warm-up runs before them, in order."""
    guard_hit: bool
    """A run took longer than the limit, so fewer runs were made than asked for."""
    out: Any

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)


def time_runs(
    fn: Callable[[], Any],
    repeats: int,
    *,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
    before: Callable[[], None] | None = None,
    limit_s: float | None = None,
) -> Runs:
    """Runs fn `warmup` times, then `repeats` timed times (time.perf_counter).

    Each run calls before() then sync() untimed, then times fn() and a second sync(), so device
    work queued by fn is counted. A run longer than limit_s (None or <= 0: no limit) ends the
    remaining warm-ups or repeats; a warm-up over the limit leaves one timed run; at least one
    timed run always happens.
    """
    limit = limit_s if limit_s is not None and limit_s > 0 else float("inf")
    wait = sync or (lambda: None)

    def once() -> tuple[float, Any]:
        if before is not None:
            before()
        wait()
        t0 = time.perf_counter()
        out = fn()
        wait()
        return (time.perf_counter() - t0) * 1e3, out

    guard_hit = False
    warmup_ms: list[float] = []
    for _ in range(warmup):
        warmup_ms.append(once()[0])
        if warmup_ms[-1] > limit * 1e3:
            guard_hit = True
            break
    times_ms: list[float] = []
    out = None
    for _ in range(1 if guard_hit else repeats):
        elapsed, out = once()
        times_ms.append(elapsed)
        if elapsed > limit * 1e3:
            guard_hit = True
            break
    return Runs(times_ms, warmup_ms, guard_hit, out)


Column = tuple[str, int] | tuple[str, int, str]
"""(title, width) or (title, width, format spec for the column's numbers, e.g. ".2f")."""


@dataclass(frozen=True)
class Table:
    """A plain-text table printed line by line: cells padded to their column's width and joined
    by " | ", the first column left-aligned when `left`, every other right-aligned; `rule` adds a
    line of dashes under the titles."""

    columns: Sequence[Column]
    left: bool = False
    rule: bool = False

    def header(self) -> str:
        """The column titles (and the rule)."""
        title = self.row(*(c[0] for c in self.columns))
        return f"{title}\n{'-' * len(title)}" if self.rule else title

    def row(self, *cells: Any) -> str:
        """One line: a str cell as it is, any other formatted with its column's spec. Fewer
        cells than columns fill the first ones only."""
        parts = []
        for i, (cell, column) in enumerate(zip(cells, self.columns)):
            width, spec = column[1], (column[2] if len(column) > 2 else "")
            text = cell if isinstance(cell, str) else format(cell, spec)
            parts.append(text.ljust(width) if i == 0 and self.left else text.rjust(width))
        return " | ".join(parts)


def int_list(text: str, flag: str) -> list[int]:
    """A comma-separated flag's positive integers, e.g. int_list("1,64", "batch") -> [1, 64]."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"--{flag} must list positive integers, got {text!r}")
    return values


def write_json(path: str | Path, payload: Any) -> Path:
    """Writes payload as indented JSON, creating the folder; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return out
