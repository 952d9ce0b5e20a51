"""Building memories: from images with captions (CSV/JSONL), an ImageFolder class tree, WebDataset
tar shards (what img2dataset writes), or existing embeddings in the clip-retrieval layout.

Builds are resumable: sources are read in a fixed order, and every commit records how many source
items were consumed, so after a crash or Ctrl-C the same command continues where the last commit
left off, with nothing lost or duplicated. Unreadable images and empty captions are skipped with a
count and a log line, never aborting the build.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..encoders import Encoder
from ..ops import fused_retrieve_attend
from .manifest import METADATA_FILE, SHARDS_DIR, ModalityInfo
from .store import MemoryWriter

log = logging.getLogger("reco.memory")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


@dataclass
class RawItem:
    """One source item: a way to read its image bytes, its caption, optional label and origin."""

    source: str
    caption: str
    read_image: Callable[[], bytes]
    label_name: str | None = None


@dataclass
class BuildReport:
    rows: int = 0  # rows in the memory after the build
    added: int = 0  # rows this run added
    resumed_from: int = 0  # source items already consumed by earlier runs
    unreadable: int = 0
    empty_caption: int = 0
    duplicates: int = 0
    near_duplicates: int = 0
    skipped_sources: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.rows} rows ({self.added} added this run, resumed after {self.resumed_from} "
            f"source items); skipped: {self.unreadable} unreadable, {self.empty_caption} empty "
            f"captions, {self.duplicates} exact duplicates, {self.near_duplicates} near-duplicates"
        )


class NearDuplicateFilter:
    """Drops memory items whose image embedding has cosine >= threshold with any evaluation image
    (the papers remove test-set near-duplicates from the memory)."""

    def __init__(self, eval_embeddings: Tensor | np.ndarray, threshold: float = 0.95) -> None:
        e = torch.as_tensor(np.asarray(eval_embeddings), dtype=torch.float32)
        if e.dim() != 2 or e.shape[0] == 0:
            raise ValueError(f"eval_embeddings must be [M >= 1, d], got {tuple(e.shape)}")
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine in [-1, 1], got {threshold}")
        self.eval = torch.nn.functional.normalize(e, dim=1)
        self.threshold = threshold

    def keep(self, image_embeddings: Tensor) -> Tensor:
        """Boolean [n]: True for items to keep."""
        if image_embeddings.shape[1] != self.eval.shape[1]:
            raise ValueError(
                f"near-duplicate filter: eval embeddings are {self.eval.shape[1]}-d but the "
                f"memory's image embeddings are {image_embeddings.shape[1]}-d"
            )
        q = torch.nn.functional.normalize(image_embeddings.float(), dim=1)
        best = fused_retrieve_attend(q, self.eval, self.eval[:, :1], 1).scores[:, 0]
        return best < self.threshold


# ---- sources -----------------------------------------------------------------------------------


def _file_reader(path: Path) -> Callable[[], bytes]:
    return lambda: path.read_bytes()


def iter_caption_table(
    table: str | os.PathLike, image_root: str | os.PathLike | None = None
) -> Iterator[RawItem]:
    """Rows of a CSV (header path,caption[,label]) or JSONL ({"path", "caption"[, "label"]}) file;
    relative paths are resolved against image_root (default: the table's folder)."""
    table = Path(table)
    root = Path(image_root) if image_root is not None else table.parent
    if table.suffix.lower() in (".jsonl", ".json"):
        with open(table, encoding="utf-8") as f:
            rows = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{table}:{n}: not a JSON object ({e})") from e
    else:
        with open(table, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    for n, row in enumerate(rows, 1):
        if "path" not in row or "caption" not in row:
            raise ValueError(f"{table}: row {n} lacks a 'path' or 'caption' column: {row}")
        path = Path(row["path"])
        path = path if path.is_absolute() else root / path
        label = row.get("label")
        yield RawItem(
            source=str(path),
            caption=str(row["caption"] or ""),
            read_image=_file_reader(path),
            label_name=None if label in (None, "") else str(label),
        )


def iter_image_folder(
    root: str | os.PathLike, template: str = "a photo of a {}."
) -> Iterator[RawItem]:
    """An ImageFolder tree (root/<class>/<image>): captions from the template, labels = classes."""
    root = Path(root)
    if "{}" not in template:
        raise ValueError(f"template must contain '{{}}' for the class name, got {template!r}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class folders")
    for cls in classes:
        for path in sorted((root / cls).iterdir()):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                yield RawItem(
                    source=str(path),
                    caption=template.format(cls.replace("_", " ")),
                    read_image=_file_reader(path),
                    label_name=cls,
                )


def iter_webdataset(shards: Sequence[str | os.PathLike]) -> Iterator[RawItem]:
    """Samples of WebDataset tar shards: members sharing a key (<key>.jpg, <key>.txt, optional
    <key>.cls or <key>.json with a "label"), in archive order; shards in the order given."""
    for shard in shards:
        shard = Path(shard)
        try:
            tar = tarfile.open(shard, "r")
        except (tarfile.TarError, OSError) as e:
            raise ValueError(f"{shard} is not a readable tar file ({e})") from e
        with tar:
            groups: dict[str, dict[str, bytes]] = {}
            order: list[str] = []
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                f = tar.extractfile(member)
                if f is None:
                    continue
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext.lower()] = f.read()
        for key in order:
            files = groups[key]
            image_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
            caption = files.get("txt", b"").decode("utf-8", errors="replace").strip()
            label = files.get("cls", b"").decode().strip() or None
            if label is None and "json" in files:
                try:
                    label = json.loads(files["json"]).get("label")
                except (json.JSONDecodeError, AttributeError):
                    label = None
            data = files.get(image_ext, b"") if image_ext else b""
            yield RawItem(
                source=f"{shard}#{key}",
                caption=caption,
                read_image=(lambda d=data: d),
                label_name=None if label is None else str(label),
            )


# ---- building from images ----------------------------------------------------------------------


def _load_image(data: bytes):
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.load()
    return im.convert("RGB")


def _committed_column(root: Path, column: str) -> list:
    """A metadata column over all committed shards (to rebuild dedup state on resume)."""
    import pyarrow.parquet as pq

    from .store import read_manifest

    out: list = []
    for shard in read_manifest(root).shards:
        t = pq.read_table(root / SHARDS_DIR / shard.name / METADATA_FILE, columns=[column])
        out.extend(t.column(column).to_pylist())
    return out


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
    progress_bar: bool = True,
) -> BuildReport:
    """Encodes images and captions into a memory at `out` (created, or resumed if it exists).

    The image encoder embeds images, the text encoder (default: the same model) captions. With
    label_names, items carry labels (their label_name's index); an unknown label name is an error.
    """
    text_encoder = text_encoder or image_encoder
    if "image" not in image_encoder.modalities or "text" not in text_encoder.modalities:
        raise ValueError("image_encoder must encode images and text_encoder texts")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
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
    )
    report = BuildReport()
    with writer:
        consumed = int(writer.progress.get("consumed", 0))
        report.resumed_from = consumed
        counts = writer.progress.get("skipped", {})
        report.unreadable = int(counts.get("unreadable", 0))
        report.empty_caption = int(counts.get("empty_caption", 0))
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
            if not item.caption.strip():
                report.empty_caption += 1
                log.warning("skipping %s: empty caption", item.source)
                continue
            if label_index is not None and item.label_name not in label_index:
                raise ValueError(
                    f"{item.source}: label {item.label_name!r} is not one of the label_names"
                )
            try:
                data = item.read_image()
                image = _load_image(data)
            except Exception as e:  # any undecodable image is skipped, never fatal
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


