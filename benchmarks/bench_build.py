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

    python benchmarks/bench_build.py workers --images 384 --workers 0,1,2 --resolutions 224,96
    python benchmarks/bench_build.py costs --models RN50,ViT-B-32,ViT-B-16,ViT-L-14
    python benchmarks/bench_build.py distributed --runs 20 --ranks 3

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
    tmp = Path(tempfile.mkdtemp(prefix="bench_decode_"))
    try:
        width, height = (int(v) for v in args.size.split("x"))
        make_jpegs(tmp, 64, width, height, seed=1)
        files = sorted(tmp.rglob("*.jpg"))
        data = [f.read_bytes() for f in files]

        def decode() -> None:
            for d in data:
                im = ingest.build._load_image(d)
                im.resize((224, 224))

        dec = common.time_runs(decode, args.repeats, warmup=1)
        per = dec.median_ms / len(data)
        kb = float(np.mean([len(d) for d in data])) / 1024
        print(f"decode + resize to 224 of a {args.size} JPEG ({kb:.0f} KB): {per:.2f} ms")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"encode": rows, "decode_ms_per_image": per, "jpeg_kb": kb, "jpeg_size": args.size}


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
    c.add_argument("--size", default="512x384")
    d = sub.add_parser("distributed")
    d.add_argument("--runs", type=int, default=20)
    d.add_argument("--ranks", type=int, default=3)
    d.add_argument("--images", type=int, default=30)
    for s in (w, c, d):
        s.add_argument("--out", help="JSON path (default benchmarks/results/build_<what>.json)")
    args = p.parse_args()
    fn = {"workers": run_workers, "costs": run_costs, "distributed": run_distributed}[args.what]
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
