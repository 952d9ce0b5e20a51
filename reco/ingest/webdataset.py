"""Samples of WebDataset tar shards (what img2dataset writes)."""

from __future__ import annotations

import json
import logging
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ..memory.files import flat as _flat
from ..memory.files import open_regular as _open_regular
from ..memory.files import stat_regular as _stat_regular
from .sources import MAX_IMAGE_BYTES, ItemSource, RawItem, _check_count, _fails, _fingerprint

log = logging.getLogger(__name__)


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


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _member_reader(shard: Path, offset: int, size: int) -> Callable[[], bytes]:
    """Reads one member's bytes from an uncompressed tar when called (decoding workers read only
    their own items' images)."""

    def read() -> bytes:
        fd = _open_regular(shard, "WebDataset shard")
        try:
            data = os.pread(fd, size, offset)
        finally:
            os.close(fd)
        if len(data) != size:
            raise ValueError(f"{shard} is shorter than its member at {offset} ({size} bytes)")
        return data

    return read


def _shard_items(shard: Path, limit: int) -> Iterator[RawItem]:
    # key -> ext -> bytes, a reader (an image of an uncompressed tar), or the size not read
    groups: dict[str, dict[str, bytes | int | Callable[[], bytes]]] = {}
    fd = _open_regular(shard, "WebDataset shard")
    try:
        with os.fdopen(fd, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            plain = tar.fileobj is f  # not compressed: members can be read later, by offset
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
                if plain and ext in IMAGE_EXTS:
                    files[ext] = _member_reader(shard, member.offset_data, member.size)
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
        image_ext = next((e for e in IMAGE_EXTS if e in files), None)
        data = files.get(image_ext) if image_ext else None
        if data is None:
            read = _fails(f"{where}: no image (.jpg, .jpeg, .png or .webp)")
        elif isinstance(data, int):
            read = _fails(f"{where}.{image_ext}: {data} bytes, over the limit of {limit}")
        elif callable(data):
            read = data
        else:
            read = lambda d=data: d  # noqa: E731
        yield RawItem(source=where, caption=caption, read_image=read, label_name=label)
