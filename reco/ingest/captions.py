"""Images with captions from a table: a UTF-8 CSV (header path,caption[,label]) or JSONL file."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

from ..memory.files import flat as _flat
from .sources import (
    MAX_IMAGE_BYTES,
    ItemSource,
    RawItem,
    _check_count,
    _file_reader,
    _read_regular,
)

# The longest field of a CSV caption table, in characters (the csv module's default is 128 Ki);
# a longer one is almost always an unclosed quote swallowing the lines after it.
MAX_CSV_FIELD = 1 << 20


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
