"""What a source is: its items (`RawItem`), re-iterable with an identity (`ItemSource`), and the
checks and bounded reads every source shares (regular files only, never past a limit).

Every source has an identity (`ItemSource.source`, a JSON dict recorded in the manifest: its kind,
resolved paths and a fingerprint of its files), so a memory resumes only from the source it was
built from.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..memory.files import flat as _flat
from ..memory.files import read_regular

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
# Reads of one image (or one WebDataset member) stop here: the largest real photos are tens of MB.
MAX_IMAGE_BYTES = 256 << 20
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
    twice = _repeated(names)
    if twice is not None:
        raise ValueError(f"{what} {path}: {twice!r} is there twice")
    return names


def _check_label_names(names: Sequence[str]) -> list[str]:
    if isinstance(names, (str, bytes)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"label_names must be a list of strings, got {names!r:.60}")
    names = list(names)
    if not names:
        raise ValueError("label_names is empty (pass None for a memory without labels)")
    twice = _repeated(names)
    if twice is not None:
        raise ValueError(f"label_names holds {twice!r} twice")
    return names


def _repeated(names: Sequence[str]) -> str | None:
    """The first name that is there twice, else None."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None
