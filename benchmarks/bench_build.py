"""Benchmark building a memory from images: decoding workers, per-row costs, distributed exits.

1. `workers`: rows/s of build_from_items from generated JPEGs with a real image encoder
   (EfficientNet-Lite0, at one or more resolutions) and MiniLM for captions, with 0, 1, 2, ...
   DataLoader workers, the settings alternated within each repeat. Also the two rates that bound
   it, measured alone: decoding (read + decode + resize, one process) and encoding (the encoders
   on ready batches, in this process).
2. `costs`: per-row encode time of open_clip architectures on this CPU (random weights: the cost
   of a forward pass does not depend on the weights), and of decoding one JPEG.
3. `distributed`: runs a K-rank gloo `reco build-memory --distributed` under torchrun R times on
   a small generated set and counts the runs in which every rank exited 0.
4. `model`: the scale model (build and search of 1e8 and 2e9 rows) from 1-2's JSON and the
   published figures in PUBLISHED.

    python benchmarks/bench_build.py workers --images 384 --workers 0,1,2 --resolutions 224,96
    python benchmarks/bench_build.py costs --models RN50,ViT-B-32,ViT-B-16,ViT-L-14
    python benchmarks/bench_build.py distributed --runs 20 --ranks 3
    python benchmarks/bench_build.py model    # the scale model, from the JSON of the others

Prints tables and writes JSON (machine, config, results).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from reco import ingest
from reco.encoders import efficientnet_lite0, minilm

try:
    from . import common  # python -m benchmarks.bench_build
except ImportError:  # python benchmarks/bench_build.py
    import common

CLASSES = ("alpha", "beta", "gamma", "delta")


def make_jpegs(root: Path, n: int, width: int, height: int, seed: int = 0) -> None:
    """n JPEGs (quality 90) in an ImageFolder tree: smooth colour fields plus fine noise, so that
    they compress and decode like photos (tens of KB at 512 x 384), not like white noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        coarse = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
        im = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        a = np.asarray(im, np.int16) + rng.integers(-12, 13, (height, width, 3))
        folder = root / CLASSES[i % len(CLASSES)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(
            folder / f"{i:06d}.jpg", quality=90
        )


def _decode_rate(items, transform, batch: int) -> float:
    """Rows/s of reading, decoding and preprocessing alone, in this process."""
    t0 = time.perf_counter()
    rows = 0
    part = ingest.Partition(0, 1, batch)
    for piece in ingest.build._pieces(items, 0, part):
        rows += len(ingest.build._decode_piece(piece, transform)["records"])
    return rows / (time.perf_counter() - t0)


def _encode_rate(items, image_enc, text_enc, batch: int) -> float:
    """Rows/s of the encoders alone (on batches decoded beforehand), in this process."""
    part = ingest.Partition(0, 1, batch)
    pieces = [
        ingest.build._decode_piece(p, image_enc.image_transform)
        for p in ingest.build._pieces(items, 0, part)
    ]
    t0 = time.perf_counter()
    rows = 0
    for piece in pieces:
        image_enc.encode_image_batch(piece["images"])
        text_enc.encode_texts([r.caption for r in piece["records"]])
        rows += len(piece["records"])
    return rows / (time.perf_counter() - t0)


def run_workers(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench_build_"))
    out: dict = {"rows": [], "bounds": []}
    try:
        width, height = (int(v) for v in args.size.split("x"))
        make_jpegs(tmp / "src", args.images, width, height)
        items = ingest.iter_image_folder(tmp / "src")
        text_enc = minilm(device="cpu")
        table = common.Table(
            [("encoder", 22), ("workers", 7), ("rows/s", 8, ".1f"), ("vs 0", 6, ".2f")], left=True
        )
        bounds = common.Table(
            [("encoder", 22), ("decode rows/s (1 proc)", 22, ".1f"), ("encode rows/s", 13, ".1f")],
            left=True,
        )
        for res in common.int_list(args.resolutions, "--resolutions"):
            image_enc = efficientnet_lite0(resolution=res, device="cpu")
            name = image_enc.name
            dec = _decode_rate(items, image_enc.image_transform, args.batch_size)
            enc = _encode_rate(items, image_enc, text_enc, args.batch_size)
            out["bounds"].append({"encoder": name, "decode_rows_s": dec, "encode_rows_s": enc})
            settings = [int(v) for v in args.workers.split(",")]  # 0: in process
            rates: dict[int, list[float]] = {w: [] for w in settings}
            for _ in range(args.repeats):
                for w in rates:
                    folder = tmp / f"mem-{res}-{w}"
                    shutil.rmtree(folder, ignore_errors=True)
                    t0 = time.perf_counter()
                    report = ingest.build_from_items(
                        folder,
                        items,
                        image_encoder=image_enc,
                        text_encoder=text_enc,
                        label_names=list(items.label_names or []),
                        batch_size=args.batch_size,
                        workers=w,
                        progress_bar=False,
                    )
                    rates[w].append(report.rows / (time.perf_counter() - t0))
            if "bytes_per_row" not in out:  # the memory's files, per row (by file name)
                folder = tmp / f"mem-{res}-{min(rates)}"
                sizes: dict[str, int] = {}
                for f in folder.rglob("*"):
                    if f.is_file() and "shards" in f.parts:
                        sizes[f.name] = sizes.get(f.name, 0) + f.stat().st_size
                out["bytes_per_row"] = {k: v / report.rows for k, v in sorted(sizes.items())}
                out["caption_chars"] = float(np.mean([len(it.caption or "") for it in items]))
            print(bounds.header())
            print(bounds.row(name, dec, enc))
            print(table.header())
            base = float(np.median(rates[min(rates)]))
            for w, r in rates.items():
                med = float(np.median(r))
                out["rows"].append({"encoder": name, "workers": w, "rows_s": med, "runs": r})
                print(table.row(name, str(w), med, med / base))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def run_costs(args: argparse.Namespace) -> dict:
    import warnings

    from reco.encoders import OpenCLIPEncoder

    table = common.Table(
        [("model", 14), ("ms/image", 9, ".1f"), ("ms/caption", 10, ".2f"), ("dim", 5)], left=True
    )
    print(table.header())
    rows = []
    for model in args.models.split(","):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enc = OpenCLIPEncoder(
                model, device="cpu", batch_size=args.batch_size, allow_random_weights=True
            )
        size = enc.model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        x = torch.randn(args.batch_size, 3, size, size)
        texts = [
            f"a photo of a thing number {i}, seen from the side" for i in range(args.batch_size)
        ]
        enc.encode_image_batch(x[:2])  # warm-up
        img = common.time_runs(lambda e=enc, x=x: e.encode_image_batch(x), args.repeats, warmup=0)
        txt = common.time_runs(lambda e=enc, t=texts: e.encode_texts(t), args.repeats, warmup=1)
        r = {
            "model": model,
            "ms_per_image": img.median_ms / args.batch_size,
            "ms_per_caption": txt.median_ms / args.batch_size,
            "dim": enc.dim,
        }
        rows.append(r)
        print(table.row(model, r["ms_per_image"], r["ms_per_caption"], str(enc.dim)))
    decode = []
    for size in args.sizes.split(","):
        tmp = Path(tempfile.mkdtemp(prefix="bench_decode_"))
        try:
            width, height = (int(v) for v in size.split("x"))
            make_jpegs(tmp, 64, width, height, seed=1)
            data = [f.read_bytes() for f in sorted(tmp.rglob("*.jpg"))]

            def run(data=data) -> None:
                for d in data:
                    ingest.build._load_image(d).resize((224, 224))

            per = common.time_runs(run, args.repeats, warmup=1).median_ms / len(data)
            kb = float(np.mean([len(d) for d in data])) / 1024
            print(f"decode + resize to 224 of a {size} JPEG ({kb:.0f} KB), 1 core: {per:.2f} ms")
            decode.append({"size": size, "jpeg_kb": kb, "ms_per_image": per})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"encode": rows, "decode": decode, "threads": torch.get_num_threads()}


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def run_distributed(args: argparse.Namespace) -> dict:
    import open_clip

    tmp = Path(tempfile.mkdtemp(prefix="bench_dist_"))
    codes: list[list[int]] = []
    times: list[float] = []
    try:
        make_jpegs(tmp / "src", args.images, 48, 40)
        config = tmp / "bench-tiny-clip.json"
        config.write_text(json.dumps(TINY_CLIP))
        open_clip.add_model_config(config)
        torch.manual_seed(0)
        weights = tmp / "tiny.pt"
        torch.save({"state_dict": open_clip.create_model("bench-tiny-clip").state_dict()}, weights)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for run in range(args.runs):
            out = tmp / f"mem{run}"
            logs = tmp / f"logs{run}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                   str(args.ranks), "--log-dir", str(logs), "--redirects", "3",
                   "-m", "reco", "build-memory", str(out), "--image-folder", str(tmp / "src"),
                   "--model", "bench-tiny-clip", "--pretrained", str(weights), "--model-config",
                   str(config), "--batch-size", "4", "--workers", "1", "--no-progress",
                   "--distributed"]  # fmt: skip
            t0 = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            times.append(time.perf_counter() - t0)
            rank_codes = []
            for r in range(args.ranks):
                found = list(logs.rglob(f"attempt_0/{r}/error.json"))
                rank_codes.append(1 if found else 0)
            codes.append([res.returncode, *rank_codes])
            ok = res.returncode == 0 and not any(rank_codes)
            print(f"run {run + 1}: torchrun exit {res.returncode}, {times[-1]:.1f} s"
                  + ("" if ok else f"\n{res.stderr[-2000:]}"))  # fmt: skip
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    passed = sum(1 for c in codes if not any(c))
    print(f"{passed} of {args.runs} {args.ranks}-rank distributed builds exited 0 on every rank")
    return {"runs": args.runs, "ranks": args.ranks, "passed": passed, "codes": codes,
            "seconds": times}  # fmt: skip


