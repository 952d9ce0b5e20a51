"""Building a memory from source items: images and captions encoded, resumably."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..encoders import Encoder
from ..memory.files import flat as _flat
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


@dataclass(frozen=True)
class Partition:
    """Part `part` of `parts` of a source: the source's items in chunks of `chunk` consecutive
    items, chunk c belonging to part c % parts. Stable: it depends on item positions only."""

    part: int
    parts: int
    chunk: int

    def __post_init__(self) -> None:
        _check_count("parts", self.parts)
        _check_count("chunk", self.chunk)
        if isinstance(self.part, bool) or not isinstance(self.part, int):
            raise ValueError(f"part must be an integer, got {self.part!r}")
        if not 0 <= self.part < self.parts:
            raise ValueError(f"part must lie in [0, {self.parts - 1}], got {self.part}")

    def identity(self) -> dict[str, int]:
        return {"part": self.part, "parts": self.parts, "chunk": self.chunk}


def default_workers() -> int:
    """Decoding workers by default: the cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


@dataclass
class _Decoded:
    """One source item as a decoding worker left it. skip: why it is skipped (a count's name),
    or None; image: its position in the piece's images (-1 when skipped)."""

    index: int
    source: str
    caption: str | None
    label_name: str | None
    skip: str | None = None
    why: str = ""
    digest: str = ""
    image: int = -1


def _pieces(
    items: Iterable[RawItem], start: int, partition: Partition
) -> Iterator[list[tuple[int, RawItem]]]:
    """The part's items (position in the source, item) after its first `start`, in runs that
    each lie in one chunk: the unit of decoding, encoding and progress."""
    p, run, run_chunk = 0, [], -1
    for index, item in enumerate(items):
        chunk = index // partition.chunk
        if chunk % partition.parts != partition.part:
            continue
        p += 1
        if p <= start:
            continue
        if run and chunk != run_chunk:
            yield run
            run = []
        run.append((index, item))
        run_chunk = chunk
    if run:
        yield run


def _decode_piece(piece: list[tuple[int, RawItem]], transform) -> dict[str, Any]:
    """Reads, decodes and (with the encoder's image_transform) preprocesses a piece's images:
    {"records": [_Decoded], "images": [n, ...] tensor (or PIL images without a transform)}."""
    records: list[_Decoded] = []
    images: list[Any] = []
    for index, item in piece:
        rec = _Decoded(index, item.source, item.caption, item.label_name)
        records.append(rec)
        if item.caption is None:
            rec.skip = "missing_caption"
            continue
        if not item.caption.strip():
            rec.skip = "empty_caption"
            continue
        try:
            data = item.read_image()
            image = _load_image(data)
            if transform is not None:
                image = transform(image)
        except Exception as e:  # any unreadable or undecodable image is skipped, never fatal
            rec.skip, rec.why = "unreadable", _flat(e)
            continue
        rec.digest = hashlib.sha256(data).hexdigest()
        rec.image = len(images)
        images.append(image)
    if transform is not None:
        shapes = {tuple(x.shape) for x in images if isinstance(x, Tensor)}
        if len(shapes) > 1 or any(not isinstance(x, Tensor) for x in images):
            raise ValueError(
                f"the image encoder's image_transform must return tensors of one shape, got "
                f"{sorted(shapes) or [type(x).__name__ for x in images[:1]]}"
            )
        stacked = torch.stack(images) if images else torch.empty(0)
        return {"records": records, "images": stacked}
    return {"records": records, "images": images}


class _DecodedPieces(torch.utils.data.IterableDataset):
    """The part's pieces, decoded: with W DataLoader workers, worker w decodes pieces j with
    j % W == w, so the loader (in order, round robin) yields them in source order."""

    def __init__(self, items: Iterable[RawItem], start: int, partition: Partition, transform):
        self.items, self.start, self.partition, self.transform = items, start, partition, transform

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        if info is None:  # in process: errors raise here
            for piece in _pieces(self.items, self.start, self.partition):
                yield _decode_piece(piece, self.transform)
            return
        try:
            for j, piece in enumerate(_pieces(self.items, self.start, self.partition)):
                if j % info.num_workers == info.id:
                    yield _decode_piece(piece, self.transform)
        except Exception as e:  # a bad source: raised by the builder as it is, in order
            try:
                pickle.dumps(e)
            except Exception:
                e = ValueError(_flat(e))
            yield {"error": e}


def _as_is(x: Any) -> Any:
    return x


