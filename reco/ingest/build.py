"""Building a memory from source items: images and captions encoded, resumably."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..encoders import Encoder
from ..memory.manifest import ModalityInfo
from ..memory.store import MemoryWriter
from .dedup import NearDuplicateFilter, _committed_column
from .sources import ItemSource, RawItem, _check_count, _check_dtype, _check_label_names

log = logging.getLogger(__name__)


@dataclass
class BuildReport:
    rows: int = 0  # rows in the memory after the build
    added: int = 0  # rows this run added
    resumed_from: int = 0  # source items already consumed by earlier runs
    unreadable: int = 0
    empty_caption: int = 0
    missing_caption: int = 0  # items whose source has no caption for them (no .txt)
    duplicates: int = 0
    near_duplicates: int = 0
    skipped_sources: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.rows} rows ({self.added} added this run, resumed after {self.resumed_from} "
            f"source items); skipped: {self.unreadable} unreadable, {self.empty_caption} empty "
            f"captions, {self.missing_caption} without a caption, {self.duplicates} exact "
            f"duplicates, {self.near_duplicates} near-duplicates"
        )


def _load_image(data: bytes):
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.load()
    return im.convert("RGB")


def build_from_items(
    out: str | os.PathLike,
    items: Iterable[RawItem],
    *,
    image_encoder: Encoder,
    text_encoder: Encoder | None = None,
    label_names: Sequence[str] | None = None,
    dtype: str = "float16",
    batch_size: int = 256,
    shard_rows: int = 1 << 16,
    dedup: bool = True,
    near_duplicates: NearDuplicateFilter | None = None,
    source: dict[str, Any] | None = None,
    append: bool = False,
    progress_bar: bool = True,
) -> BuildReport:
    """Encodes images and captions into a memory at `out` (created, or resumed if it exists).

    The image encoder embeds images, the text encoder (default: the same model) captions. With
    label_names, items carry labels (their label_name's index); an item without a label, or with
    an unknown one, is an error. `source` identifies the items (default: items.source, for an
    ItemSource); a memory resumes only from the source it records. append=True adds another
    source's rows to an existing memory, reading that source from its first item (with dedup,
    images already in the memory are dropped as exact duplicates).
    """
    _check_count("batch_size", batch_size)
    _check_count("shard_rows", shard_rows)
    _check_dtype(dtype)
    text_encoder = text_encoder or image_encoder
    if "image" not in image_encoder.modalities or "text" not in text_encoder.modalities:
        raise ValueError("image_encoder must encode images and text_encoder texts")
    if label_names is not None:
        label_names = _check_label_names(label_names)
    if near_duplicates is not None:
        near_duplicates.check_dim(image_encoder.dim)
    if source is None and isinstance(items, ItemSource):
        source = items.source
    modalities = {
        "image": ModalityInfo(image_encoder.dim, dtype, image_encoder.info()),
        "text": ModalityInfo(text_encoder.dim, dtype, text_encoder.info()),
    }
    label_index = {n: i for i, n in enumerate(label_names)} if label_names is not None else None
    writer = MemoryWriter(
        out,
        modalities,
        has_labels=label_index is not None,
        label_names=label_names,
        shard_rows=shard_rows,
        source=source,
        append=append,
    )
    report = BuildReport()
    with writer:
        consumed = int(writer.progress.get("consumed", 0))
        report.resumed_from = consumed
        counts = writer.progress.get("skipped", {})
        report.unreadable = int(counts.get("unreadable", 0))
        report.empty_caption = int(counts.get("empty_caption", 0))
        report.missing_caption = int(counts.get("missing_caption", 0))
        report.duplicates = int(counts.get("duplicates", 0))
        report.near_duplicates = int(counts.get("near_duplicates", 0))
        seen = set(_committed_column(Path(out), "image_sha256")) if dedup and writer.rows else set()
        start_rows = writer.rows
        it = iter(items)
        for _ in range(consumed):  # the source order is fixed: skip what earlier runs committed
            next(it, None)
        bar = _progress(progress_bar, initial=consumed)
        batch: list[tuple[RawItem, Any, str]] = []

        def flush() -> None:
            if not batch:
                writer.set_progress(_progress_state(consumed, report))
                return
            images = [im for _, im, _ in batch]
            img = image_encoder.encode_images(images)
            txt = text_encoder.encode_texts([it.caption for it, _, _ in batch])
            keep = torch.ones(len(batch), dtype=torch.bool)
            if near_duplicates is not None:
                keep = near_duplicates.keep(img)
                report.near_duplicates += int((~keep).sum())
            sel = keep.nonzero().squeeze(1)
            kept = [batch[i] for i in sel.tolist()]
            labels = None
            if label_index is not None:
                labels = np.array([label_index[it.label_name] for it, _, _ in kept], dtype=np.int64)
            writer.add(
                {"image": img[sel], "text": txt[sel]},
                labels=labels,
                metadata={
                    "caption": [it.caption for it, _, _ in kept],
                    "source": [it.source for it, _, _ in kept],
                    "label_name": [it.label_name for it, _, _ in kept],
                    "image_sha256": [h for _, _, h in kept],
                },
                progress=_progress_state(consumed, report),
            )
            batch.clear()

        for item in it:
            consumed += 1
            bar.update(1)
            if item.caption is None:
                report.missing_caption += 1
                log.warning("skipping %s: no caption", item.source)
                continue
            if not item.caption.strip():
                report.empty_caption += 1
                log.warning("skipping %s: empty caption", item.source)
                continue
            if label_index is not None:
                if item.label_name is None:
                    raise ValueError(
                        f"{item.source} has no label (the memory has label names: every item "
                        "needs one)"
                    )
                if item.label_name not in label_index:
                    raise ValueError(
                        f"{item.source}: label {item.label_name!r} is not one of the label_names"
                    )
            try:
                data = item.read_image()
                image = _load_image(data)
            except Exception as e:  # any unreadable or undecodable image is skipped, never fatal
                report.unreadable += 1
                log.warning("skipping %s: unreadable image (%s)", item.source, e)
                continue
            digest = hashlib.sha256(data).hexdigest()
            if dedup:
                if digest in seen:
                    report.duplicates += 1
                    continue
                seen.add(digest)
            batch.append((item, image, digest))
            if len(batch) >= batch_size:
                flush()
        flush()
        bar.close()
    report.rows = writer.rows
    report.added = writer.rows - start_rows
    log.info("memory %s: %s", out, report.summary())
    return report


def _progress_state(consumed: int, report: BuildReport) -> dict[str, Any]:
    return {
        "consumed": consumed,
        "skipped": {
            "unreadable": report.unreadable,
            "empty_caption": report.empty_caption,
            "missing_caption": report.missing_caption,
            "duplicates": report.duplicates,
            "near_duplicates": report.near_duplicates,
        },
    }


def _progress(enabled: bool, initial: int = 0):
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if not enabled:

        class _Null:
            def update(self, n: int) -> None:
                pass

            def close(self) -> None:
                pass

        return _Null()
    return tqdm(initial=initial, unit=" items", desc="building memory")