# ---- importing clip-retrieval embeddings --------------------------------------------------------


def _numbered(folder: Path, prefix: str, suffix: str) -> list[Path]:
    files = list(folder.glob(f"{prefix}*{suffix}"))

    def number(p: Path) -> int:
        tail = p.name[len(prefix) : -len(suffix)]
        if not tail.isdigit():
            raise ValueError(f"{p} does not follow {prefix}<n>{suffix}")
        return int(tail)

    return sorted(files, key=number)


def import_clip_retrieval(
    out: str | os.PathLike,
    folder: str | os.PathLike,
    *,
    image_encoder: str = "unknown",
    text_encoder: str | None = None,
    dtype: str = "float16",
    chunk_rows: int = 1 << 16,
    shard_rows: int = 1 << 20,
    dedup: bool = True,
    near_duplicates: NearDuplicateFilter | None = None,
    progress_bar: bool = True,
) -> BuildReport:
    """Imports embeddings in the clip-retrieval layout (img_emb/img_emb_<n>.npy,
    text_emb/text_emb_<n>.npy, metadata/metadata_<n>.parquet), e.g. LAION's published CLIP
    embeddings, without re-encoding. Rows are L2-normalised; exact duplicates are rows whose image
    embedding is bitwise identical to an earlier one. Resumable like every build."""
    import pyarrow.parquet as pq

    from .manifest import EncoderInfo

    folder = Path(folder)
    imgs = _numbered(folder / "img_emb", "img_emb_", ".npy")
    txts = _numbered(folder / "text_emb", "text_emb_", ".npy")
    metas = _numbered(folder / "metadata", "metadata_", ".parquet")
    if not imgs:
        raise ValueError(f"{folder} has no img_emb/img_emb_<n>.npy files (clip-retrieval layout)")
    if len(txts) != len(imgs) or len(metas) != len(imgs):
        raise ValueError(
            f"{folder}: {len(imgs)} img_emb, {len(txts)} text_emb and {len(metas)} metadata "
            "files; they must pair up"
        )
    first_img = np.load(imgs[0], mmap_mode="r")
    first_txt = np.load(txts[0], mmap_mode="r")
    modalities = {
        "image": ModalityInfo(int(first_img.shape[1]), dtype, EncoderInfo(image_encoder)),
        "text": ModalityInfo(
            int(first_txt.shape[1]), dtype, EncoderInfo(text_encoder or image_encoder)
        ),
    }
    writer = MemoryWriter(
        out, modalities, shard_rows=shard_rows, source={"clip_retrieval": str(folder)}
    )
    report = BuildReport()
    with writer:
        done_file = int(writer.progress.get("file", 0))
        done_row = int(writer.progress.get("row", 0))
        report.resumed_from = int(writer.progress.get("consumed", 0))
        consumed = report.resumed_from
        report.duplicates = int(writer.progress.get("skipped", {}).get("duplicates", 0))
        report.near_duplicates = int(writer.progress.get("skipped", {}).get("near_duplicates", 0))
        seen = set(_committed_column(Path(out), "image_sha256")) if dedup and writer.rows else set()
        start_rows = writer.rows
        bar = _progress(progress_bar, initial=consumed)
        for fi in range(done_file, len(imgs)):
            img = np.load(imgs[fi], mmap_mode="r")
            txt = np.load(txts[fi], mmap_mode="r")
            meta = pq.read_table(metas[fi]).to_pylist()
            if not (len(img) == len(txt) == len(meta)):
                raise ValueError(
                    f"{imgs[fi].name}, {txts[fi].name}, {metas[fi].name} have {len(img)}, "
                    f"{len(txt)}, {len(meta)} rows; they must match"
                )
            for name, arr, m in (("image", img, "image"), ("text", txt, "text")):
                if arr.ndim != 2 or arr.shape[1] != modalities[m].dim:
                    raise ValueError(
                        f"{name} embeddings of file {fi} are {arr.shape}, expected "
                        f"[n, {modalities[m].dim}]"
                    )
            r0 = done_row if fi == done_file else 0
            for r in range(r0, len(img), chunk_rows):
                sl = slice(r, min(r + chunk_rows, len(img)))
                e_img = torch.nn.functional.normalize(
                    torch.from_numpy(np.array(img[sl], np.float32)), dim=1
                )
                e_txt = torch.nn.functional.normalize(
                    torch.from_numpy(np.array(txt[sl], np.float32)), dim=1
                )
                digests = [
                    hashlib.sha256(np.asarray(img[i]).tobytes()).hexdigest()
                    for i in range(sl.start, sl.stop)
                ]
                keep = torch.ones(len(digests), dtype=torch.bool)
                if dedup:
                    for j, h in enumerate(digests):
                        if h in seen:
                            keep[j] = False
                            report.duplicates += 1
                        else:
                            seen.add(h)
                if near_duplicates is not None:
                    nd = ~near_duplicates.keep(e_img) & keep
                    report.near_duplicates += int(nd.sum())
                    keep &= ~nd
                sel = keep.nonzero().squeeze(1)
                rows = [meta[sl.start + j] for j in sel.tolist()]
                consumed += sl.stop - sl.start
                bar.update(sl.stop - sl.start)
                state = {
                    "file": fi if sl.stop < len(img) else fi + 1,
                    "row": sl.stop if sl.stop < len(img) else 0,
                    "consumed": consumed,
                    "skipped": {
                        "duplicates": report.duplicates,
                        "near_duplicates": report.near_duplicates,
                    },
                }
                writer.add(
                    {"image": e_img[sel], "text": e_txt[sel]},
                    metadata={
                        "caption": [str(x.get("caption") or "") for x in rows],
                        "source": [str(x.get("url") or x.get("image_path") or "") for x in rows],
                        "label_name": [None] * len(rows),
                        "image_sha256": [digests[j] for j in sel.tolist()],
                    },
                    progress=state,
                )
        bar.close()
    report.rows = writer.rows
    report.added = writer.rows - start_rows
    return report
