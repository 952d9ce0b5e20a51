"""Image datasets that ship with packages: Fashion-MNIST (IDX files, e.g. Debian's
dataset-fashion-mnist) and MNIST digits in any folder holding the four standard IDX files."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

# Where Debian's dataset-fashion-mnist package puts the files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (optionally .gz) as an array: magic 0x0000 <dtype> <ndim>, big-endian dims."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        head = f.read(4)
        if len(head) != 4 or head[:2] != b"\x00\x00" or head[2] not in _DTYPES:
            raise ValueError(f"{path} is not an IDX file (magic {head!r})")
        ndim = head[3]
        dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
        data = np.frombuffer(f.read(), dtype=_DTYPES[head[2]])
    expected = int(np.prod(dims))
    if data.size != expected:
        raise ValueError(f"{path}: {data.size} values for dims {dims} ({expected} expected)")
    return data.reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} has no {stem}[.gz] (the standard IDX file names)")


def load_idx_dataset(
    folder: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_images [n, 28, 28] uint8, train_labels [n] int64, test_images, test_labels) from a
    folder holding train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and
    t10k-labels-idx1-ubyte (each optionally .gz). Default: Debian's Fashion-MNIST."""
    folder = Path(folder) if folder is not None else DEBIAN_FASHION_MNIST
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} does not exist (install Debian's dataset-fashion-mnist, or pass a folder "
            "with the four IDX files)"
        )
    out = []
    for split in ("train", "t10k"):
        images = read_idx(_find(folder, f"{split}-images-idx3-ubyte"))
        labels = read_idx(_find(folder, f"{split}-labels-idx1-ubyte")).astype(np.int64)
        if images.ndim != 3 or labels.shape != (images.shape[0],):
            raise ValueError(f"{folder}: {split} images {images.shape} and labels {labels.shape}")
        out += [images, labels]
    return out[0], out[1], out[2], out[3]
