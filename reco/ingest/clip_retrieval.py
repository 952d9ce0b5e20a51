"""Importing embeddings in the clip-retrieval layout (img_emb/, text_emb/, metadata/), e.g.
LAION's published CLIP embeddings, without re-encoding."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..memory.files import flat as _flat
from ..memory.files import stat_regular as _stat_regular
from ..memory.manifest import EncoderInfo, ModalityInfo
from ..memory.store import MemoryWriter
from .build import BuildReport, _progress
from .dedup import NearDuplicateFilter, _committed_column, _unit_rows
from .sources import _check_count, _check_dtype, _fingerprint, _stat_folder

_LAYOUT = (("img_emb", ".npy"), ("text_emb", ".npy"), ("metadata", ".parquet"))


@dataclass(frozen=True)
class _Part:
    number: int
    img: Path
    txt: Path
    meta: Path


def _clip_parts(folder: Path) -> list[_Part]:
    """The parts of a clip-retrieval folder, paired by the number in their names. A name that
    does not parse, a number twice in one list, a number missing from any of the three lists, or
    a gap in the numbers is an error listing every such problem."""
    _stat_folder(folder, "clip-retrieval folder")
    problems: list[str] = []
    found: list[dict[int, Path]] = []
    for sub, suffix in _LAYOUT:
        prefix = f"{sub}_"
        by_number: dict[int, Path] = {}
        names = sorted(os.listdir(folder / sub)) if (folder / sub).is_dir() else []
        for name in names:
            if not (name.startswith(prefix) and name.endswith(suffix)):
                continue  # not a part (e.g. a README or a temporary file)
            tail = name[len(prefix) : -len(suffix)]
            if not re.fullmatch(r"[0-9]+", tail):
                problems.append(f"{sub}/{name} is not named {prefix}<n>{suffix}")
            elif int(tail) in by_number:
                problems.append(f"{by_number[int(tail)].name} and {name} are both part {int(tail)}")
            else:
                by_number[int(tail)] = folder / sub / name
        found.append(by_number)
    if not found[0] and not problems:
        raise ValueError(
            f"clip-retrieval folder {folder} has no img_emb/img_emb_<n>.npy files "
            "(the layout: img_emb/, text_emb/, metadata/)"
        )
    numbers = sorted(set().union(*found))
    for n in numbers:
        missing = [f"no {sub}" for (sub, _), got in zip(_LAYOUT, found) if n not in got]
        if missing:
            problems.append(f"part {n}: {', '.join(missing)}")
    gaps = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers)) if numbers else []
    if gaps:  # e.g. an interrupted download: parts 0 and 2, no part 1 anywhere
        shown = ", ".join(map(str, gaps[:10])) + (", ..." if len(gaps) > 10 else "")
        problems.append(f"a gap in the numbers: no list has part {shown}")
    if problems:
        shown = "; ".join(problems[:10])
        more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(f"clip-retrieval folder {folder}: the parts do not pair up: {shown}{more}")
    return [_Part(n, found[0][n], found[1][n], found[2][n]) for n in numbers]


def _clip_source(folder: Path, parts: Sequence[_Part], captions: bool) -> dict[str, Any]:
    listing = []
    for part in parts:
        for path in (part.img, part.txt, part.meta):
            st = _stat_regular(path, "clip-retrieval file")
            listing.append((f"{path.parent.name}/{path.name}", st.st_size, st.st_mtime_ns))
    return {
        "kind": "clip_retrieval",
        "path": str(folder.resolve()),
        "captions": captions,
        "fingerprint": _fingerprint(listing),
    }


def clip_retrieval_source(folder: str | os.PathLike, captions: bool = True) -> dict[str, Any]:
    """The identity of a clip-retrieval folder, as import_clip_retrieval records it:
    {"kind": "clip_retrieval", "path": <resolved>, "captions": captions, "fingerprint": <sha256
    of every part file's name (img_emb/img_emb_0.npy, ...), size and mtime_ns, by part number>}.
    """
    folder = Path(folder)
    return _clip_source(folder, _clip_parts(folder), captions)


def _open_embeddings(path: Path) -> np.ndarray:
    """A part's .npy, memory-mapped, if it holds a 2-D array of numbers."""
    _stat_regular(path, "embeddings file")
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path} is not a readable .npy file ({_flat(e)})") from None
    if not isinstance(a, np.ndarray):
        a.close()
        raise ValueError(f"{path} is not a readable .npy file (an .npz archive)")
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"{path} holds {a.dtype} {a.shape}, expected a 2-D [rows, dim] array")
    if a.dtype.kind not in "fiu":
        raise ValueError(f"{path} holds {a.dtype} values, expected numbers")
    return a