# Figures from elsewhere, for the scale model (each with its source).
PUBLISHED = {
    # open_clip docs/model_profile.csv: GFLOP per image + text (image, text), 224 px, 77 tokens.
    "gflop": {"ViT-B-32": (8.82, 5.96), "ViT-B-16": (35.13, 5.96), "ViT-L-14": (162.03, 13.3)},
    "dim": {"ViT-B-32": 512, "ViT-B-16": 512, "ViT-L-14": 768},
    # clip-retrieval README: clip inference of ViT-B/32 (image + text) at 1400 samples/s on
    # one RTX 3080, whose dense fp16 tensor peak with fp32 accumulation is 59.5 TFLOP/s (NVIDIA
    # GA102 whitepaper).
    "rtx3080_pairs_s": 1400,
    "rtx3080_tflops": 59.5,
    # NVIDIA H100 SXM datasheet: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, 80 GB.
    "h100_tflops": 989.0,
    "h100_tb_s": 3.35,
    "h100_gb": 80,
}


def run_model(args: argparse.Namespace) -> dict:
    """The scale model: build and search of 1e8 and 2e9 rows, from the JSON that `costs` and
    `workers` wrote (measured here) and PUBLISHED (measured elsewhere)."""
    costs = json.loads(Path(args.costs).read_text())["results"]
    workers = json.loads(Path(args.workers_json).read_text())["results"]
    pub = PUBLISHED
    # The fraction of its peak the published 3080 run reached, assumed on an H100 as well.
    eff = pub["rtx3080_pairs_s"] * sum(pub["gflop"]["ViT-B-32"]) / 1e3 / pub["rtx3080_tflops"]
    decode = {d["size"]: d["ms_per_image"] for d in costs["decode"]}
    cpu = {e["model"]: e["ms_per_image"] + e["ms_per_caption"] for e in costs["encode"]}
    meta = sum(v for k, v in workers["bytes_per_row"].items() if k.endswith(".parquet"))
    out: dict = {"efficiency": eff, "build": [], "store": []}
    print(f"assumed H100 efficiency (the published 3080 run's): {eff:.1%} of peak")
    build = common.Table(
        [("rows", 5), ("model", 9), ("H100 pairs/s", 12, ".0f"), ("GPU-hours", 9, ".1f"),
         ("h on 8 GPUs", 11, ".1f"), ("h on 64 GPUs", 12, ".2f"),
         ("decode cores/GPU", 16, ".1f"), ("CPU core-years", 14, ".1f")], left=True)  # fmt: skip
    print(build.header())
    for rows in (1e8, 2e9):
        for model in ("ViT-B-32", "ViT-L-14"):
            rate = eff * pub["h100_tflops"] * 1e3 / sum(pub["gflop"][model])
            hours = rows / rate / 3600
            cores = rate * decode["256x256"] / 1e3  # img2dataset's 256 px JPEGs
            core_years = rows * cpu[model] * costs["threads"] / 1e3 / 3600 / 24 / 365
            r = {"rows": rows, "model": model, "h100_pairs_s": rate, "gpu_hours": hours,
                 "decode_cores_per_gpu": cores, "cpu_core_years": core_years}  # fmt: skip
            out["build"].append(r)
            print(build.row(f"{rows:.0e}", model, rate, hours, hours / 8, hours / 64, cores,
                            core_years))  # fmt: skip
    store = common.Table(
        [("rows", 5), ("d", 4), ("disk fp16 GB", 12, ".0f"), ("keys fp16 GB", 12, ".0f"),
         ("keys int8 GB", 12, ".0f"), ("H100s fp16", 10, ".0f"), ("scan ms", 8, ".0f"),
         ("VM scan s", 9, ".0f")], left=True)  # fmt: skip
    print(store.header())
    for rows in (1e8, 2e9):
        for d in (512, 768):
            keys16, keys8 = rows * d * 2 / 1e9, rows * (d + 4) / 1e9
            disk = rows * (4 * d + 8 + meta) / 1e9  # image + text fp16, ids, metadata
            gpus = np.ceil(keys16 / (0.8 * pub["h100_gb"]))  # a fifth of HBM left for the rest
            scan_ms = keys16 / gpus / pub["h100_tb_s"]  # GB / (TB/s) = ms, shards in parallel
            vm_s = keys16 / args.read_gb_s
            r = {"rows": rows, "d": d, "disk_fp16_gb": disk, "keys_fp16_gb": keys16,
                 "keys_int8_gb": keys8, "h100s_fp16": gpus, "scan_ms": scan_ms,
                 "vm_scan_s": vm_s}  # fmt: skip
            out["store"].append(r)
            print(store.row(f"{rows:.0e}", str(d), disk, keys16, keys8, gpus, scan_ms, vm_s))
    out["metadata_bytes_per_row"] = meta
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    w = sub.add_parser("workers")
    w.add_argument("--images", type=int, default=384)
    w.add_argument("--size", default="512x384", help="JPEG width x height")
    w.add_argument("--workers", default="0,1,2")
    w.add_argument("--resolutions", default="224,96", help="EfficientNet-Lite0 input sizes")
    w.add_argument("--batch-size", type=int, default=64)
    w.add_argument("--repeats", type=int, default=2)
    c = sub.add_parser("costs")
    c.add_argument("--models", default="RN50,ViT-B-32,ViT-B-16,ViT-L-14")
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--sizes", default="256x256,512x384", help="JPEG sizes to decode")
    d = sub.add_parser("distributed")
    d.add_argument("--runs", type=int, default=20)
    d.add_argument("--ranks", type=int, default=3)
    d.add_argument("--images", type=int, default=30)
    m = sub.add_parser("model")
    m.add_argument("--costs", default=str(common.RESULTS / "build_costs.json"))
    m.add_argument("--workers-json", default=str(common.RESULTS / "build_workers.json"))
    m.add_argument(
        "--read-gb-s", type=float, default=31.0, help="key read rate here (bench_retrieve B=1)"
    )
    for s in (w, c, d, m):
        s.add_argument("--out", help="JSON path (default benchmarks/results/build_<what>.json)")
    args = p.parse_args()
    fn = {"workers": run_workers, "costs": run_costs, "distributed": run_distributed,
          "model": run_model}[args.what]  # fmt: skip
    t0 = time.time()
    results = fn(args)
    doc = {
        "machine": common.machine_info(),
        "load_before": os.getloadavg(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
        "wall_s": time.time() - t0,
    }
    path = Path(args.out) if args.out else common.RESULTS / f"build_{args.what}.json"
    common.write_json(path, doc)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
