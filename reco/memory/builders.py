"""Building memories: from images with captions (CSV/JSONL), an ImageFolder class tree, WebDataset
tar shards (what img2dataset writes), or existing embeddings in the clip-retrieval layout.

Builds are resumable: sources are read in a fixed order, and every commit records how many source
items were consumed, so after a crash or Ctrl-C the same command continues where the last commit
left off, with nothing lost or duplicated. Every source has an identity (`ItemSource.source`, a
JSON dict recorded in the manifest: its kind, resolved paths and a fingerprint of its files), so a
memory resumes only from the source it was built from; another source is refused unless it is
appended (`append=True`), which reads it from its first item. Unreadable images (also files that
are not regular files, or larger than `max_image_bytes`) and empty or missing captions are skipped
with a count and a log line, never aborting the build; malformed sources are errors naming the
file and row.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..encoders import Encoder
from ..ops import fused_retrieve_attend
from .files import flat as _flat
from .files import open_regular as _open_regular
from .files import read_regular
from .files import stat_regular as _stat_regular
from .manifest import METADATA_FILE, SHARDS_DIR, ModalityInfo
from .store import MemoryWriter

log = logging.getLogger("reco.memory")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
# Reads of one image (or one WebDataset member) stop here: the largest real photos are tens of MB.
MAX_IMAGE_BYTES = 256 << 20
# The longest field of a CSV caption table, in characters (the csv module's default is 128 Ki);
# a longer one is almost always an unclosed quote swallowing the lines after it.
MAX_CSV_FIELD = 1 << 20
MAX_LABEL_NAMES_BYTES = 64 << 20


@dataclass
class RawItem:
    """One source item: a way to read its image bytes, its caption (None: the source has no
    caption for it), optional label and origin."""

    source: str
    caption: str | None
    read_image: Callable[[], bytes]
    label_name: str | None = None


class ItemSource:
    """Source items that can be iterated more than once, with the source's identity.

    source: the JSON dict recorded in the manifest (each iter_* function documents its own);
    label_names: the labels its items carry, when known before reading them (else None).
    """

    def __init__(
        self,
        source: dict[str, Any],
        items: Callable[[], Iterator[RawItem]],
        label_names: list[str] | None = None,
    ) -> None:
        self.source = source
        self.label_names = label_names
        self._items = items

    def __iter__(self) -> Iterator[RawItem]:
        return self._items()


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


# ---- checks and bounded reads ------------------------------------------------------------------


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_dtype(dtype: object) -> None:
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")


def _stat_folder(path: Path, what: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{what} {path}: no such folder") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} {path}: cannot be read ({_flat(e)})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{what} {path}: not a folder")


def _read_regular(path: Path, what: str, limit: int | None = None) -> bytes:
    return read_regular(path, what, limit=limit)


def _file_reader(path: Path, limit: int) -> Callable[[], bytes]:
    return lambda: _read_regular(path, "image", limit)


def _fails(message: str) -> Callable[[], bytes]:
    def read() -> bytes:
        raise ValueError(message)

    return read


def _fingerprint(listing: Iterable[Sequence[Any]]) -> str:
    """sha256 of a listing (rows such as [name, size, mtime_ns], in order) as compact JSON."""
    text = json.dumps([list(row) for row in listing], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def read_label_names(path: str | os.PathLike, what: str = "label names file") -> list[str]:
    """Label names from a UTF-8 text file, one a line (blank lines ignored); a name twice, or no
    names, is an error."""
    path = Path(path)
    data = _read_regular(path, what, MAX_LABEL_NAMES_BYTES)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{what} {path} holds no names")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{what} {path}: {name!r} is there twice")
        seen.add(name)
    return names


def _check_label_names(names: Sequence[str]) -> list[str]:
    if isinstance(names, (str, bytes)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"label_names must be a list of strings, got {names!r:.60}")
    names = list(names)
    if not names:
        raise ValueError("label_names is empty (pass None for a memory without labels)")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"label_names holds {name!r} twice")
        seen.add(name)
    return names


def _unit_rows(a: np.ndarray, where: str, first_row: int = 0) -> np.ndarray:
    """a's rows scaled to unit L2 norm, as float32. Each row is divided by its largest magnitude
    and normalised in float64, so no sum of squares overflows or underflows (rows of 1e30 or
    1e-30 are fine). A row holding NaN or inf, or all zeros, has no direction: an error naming
    where and the row."""
    out = np.empty(a.shape, np.float32)
    block = 8192  # bounds the float64 copy
    for s in range(0, len(a), block):
        x = np.array(a[s : s + block], dtype=np.float64)
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            raise ValueError(
                f"{where} row {first_row + s + int(np.argmin(finite))} holds NaN or inf"
            )
        scale = np.abs(x).max(axis=1, initial=0.0)
        if (scale == 0).any():
            row = first_row + s + int(np.argmax(scale == 0))
            raise ValueError(f"{where} row {row} is all zeros (it has no direction to normalise)")
        x /= scale[:, None]
        x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
        out[s : s + block] = x
    return out


class NearDuplicateFilter:
    """Drops memory items whose image embedding has cosine >= threshold with any evaluation image
    (the papers remove test-set near-duplicates from the memory). `where` names the embeddings
    in error messages."""

    def __init__(
        self,
        eval_embeddings: Tensor | np.ndarray,
        threshold: float = 0.95,
        *,
        where: str = "eval_embeddings",
    ) -> None:
        if isinstance(eval_embeddings, Tensor):
            e = eval_embeddings.detach().float().cpu().numpy()
        else:
            e = np.asarray(eval_embeddings)
        if e.ndim != 2 or e.shape[0] == 0 or e.shape[1] == 0:
            raise ValueError(f"{where} must be [M >= 1, d], got {e.shape}")
        if e.dtype.kind not in "fiu":
            raise ValueError(f"{where} must hold numbers, got {e.dtype}")
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine in [-1, 1], got {threshold}")
        self.eval = torch.from_numpy(_unit_rows(e, where))
        self.threshold = threshold
        self.where = where

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, threshold: float = 0.95, *, what: str = "eval embeddings"
    ) -> NearDuplicateFilter:
        """The filter of the [M, d] embeddings in a .npy file."""
        path = Path(path)
        _stat_regular(path, what)
        try:
            e = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise ValueError(f"{what} {path} is not a readable .npy file ({_flat(err)})") from None
        if not isinstance(e, np.ndarray):
            e.close()
            raise ValueError(f"{what} {path} is not a readable .npy file (an .npz archive)")
        return cls(e, threshold, where=f"{what} {path}")

    def check_dim(self, dim: int) -> None:
        if self.eval.shape[1] != dim:
            raise ValueError(
                f"{self.where}: the evaluation embeddings are {self.eval.shape[1]}-d, the "
                f"memory's image embeddings are {dim}-d"
            )

    def keep(self, image_embeddings: Tensor) -> Tensor:
        """Boolean [n]: True for items to keep."""
        self.check_dim(image_embeddings.shape[1])
        q = torch.nn.functional.normalize(image_embeddings.float(), dim=1)
        best = fused_retrieve_attend(q, self.eval, self.eval[:, :1], 1).scores[:, 0]
        return best < self.threshold


# ---- sources -----------------------------------------------------------------------------------


def iter_caption_table(
    table: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    max_image_bytes: int = MAX_IMAGE_BYTES,
) -> ItemSource:
    """Rows of a UTF-8 CSV (header path,caption[,label]) or JSONL ({"path", "caption"[, "label"]})
    file; relative paths are resolved against image_root (default: the table's folder).

    The table is read and checked now: a malformed row is an error naming the file and line. An
    image that is not a regular file, or is over max_image_bytes, is unreadable (skipped).
    Identity: {"kind": "captions", "path": <the table, resolved>, "image_root": <resolved>,
    "fingerprint": <sha256 of the table's bytes>}.
    """
    _check_count("max_image_bytes", max_image_bytes)
    table = Path(table)
    root = Path(image_root) if image_root is not None else table.parent
    data = _read_regular(table, "captions table")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(
            f"captions table {table}:{line}: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    if table.suffix.lower() in (".jsonl", ".json"):
        rows = _jsonl_rows(text, table)
    else:
        rows = _csv_rows(text, table)
    source = {
        "kind": "captions",
        "path": str(table.resolve()),
        "image_root": str(root.resolve()),
        "fingerprint": hashlib.sha256(data).hexdigest(),
    }
    names = sorted({label for _, _, label in rows if label is not None})

    def items() -> Iterator[RawItem]:
        for name, caption, label in rows:
            path = Path(name)
            path = path if path.is_absolute() else root / path
            yield RawItem(str(path), caption, _file_reader(path, max_image_bytes), label)

    return ItemSource(source, items, names or None)


_Row = tuple[str, str, "str | None"]  # path, caption, label


def _csv_rows(text: str, table: Path) -> list[_Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows: list[_Row] = []
    old_limit = csv.field_size_limit(MAX_CSV_FIELD)
    try:
        while True:
            line = reader.line_num + 1  # where the next record starts
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                if "field limit" in str(e):
                    raise ValueError(
                        f"captions table {table}:{line}: a field is longer than {MAX_CSV_FIELD} "
                        "characters (an unclosed quote?)"
                    ) from None
                raise ValueError(
                    f"captions table {table}:{line}: not valid CSV ({_flat(e)})"
                ) from None
            if not row:
                continue
            if header is None:
                header = [h.strip() for h in row]
                if "path" not in header or "caption" not in header:
                    raise ValueError(
                        f"captions table {table}: the header {row!r:.100} lacks a 'path' or "
                        "'caption' column"
                    )
                continue
            if len(row) != len(header):
                raise ValueError(
                    f"captions table {table}:{line}: {len(row)} fields, the header has "
                    f"{len(header)}"
                )
            d = dict(zip(header, row))
            rows.append((d["path"], d["caption"], d.get("label") or None))
    finally:
        csv.field_size_limit(old_limit)
    if header is None:
        raise ValueError(f"captions table {table} has no header row (path,caption[,label])")
    return rows


def _jsonl_rows(text: str, table: Path) -> list[_Row]:
    rows: list[_Row] = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"captions table {table}:{n}"
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{where}: not a JSON object ({_flat(e)})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: not a JSON object (a {type(row).__name__})")
        if "path" not in row or "caption" not in row:
            raise ValueError(f"{where}: lacks a 'path' or 'caption' key")
        path, caption, label = row["path"], row["caption"], row.get("label")
        if not isinstance(path, str):
            raise ValueError(f"{where}: 'path' must be a string, got {type(path).__name__}")
        if caption is not None and not isinstance(caption, str):
            raise ValueError(f"{where}: 'caption' must be a string, got {type(caption).__name__}")
        if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
            raise ValueError(
                f"{where}: 'label' must be a string or an integer, got {type(label).__name__}"
            )
        rows.append((path, caption or "", None if label in (None, "") else str(label)))
    return rows


def _check_template(template: object) -> None:
    probe = ""
    if isinstance(template, str):
        try:
            probe = template.format("\0")
        except (IndexError, KeyError, ValueError, AttributeError, TypeError):
            pass
    if "\0" not in probe:
        raise ValueError(
            f"template {template!r} must hold one '{{}}' for the class name (and other braces "
            "doubled: '{{' and '}}')"
        )


def iter_image_folder(
    root: str | os.PathLike,
    template: str = "a photo of a {}.",
    *,
    max_image_bytes: int = MAX_IMAGE_BYTES,
) -> ItemSource:
    """An ImageFolder tree (root/<class>/<image>): captions from the template, labels = the class
    folders (sorted; ItemSource.label_names). The tree is listed now.

    Identity: {"kind": "image_folder", "path": <root, resolved>, "template": template,
    "fingerprint": <sha256 of the listing: class, file name, size, mtime_ns of every image>}.
    """
    _check_template(template)
    _check_count("max_image_bytes", max_image_bytes)
    root = Path(root)
    _stat_folder(root, "image folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"image folder {root} has no class folders (<dir>/<class>/<image>)")
    listing: list[tuple[str, str, int, int]] = []
    for cls in classes:
        for name in sorted(os.listdir(root / cls)):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                try:
                    st = os.stat(root / cls / name)
                    size, mtime = st.st_size, st.st_mtime_ns
                except OSError:  # e.g. a dangling symlink: unreadable when read
                    size, mtime = -1, -1
                listing.append((cls, name, size, mtime))
    source = {
        "kind": "image_folder",
        "path": str(root.resolve()),
        "template": template,
        "fingerprint": _fingerprint(listing),
    }

    def items() -> Iterator[RawItem]:
        for cls, name, _, _ in listing:
            path = root / cls / name
            caption = template.format(cls.replace("_", " "))
            yield RawItem(str(path), caption, _file_reader(path, max_image_bytes), cls)

    return ItemSource(source, items, classes)


def iter_webdataset(
    shards: Sequence[str | os.PathLike] | str | os.PathLike,
    *,
    max_image_bytes: int = MAX_IMAGE_BYTES,
) -> ItemSource:
    """Samples of WebDataset tar shards: members sharing a key (<key>.jpg, <key>.txt, optional
    <key>.cls or <key>.json with a "label"), in archive order; shards in the order given.

    A sample without a .txt has no caption (skipped and counted); a shard in which no sample has
    one is an error. A member over max_image_bytes is not read (its sample is unreadable).
    Identity: {"kind": "webdataset", "paths": [<shard, resolved>, ...], "fingerprint": <sha256
    of every shard's path, size and mtime_ns, in order>}.
    """
    _check_count("max_image_bytes", max_image_bytes)
    if isinstance(shards, (str, os.PathLike)):
        shards = [shards]
    paths = [Path(s) for s in shards]
    if not paths:
        raise ValueError("no WebDataset shards given")
    stats = [_stat_regular(p, "WebDataset shard") for p in paths]
    resolved = [str(p.resolve()) for p in paths]
    source = {
        "kind": "webdataset",
        "paths": resolved,
        "fingerprint": _fingerprint(
            (r, st.st_size, st.st_mtime_ns) for r, st in zip(resolved, stats)
        ),
    }

    def items() -> Iterator[RawItem]:
        for shard in paths:
            yield from _shard_items(shard, max_image_bytes)

    return ItemSource(source, items)


_TAR_ERRORS: tuple[type[BaseException], ...] = (tarfile.TarError, OSError, EOFError, zlib.error)
try:
    import lzma

    _TAR_ERRORS += (lzma.LZMAError,)
except ImportError:  # Python built without lzma: no .tar.xz either
    pass


def _split_key(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member: the key is its path up to the first dot of the last
    component (WebDataset's rule); ("", "") for names without both."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot or not ext:
        return "", ""
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _shard_items(shard: Path, limit: int) -> Iterator[RawItem]:
    groups: dict[str, dict[str, bytes | int]] = {}  # key -> ext -> bytes, or the size not read
    fd = _open_regular(shard, "WebDataset shard")
    try:
        with os.fdopen(fd, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                if not key:
                    continue
                files = groups.setdefault(key, {})
                if member.size > limit:
                    log.warning("%s#%s.%s: %d bytes, not read", shard, key, ext, member.size)
                    files[ext] = member.size
                    continue
                r = tar.extractfile(member)
                if r is not None:
                    files[ext] = r.read()
    except _TAR_ERRORS as e:
        raise ValueError(
            f"WebDataset shard {shard} is not a readable tar file ({_flat(e)})"
        ) from None
    if groups and not any("txt" in files for files in groups.values()):
        exts = sorted({e for files in groups.values() for e in files})
        raise ValueError(
            f"WebDataset shard {shard} has no .txt captions (its members are {', '.join(exts)}); "
            "every sample needs <key>.txt"
        )
    for key, files in groups.items():
        where = f"{shard}#{key}"
        caption: str | None = None
        txt = files.get("txt")
        if isinstance(txt, bytes):
            try:
                caption = txt.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: the caption is not UTF-8 text ({_flat(e)})") from None
        label = None
        cls = files.get("cls")
        if isinstance(cls, bytes):
            try:
                label = cls.decode("utf-8").strip() or None
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{where}: the .cls label is not UTF-8 text ({_flat(e)})"
                ) from None
        elif isinstance(files.get("json"), bytes):
            try:
                meta = json.loads(files["json"])
            except (ValueError, RecursionError):  # not JSON: no label from it
                meta = None
            value = meta.get("label") if isinstance(meta, dict) else None
            if isinstance(value, (str, int)) and not isinstance(value, bool):
                label = str(value)
        image_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
        data = files.get(image_ext) if image_ext else None
        if data is None:
            read = _fails(f"{where}: no image (.jpg, .jpeg, .png or .webp)")
        elif isinstance(data, int):
            read = _fails(f"{where}.{image_ext}: {data} bytes, over the limit of {limit}")
        else:
            read = lambda d=data: d  # noqa: E731
        yield RawItem(source=where, caption=caption, read_image=read, label_name=label)


# ---- building from images ----------------------------------------------------------------------


def _load_image(data: bytes):
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.load()
    return im.convert("RGB")


def _committed_column(root: Path, column: str) -> list:
    """A metadata column over all committed shards (to rebuild dedup state on resume); shards
    without the column contribute nothing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .store import read_manifest

    out: list = []
    for shard in read_manifest(root).shards:
        path = root / SHARDS_DIR / shard.name / METADATA_FILE
        try:
            if column not in pq.read_schema(path).names:
                continue
            table = pq.read_table(path, columns=[column])
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: the memory's metadata cannot be read ({_flat(e)})") from None
        out.extend(table.column(column).to_pylist())
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


# ---- importing clip-retrieval embeddings --------------------------------------------------------

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
    from .manifest import EncoderInfo

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