def _text_kind(t: Any) -> str | None:
    """ "text", "binary" or "null" for the Arrow types a caption column may have, else None."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_null(t):
        return "null"
    is_ = pa.types
    if is_.is_string(t) or is_.is_large_string(t) or getattr(is_, "is_string_view", bool)(t):
        return "text"
    if (
        is_.is_binary(t)
        or is_.is_large_binary(t)
        or is_.is_fixed_size_binary(t)
        or getattr(is_, "is_binary_view", bool)(t)
    ):
        return "binary"
    return None


def _parquet_rows(path: Path, captions: bool) -> int:
    """A part's metadata row count, after checking the file and its caption column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _stat_regular(path, "metadata file")
    try:
        f = pq.ParquetFile(path)
        try:
            rows, schema = f.metadata.num_rows, f.schema_arrow
        finally:
            f.close()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable Parquet file ({_flat(e)})") from None
    if captions:
        if "caption" not in schema.names:
            raise ValueError(
                f"{path} has no 'caption' column (its columns: {', '.join(schema.names)}); "
                "import without captions with captions=False (--no-captions)"
            )
        t = schema.field("caption").type
        if _text_kind(t) is None:
            raise ValueError(f"{path}: the 'caption' column is {t}, expected text (or UTF-8 bytes)")
    return rows


def _text(value: object, path: Path, row: int, what: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{path}: row {row}: the {what} is not UTF-8 text ({e.reason} at byte {e.start})"
            ) from None
    return str(value)


