"""reco.datasets: IDX files, long-tailed splits, generated captions."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from reco.datasets import (
    DEBIAN_FASHION_MNIST,
    FASHION_MNIST_CLASSES,
    FASHION_SYNONYMS,
    CaptionNoise,
    exponential_profile,
    generate_captions,
    load_idx_dataset,
    long_tail_split,
    read_idx,
)


def _write_idx(path, array, gz):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    head = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    data = head + array.tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    imgs = {
        s: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        for s, n in (("train", 12), ("t10k", 5))
    }
    labs = {s: rng.integers(0, 10, len(imgs[s])).astype(np.uint8) for s in imgs}
    for s in imgs:
        _write_idx(tmp_path / f"{s}-images-idx3-ubyte{suffix}", imgs[s], gz)
        _write_idx(tmp_path / f"{s}-labels-idx1-ubyte{suffix}", labs[s], gz)
    xtr, ytr, xte, yte = load_idx_dataset(tmp_path)
    np.testing.assert_array_equal(xtr, imgs["train"])
    np.testing.assert_array_equal(yte, labs["t10k"].astype(np.int64))
    assert ytr.dtype == np.int64 and xte.shape == (5, 28, 28)
    big = np.arange(6, dtype=">i4").reshape(2, 3)
    _write_idx(tmp_path / "ints", big, False)
    np.testing.assert_array_equal(read_idx(tmp_path / "ints"), big)


def test_idx_errors(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="is not an IDX file"):
        read_idx(tmp_path / "bad")
    _write_idx(tmp_path / "short", np.zeros((4, 3), np.uint8), False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-2])
    with pytest.raises(ValueError, match="10 values for dims"):
        read_idx(tmp_path / "short")
    with pytest.raises(FileNotFoundError, match="has no train-images-idx3-ubyte"):
        load_idx_dataset(tmp_path)


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    xtr, ytr, xte, yte = load_idx_dataset()
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28)
    assert np.bincount(ytr).tolist() == [6000] * 10 and np.bincount(yte).tolist() == [1000] * 10
    assert len(FASHION_MNIST_CLASSES) == 10 and 0 < xtr.mean() < 255


def test_exponential_profile_matches_the_issue():
    assert exponential_profile(10, 1000, 200) == [1000, 555, 308, 171, 95, 53, 29, 16, 9, 5]
    with pytest.raises(ValueError):
        exponential_profile(1)


def test_long_tail_split():
    labels = np.repeat(np.arange(10), 1200)
    profile = exponential_profile(10, 1000, 200)
    subset, rest, counts = long_tail_split(labels, profile, seed=3)
    assert sorted(counts.tolist(), reverse=True) == profile
    assert np.bincount(labels[subset], minlength=10).tolist() == counts.tolist()
    assert len(np.intersect1d(subset, rest)) == 0 and len(subset) + len(rest) == len(labels)
    _other, _, counts2 = long_tail_split(labels, profile, seed=4)
    assert counts2.tolist() != counts.tolist()  # the seed shuffles which class is the head
    with pytest.raises(ValueError, match="asks 1000"):
        long_tail_split(np.repeat(np.arange(10), 50), profile)


def test_captions_and_noise():
    labels = np.repeat(np.arange(10), 300)
    names = list(FASHION_MNIST_CLASSES)
    caps, kind = generate_captions(
        labels, names, FASHION_SYNONYMS, CaptionNoise(0.25, 0.25), seed=1
    )
    assert (
        len(caps) == 3000
        and abs((kind == 1).mean() - 0.25) < 0.03
        and abs((kind == 2).mean() - 0.25) < 0.03
    )

    def names_class(caption, c):
        return any(w in caption for w in FASHION_SYNONYMS[names[c]])

    clean = kind == 0
    assert all(names_class(caps[i], labels[i]) for i in np.flatnonzero(clean))
    # A wrong caption names another class (synonyms may overlap textually, e.g. "shirt").
    wrong = np.flatnonzero(kind == 1)
    assert np.mean([not names_class(caps[i], labels[i]) for i in wrong]) > 0.8
    again, _ = generate_captions(labels, names, FASHION_SYNONYMS, CaptionNoise(0.25, 0.25), seed=1)
    assert again == caps
    with pytest.raises(ValueError, match="sum to <= 1"):
        CaptionNoise(0.7, 0.5)