def _decoded(dataset: _DecodedPieces, workers: int, pin: bool) -> Iterable[dict[str, Any]]:
    if workers == 0:
        return dataset
    import multiprocessing

    # fork: the source's items (closures over files) need not be picklable.
    fork = sys.platform == "linux" and "fork" in multiprocessing.get_all_start_methods()
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        collate_fn=_as_is,
        pin_memory=pin,
        multiprocessing_context="fork" if fork else None,
    )


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
    workers: int = 0,
    partition: Partition | None = None,
) -> BuildReport:
    """Encodes images and captions into a memory at `out` (created, or resumed if it exists).

    The image encoder embeds images, the text encoder (default: the same model) captions. With
    label_names, items carry labels (their label_name's index); an item without a label, or with
    an unknown one, is an error. `source` identifies the items (default: items.source, for an
    ItemSource); a memory resumes only from the source it records. append=True adds another
    source's rows to an existing memory, reading that source from its first item (with dedup,
    images already in the memory are dropped as exact duplicates).

    Items are read, decoded and preprocessed (the image encoder's image_transform) in `workers`
    DataLoader worker processes (0: in this process); the encoders run here, one batch per
    `batch_size` consecutive source items. The memory (rows, ids, metadata, embeddings) and
    resume do not depend on `workers`. With workers > 0, `items` must be re-iterable (an
    ItemSource or a list): each worker lists it, and reads only its own items' images.

    partition: build only that part of the source (its chunk must be batch_size); the part's
    identity joins the recorded source, so it resumes only as the same part. Every row's
    metadata holds `item`, its position in the source.
    """
    _check_count("batch_size", batch_size)
    _check_count("shard_rows", shard_rows)
    _check_dtype(dtype)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
    if workers and iter(items) is items:
        raise ValueError(
            "workers > 0 needs re-iterable items (an ItemSource or a list), not an iterator: "
            "each worker lists the source"
        )
    if partition is None:
        partition = Partition(0, 1, batch_size)
    elif not isinstance(partition, Partition):
        raise TypeError(f"partition must be a Partition, got {type(partition).__name__}")
    elif partition.chunk != batch_size:
        raise ValueError(
            f"partition.chunk ({partition.chunk}) must equal batch_size ({batch_size})"
        )
    text_encoder = text_encoder or image_encoder
    if "image" not in image_encoder.modalities or "text" not in text_encoder.modalities:
        raise ValueError("image_encoder must encode images and text_encoder texts")
    if label_names is not None:
        label_names = _check_label_names(label_names)
    if near_duplicates is not None:
        near_duplicates.check_dim(image_encoder.dim)
    if source is None and isinstance(items, ItemSource):
        source = items.source
    if partition.parts > 1:
        source = {**(source or {}), "partition": partition.identity()}
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
    transform = image_encoder.image_transform
    device = getattr(image_encoder, "device", None)
    pin = device is not None and torch.device(device).type == "cuda"
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
        bar = _progress(progress_bar, initial=consumed)
        pieces = _decoded(_DecodedPieces(items, consumed, partition, transform), workers, pin)
        for piece in pieces:
            if "error" in piece:
                raise piece["error"]
            kept: list[_Decoded] = []
            for rec in piece["records"]:
                if rec.skip in ("missing_caption", "empty_caption"):
                    setattr(report, rec.skip, getattr(report, rec.skip) + 1)
                    log.warning("skipping %s: %s", rec.source, rec.skip.replace("_", " "))
                    continue
                if label_index is not None:
                    if rec.label_name is None:
                        raise ValueError(
                            f"{rec.source} has no label (the memory has label names: every "
                            "item needs one)"
                        )
                    if rec.label_name not in label_index:
                        raise ValueError(
                            f"{rec.source}: label {rec.label_name!r} is not one of the label_names"
                        )
                if rec.skip == "unreadable":
                    report.unreadable += 1
                    log.warning("skipping %s: unreadable image (%s)", rec.source, rec.why)
                    continue
                if dedup:
                    if rec.digest in seen:
                        report.duplicates += 1
                        continue
                    seen.add(rec.digest)
                kept.append(rec)
            consumed += len(piece["records"])
            bar.update(len(piece["records"]))
            _encode_and_add(
                writer,
                piece["images"],
                kept,
                image_encoder,
                text_encoder,
                near_duplicates,
                label_index,
                report,
                _progress_state(consumed, report),
                pin,
            )
        writer.set_progress({**_progress_state(consumed, report), "done": True})
        bar.close()
    report.rows = writer.rows
    report.added = writer.rows - start_rows
    log.info("memory %s: %s", out, report.summary())
    return report


def _encode_and_add(
    writer: MemoryWriter,
    images: Tensor | list[Any],
    kept: list[_Decoded],
    image_encoder: Encoder,
    text_encoder: Encoder,
    near_duplicates: NearDuplicateFilter | None,
    label_index: dict[str, int] | None,
    report: BuildReport,
    progress: dict[str, Any],
    pin: bool,
) -> None:
    """Encodes a piece's kept items and adds them (with the progress after the piece)."""
    if not kept:
        writer.set_progress(progress)
        return
    pick = [rec.image for rec in kept]
    if isinstance(images, Tensor):
        if pick != list(range(len(images))):  # a copy: pinned again for the encoder's copy
            images = images[torch.tensor(pick)]
            images = images.pin_memory() if pin else images
        img = image_encoder.encode_image_batch(images)
    else:
        img = image_encoder.encode_images([images[i] for i in pick])
    txt = text_encoder.encode_texts([rec.caption or "" for rec in kept])
    if near_duplicates is not None:
        keep = near_duplicates.keep(img)
        report.near_duplicates += int((~keep).sum())
        sel = keep.nonzero().squeeze(1)
        kept = [kept[i] for i in sel.tolist()]
        img, txt = img[sel], txt[sel]
        progress = _progress_state(progress["consumed"], report)
    if not kept:
        writer.set_progress(progress)
        return
    labels = None
    if label_index is not None:
        labels = np.array([label_index[rec.label_name] for rec in kept], dtype=np.int64)
    writer.add(
        {"image": img, "text": txt},
        labels=labels,
        metadata={
            "caption": [rec.caption for rec in kept],
            "source": [rec.source for rec in kept],
            "label_name": [rec.label_name for rec in kept],
            "image_sha256": [rec.digest for rec in kept],
            "item": [rec.index for rec in kept],
        },
        progress=progress,
    )


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