def _read_metadata(path: Path, captions: bool) -> tuple[list[str | None], list[str]]:
    """(captions, sources) of a part's metadata rows; sources are the url (else image_path)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
        try:
            rows = f.metadata.num_rows
            wanted = ("caption", "url", "image_path") if captions else ("url", "image_path")
            columns = [c for c in wanted if c in f.schema_arrow.names]
            table = f.read(columns=columns) if columns else None
        finally:
            f.close()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable Parquet file ({_flat(e)})") from None
    values = {c: table.column(c).to_pylist() for c in columns} if table is not None else {}
    caps: list[str | None] = [None] * rows
    if captions:
        caps = [_text(v, path, i, "caption") for i, v in enumerate(values["caption"])]
    url, image_path = values.get("url", [None] * rows), values.get("image_path", [None] * rows)
    sources = [_text(u or p, path, i, "url") for i, (u, p) in enumerate(zip(url, image_path))]
    return caps, sources


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
    captions: bool = True,
    append: bool = False,
    progress_bar: bool = True,
) -> BuildReport:
    """Imports embeddings in the clip-retrieval layout (img_emb/img_emb_<n>.npy,
    text_emb/text_emb_<n>.npy, metadata/metadata_<n>.parquet), e.g. LAION's published CLIP
    embeddings, without re-encoding.

    Parts are paired by their number n (a number missing from any of the three lists, or twice
    in one, is an error); every file is checked before anything is written. Rows are
    L2-normalised in float64 (huge and tiny rows too); a row holding NaN or inf, or all zeros, is
    an error naming its file and row. Every metadata file needs a 'caption' column (text, or
    bytes decoded as UTF-8) unless captions=False, which stores no captions (None). Exact
    duplicates are rows whose image embedding is bitwise identical to an earlier one. Resumable
    like every build; the source identity is clip_retrieval_source(folder, captions), and
    append is as in build_from_items.
    """
    _check_count("chunk_rows", chunk_rows)
    _check_count("shard_rows", shard_rows)
    _check_dtype(dtype)
    folder = Path(folder)
    parts = _clip_parts(folder)
    dims: dict[str, tuple[int, Path]] = {}
    lengths: dict[int, int] = {}
    for part in parts:
        n_rows = []
        for m, path in (("image", part.img), ("text", part.txt)):
            a = _open_embeddings(path)
            d0, first = dims.setdefault(m, (a.shape[1], path))
            if a.shape[1] != d0:
                raise ValueError(
                    f"{path} holds {a.shape[1]}-d rows, {first.name} {d0}-d; every part must "
                    "have the same dim"
                )
            n_rows.append(len(a))
        n_rows.append(_parquet_rows(part.meta, captions))
        if len(set(n_rows)) != 1:
            raise ValueError(
                f"clip-retrieval folder {folder}: part {part.number}: {part.img.name} has "
                f"{n_rows[0]} rows, {part.txt.name} {n_rows[1]}, {part.meta.name} {n_rows[2]}; "
                "they must match"
            )
        lengths[part.number] = n_rows[0]
    if near_duplicates is not None:
        near_duplicates.check_dim(dims["image"][0])
    source = _clip_source(folder, parts, captions)
    modalities = {
        "image": ModalityInfo(dims["image"][0], dtype, EncoderInfo(image_encoder)),
        "text": ModalityInfo(dims["text"][0], dtype, EncoderInfo(text_encoder or image_encoder)),
    }
    writer = MemoryWriter(out, modalities, shard_rows=shard_rows, source=source, append=append)
    report = BuildReport()
    with writer:
        # Progress: the part being read (by number) and the rows of it consumed.
        done_part = int(writer.progress.get("part", -1))
        done_row = int(writer.progress.get("row", 0))
        report.resumed_from = int(writer.progress.get("consumed", 0))
        consumed = report.resumed_from
        report.duplicates = int(writer.progress.get("skipped", {}).get("duplicates", 0))
        report.near_duplicates = int(writer.progress.get("skipped", {}).get("near_duplicates", 0))
        seen = set(_committed_column(Path(out), "image_sha256")) if dedup and writer.rows else set()
        start_rows = writer.rows
        bar = _progress(progress_bar, initial=consumed)
        for part in parts:
            if part.number < done_part:
                continue
            img, txt = _open_embeddings(part.img), _open_embeddings(part.txt)
            caps, sources = _read_metadata(part.meta, captions)
            if not (len(img) == len(txt) == len(caps) == lengths[part.number]):
                raise ValueError(f"clip-retrieval folder {folder}: part {part.number} changed")
            r0 = done_row if part.number == done_part else 0
            for r in range(r0, len(img), chunk_rows):
                sl = slice(r, min(r + chunk_rows, len(img)))
                e_img = torch.from_numpy(_unit_rows(img[sl], f"{part.img}:", r))
                e_txt = torch.from_numpy(_unit_rows(txt[sl], f"{part.txt}:", r))
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
                rows = [sl.start + j for j in keep.nonzero().squeeze(1).tolist()]
                consumed += sl.stop - sl.start
                bar.update(sl.stop - sl.start)
                state = {
                    "part": part.number,
                    "row": sl.stop,
                    "consumed": consumed,
                    "skipped": {
                        "duplicates": report.duplicates,
                        "near_duplicates": report.near_duplicates,
                    },
                }
                sel = torch.tensor([i - sl.start for i in rows], dtype=torch.int64)
                writer.add(
                    {"image": e_img[sel], "text": e_txt[sel]},
                    metadata={
                        "caption": [caps[i] for i in rows],
                        "source": [sources[i] for i in rows],
                        "label_name": [None] * len(rows),
                        "image_sha256": [digests[i - sl.start] for i in rows],
                    },
                    progress=state,
                )
        bar.close()
    report.rows = writer.rows
    report.added = writer.rows - start_rows
    return report
