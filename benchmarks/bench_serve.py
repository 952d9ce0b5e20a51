"""Serving: queries/s and latency of `reco serve` under 64 concurrent clients, with dynamic
batching on (--max-batch 64), off (--max-batch 1), and a plain per-request faiss IndexFlatIP
server in the same framework (a small Starlette app below), in one run on one memory.

Each server is a real uvicorn subprocess; the clients are httpx.AsyncClient tasks in this
process, each sending its next query as soon as the last is answered (a closed loop), for
--duration seconds after --warmup. Queries are random unit vectors (precomputed JSON bodies),
k = 10, no filter; every server answers with rows, ids, scores and metadata.

    python benchmarks/bench_serve.py                      # N = 1e6, d = 512 (minutes)
    python benchmarks/bench_serve.py --n 100000 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

try:
    from . import common  # python -m benchmarks.bench_serve
except ImportError:  # python benchmarks/bench_serve.py
    import common


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=20.0, help="seconds measured per server")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--servers", default="batched,unbatched,faiss")
    p.add_argument("--memory", help="reuse this memory folder (default: a fresh one in /tmp)")
    p.add_argument("--json", help="output (default: benchmarks/results/bench_serve.json)")
    p.add_argument("--faiss-server", help=argparse.SUPPRESS)  # internal: serve MEM with faiss
    return p.parse_args(argv)


def build_memory(path: Path, n: int, d: int, seed: int = 0) -> None:
    """n random unit vectors (float16 image embeddings) with captions, in 2^18-row shards."""
    from reco.memory import EncoderInfo, MemoryWriter, ModalityInfo

    rng = np.random.default_rng(seed)
    mods = {"image": ModalityInfo(d, "float16", EncoderInfo("random"))}
    step = 1 << 16
    with MemoryWriter(path, mods, shard_rows=1 << 18) as w:
        for start in range(0, n, step):
            m = min(step, n - start)
            x = rng.standard_normal((m, d), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            w.add({"image": x}, metadata={"caption": [f"item {start + i}" for i in range(m)]})


# -- the faiss server (a subprocess of this script) ----------------------------------------------
def faiss_server(mem_path: str) -> None:
    """Per-request faiss.IndexFlatIP search behind the same JSON contract, in Starlette.

    Made fair for concurrent requests: each search is single-threaded and at most
    os.cpu_count() run at once (anyio threads under a CapacityLimiter), so the cores are used
    one search each. Single-threaded through OMP_NUM_THREADS=1 in the process's environment
    (main() starts it so): omp_set_num_threads(1) sets the calling thread's count only, and
    the worker threads would each still fork an OpenMP team of every core. Left as faiss's
    default (64 concurrent searches, each with OpenMP threads on every core) the server
    oversubscribed the 2 cores so badly that it answered nothing inside a 20 s window."""
    import anyio
    import faiss
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from reco.memory import Memory

    mem = Memory.open(mem_path)
    keys = mem.keys("image")
    index = faiss.IndexFlatIP(keys.dim)
    for t in keys.shards:
        index.add(np.ascontiguousarray(t.float().numpy()))
    ids = mem.ids.numpy()
    faiss.omp_set_num_threads(1)
    limiter = anyio.CapacityLimiter(os.cpu_count() or 1)

    async def search(request: Request) -> JSONResponse:
        body = json.loads(await request.body())
        q = np.asarray(body["embedding"], dtype=np.float32)[None]
        k = int(body.get("k", 10))
        scores, rows = await anyio.to_thread.run_sync(index.search, q, k, limiter=limiter)
        rows, scores = rows[0].tolist(), scores[0].tolist()
        meta = mem.metadata(rows)
        results = [
            {"row": r, "id": int(ids[r]), "score": s, "metadata": m}
            for r, s, m in zip(rows, scores, meta)
        ]
        return JSONResponse({"results": results})

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    app = Starlette(routes=[Route("/search", search, methods=["POST"]), Route("/healthz", healthz)])
    from reco.serve.server import bind

    sock = bind("127.0.0.1", 0)
    print(f"listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


# -- clients ---------------------------------------------------------------------------------
def start(cmd: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, **(env or {})}
    p = subprocess.Popen(cmd, cwd=tempfile.gettempdir(), stdout=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline()
    if "listening on" not in line:
        p.kill()
        raise SystemExit(f"the server did not start: {cmd}")
    url = line.split("listening on ")[1].strip()
    import httpx

    for _ in range(6000):  # an index over 1e6 rows may take a while to build
        try:
            if httpx.get(url + "/healthz", timeout=10).status_code == 200:
                return p, url
        except httpx.TransportError:
            time.sleep(0.1)
    p.kill()
    raise SystemExit(f"the server never answered /healthz: {cmd}")


def load(url: str, bodies: list[bytes], clients: int, warmup: float, duration: float) -> dict:
    """Closed-loop load: (queries/s, latency percentiles, status counts) over the window."""
    import httpx

    lat: list[float] = []
    codes: dict[int, int] = {}
    t0 = time.monotonic()
    begin, end = t0 + warmup, t0 + warmup + duration

    async def one(i: int) -> None:
        # One client (one connection) per task: a shared pool serialises 64 tasks on its lock.
        # TCP_NODELAY: httpcore writes headers and body apart, which Nagle's algorithm and the
        # server's delayed ACK would hold back by 40 ms.
        nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        transport = httpx.AsyncHTTPTransport(socket_options=nodelay)
        headers = {"content-type": "application/json"}
        async with httpx.AsyncClient(timeout=120, transport=transport, headers=headers) as c:
            await loop(c, i)

    async def loop(c: httpx.AsyncClient, i: int) -> None:
        j = i
        while time.monotonic() < end:
            j = (j + clients) % len(bodies)
            s = time.monotonic()
            r = await c.post(url + "/search", content=bodies[j])
            e = time.monotonic()
            if s >= begin and e <= end:
                lat.append(e - s)
                codes[r.status_code] = codes.get(r.status_code, 0) + 1

    async def run() -> None:
        await asyncio.gather(*(one(i) for i in range(clients)))

    asyncio.run(run())
    lat.sort()
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [float("nan")] * 99
    return {
        "queries": len(lat),
        "qps": len(lat) / duration,
        "p50_ms": 1e3 * q[49],
        "p99_ms": 1e3 * q[98],
        "mean_ms": 1e3 * statistics.fmean(lat) if lat else float("nan"),
        "status": {str(k): v for k, v in sorted(codes.items())},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.faiss_server:
        faiss_server(args.faiss_server)
        return 0
    tmp = None
    if args.memory:
        mem = Path(args.memory)
        if not (mem / "manifest.json").exists():
            build_memory(mem, args.n, args.d)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
        mem = tmp / "mem"
        t = time.perf_counter()
        build_memory(mem, args.n, args.d)
        print(f"memory: {args.n} x {args.d} float16 in {time.perf_counter() - t:.0f} s")
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((256, args.d), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    bodies = [json.dumps({"embedding": q.tolist(), "k": args.k}).encode() for q in queries]
    reco_cmd = [sys.executable, "-m", "reco.cli", "serve", str(mem), "--port", "0"]
    commands = {
        "batched": [*reco_cmd, "--max-batch", "64", "--max-wait-ms", str(args.max_wait_ms)],
        "unbatched": [*reco_cmd, "--max-batch", "1"],
        "faiss": [sys.executable, str(Path(__file__).resolve()), "--faiss-server", str(mem)],
    }
    results: dict[str, Any] = {}
    table = common.Table(
        [("server", 10), ("q/s", 8, ".1f"), ("p50 ms", 8, ".0f"), ("p99 ms", 8, ".0f"),
         ("queries", 8, "d"), ("status", 12)], left=True, rule=True,
    )  # fmt: skip
    print(f"N = {args.n}, d = {args.d}, k = {args.k}, {args.clients} clients, {args.duration} s")
    print(table.header())
    try:
        for name in args.servers.split(","):
            p, url = start(commands[name], {"OMP_NUM_THREADS": "1"} if name == "faiss" else None)
            try:
                r = load(url, bodies, args.clients, args.warmup, args.duration)
            finally:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
            results[name] = r
            status = ",".join(f"{k}:{v}" for k, v in r["status"].items())
            print(table.row(name, r["qps"], r["p50_ms"], r["p99_ms"], r["queries"], status))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    ratios: dict[str, float | None] = {}
    for other in ("unbatched", "faiss"):
        if "batched" in results and other in results:
            # None: the other server finished no query inside the window (all took longer).
            qps = results[other]["qps"]
            ratios[f"batched_over_{other}_qps"] = results["batched"]["qps"] / qps if qps else None
    for key, value in ratios.items():
        print(
            f"{key}: "
            + ("n/a (no query answered in the window)" if value is None else f"{value:.2f}x")
        )
    out = common.write_json(
        args.json or common.RESULTS / "bench_serve.json",
        {
            "machine": common.machine_info(),
            "config": {k: v for k, v in vars(args).items() if k != "faiss_server"},
            "results": results,
            "ratios": ratios,
        },
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
