"""The memory's manifest: what a memory folder holds, and the commit point of every write.

A memory folder:

    manifest.json                  this file's JSON (written last: the commit point)
    shards/00000/image_emb.npy     [rows, dim] float16 | float32, one file per modality
    shards/00000/text_emb.npy
    shards/00000/labels.npy        optional int64 [rows]
    shards/00000/metadata.parquet  one row per item: caption, source, label_name, ...
    shards/00000/ids.npy           int64 [rows]: the rows' stable ids (format 2)
    tombstones/00000007.npy        int64: the ids one delete commit tombstoned
    .lock                          held (flock) by the one writer
    .journal.json                  the shard folders and tombstone files a writer has created and
                                   not yet committed
    .readers/<pid>-<hex>.json      reader leases: the oldest version each open Memory may read

Only shards and tombstone files listed in the manifest exist for readers. A writer removes only
what its journal lists and the manifest does not name, and the files a compaction retired once no
reader's lease names a version that still lists them (`retired`); nothing else is ever deleted.

Format 2 adds stable ids: `next_id` (never reused), per shard `ids.npy` (or, for a shard written
in format 1, `first_id`: its ids are first_id + arange(rows)), `commit` (the version, one more
with each commit), `tombstones` and `retired`. A format-1 manifest reads as format 2 with ids
0..rows-1 and commit 0; the next commit writes format 2 and touches no shard file.

Every name read from the manifest is untrusted: shard, modality and file names must be single
path components (letters, digits, `_`, `-`, `.`), and readers also check that each path resolves
inside the memory folder after following symlinks.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

FORMAT_NAME = "reco-memory"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
LOCK_FILE = ".lock"
JOURNAL_FILE = ".journal.json"
TOMBSTONES_DIR = "tombstones"
READERS_DIR = ".readers"
# The writer's own temporary files: replaced atomically, so whatever holds these names is its own.
MANIFEST_TMP = MANIFEST_FILE + ".tmp"
JOURNAL_TMP = JOURNAL_FILE + ".tmp"
RESERVED = frozenset({LOCK_FILE, JOURNAL_FILE, MANIFEST_TMP, JOURNAL_TMP, READERS_DIR})
EMBEDDING_DTYPES = ("float16", "float32")
METADATA_FILE = "metadata.parquet"
LABELS_FILE = "labels.npy"
IDS_FILE = "ids.npy"
MAX_MANIFEST_BYTES = 1 << 28  # 256 MiB: millions of shards; a bound on what a reader loads

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class MemoryFormatError(ValueError):
    """A memory folder, manifest or shard that is missing, malformed, or fails its checks."""


class MemorySourceError(MemoryFormatError):
    """A build into an existing memory from a source other than the one it was built from."""


def embedding_file(modality: str) -> str:
    return f"{modality}_emb.npy"


def check_name(name: object, what: str) -> str:
    """name if it is one safe path component (no separators, not `.`/`..`), else an error."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise MemoryFormatError(f"corrupt manifest: {what} {name!r} is not a plain file name")
    return name


@dataclass(frozen=True)
class EncoderInfo:
    """The frozen encoder that produced a modality's embeddings."""

    name: str
    checkpoint: str | None = None  # the weights file it was loaded from, as given
    sha256: str | None = None  # of that file; None for random weights or imported embeddings


@dataclass(frozen=True)
class ModalityInfo:
    dim: int
    dtype: str
    encoder: EncoderInfo


@dataclass(frozen=True)
class FileInfo:
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardInfo:
    name: str
    rows: int
    files: dict[str, FileInfo]
    # A shard written in format 1 has no ids.npy: its ids are first_id + arange(rows).
    first_id: int | None = None


@dataclass(frozen=True)
class TombstoneInfo:
    """tombstones/<name>: the int64 ids one delete commit tombstoned (`rows` of them)."""

    name: str
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Retired:
    """Files a compaction stopped naming at commit `commit`: removed (by a later compaction or
    gc) once no reader lease holds a version older than `commit`."""

    commit: int
    shards: list[str]
    tombstones: list[str]


@dataclass
class Manifest:
    modalities: dict[str, ModalityInfo]
    has_labels: bool = False
    label_names: list[str] | None = None
    shards: list[ShardInfo] = field(default_factory=list)
    # What the builder had consumed from its source when the last shard was committed (resume).
    progress: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    # Earlier sources, oldest first, when rows from another source were appended.
    history: list[dict[str, Any]] = field(default_factory=list)
    commit: int = 0  # the version: one more with each commit
    next_id: int = 0  # the id the next added row gets (ids are never reused)
    next_shard: int = 0  # the number the next shard folder gets (names are never reused)
    tombstones: list[TombstoneInfo] = field(default_factory=list)
    retired: list[Retired] = field(default_factory=list)

    @property
    def rows(self) -> int:
        """Rows stored, tombstoned ones included (they go at the next compaction)."""
        return sum(s.rows for s in self.shards)

    @property
    def deleted(self) -> int:
        """Rows tombstoned and not yet compacted away."""
        return sum(t.rows for t in self.tombstones)

    def required_files(self, shard: ShardInfo | None = None) -> list[str]:
        """The files every shard holds (and ids.npy, for a shard written in format 2)."""
        files = [embedding_file(m) for m in self.modalities] + [METADATA_FILE]
        files += [LABELS_FILE] if self.has_labels else []
        return files + ([IDS_FILE] if shard is not None and shard.first_id is None else [])

    def to_json(self) -> str:
        shards = []
        for s in self.shards:
            d = {"name": s.name, "rows": s.rows}
            d["files"] = {f: dataclasses.asdict(i) for f, i in s.files.items()}
            if s.first_id is not None:
                d["first_id"] = s.first_id
            shards.append(d)
        d = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "commit": self.commit,
            "rows": self.rows,
            "next_id": self.next_id,
            "next_shard": self.next_shard,
            "modalities": {m: dataclasses.asdict(info) for m, info in self.modalities.items()},
            "has_labels": self.has_labels,
            "label_names": self.label_names,
            "shards": shards,
            "tombstones": [dataclasses.asdict(t) for t in self.tombstones],
            "retired": [dataclasses.asdict(r) for r in self.retired],
            "progress": self.progress,
            "source": self.source,
            "history": self.history,
        }
        return json.dumps(d, indent=1, sort_keys=False)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest.json") -> Manifest:
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MemoryFormatError(f"{where} is not UTF-8 JSON text ({e})") from None
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise MemoryFormatError(f"{where} is not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise MemoryFormatError(f"{where} is not a reco memory manifest")
        if d.get("version") not in READABLE_VERSIONS:
            raise MemoryFormatError(
                f"{where} has format version {d.get('version')!r}; this reco reads "
                f"{' and '.join(map(str, READABLE_VERSIONS))}"
            )
        try:
            m = _parse(d, d["version"])
        except MemoryFormatError as e:
            raise MemoryFormatError(f"{where}: {e}") from None
        if m.rows != d.get("rows"):
            raise MemoryFormatError(
                f"{where} says rows={d.get('rows')!r} but its shards hold {m.rows}"
            )
        return m


def _bad(what: str, value: object, want: str) -> MemoryFormatError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return MemoryFormatError(f"corrupt manifest: {what} is {shown}, expected {want}")


def _get(d: dict, key: str, what: str) -> Any:
    if key not in d:
        raise MemoryFormatError(f"corrupt manifest: {what} lacks {key!r}")
    return d[key]


def _int(value: object, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _bad(what, value, f"an integer >= {low}")
    return value


def _str_or_none(value: object, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _bad(what, value, "a string or null")
    return value


def _dict(value: object, what: str) -> dict:
    if not isinstance(value, dict):
        raise _bad(what, value, "an object")
    return value


def _names(value: object, what: str) -> list[str]:
    if not isinstance(value, list):
        raise _bad(what, value, "a list of names")
    return [check_name(n, what) for n in value]


def _parse(d: dict, version: int) -> Manifest:
    mods = _dict(_get(d, "modalities", "the manifest"), "modalities")
    if not mods:
        raise MemoryFormatError("corrupt manifest: it lists no modalities")
    modalities = {}
    for name, v in mods.items():
        check_name(name, "modality")
        what = f"modality {name!r}"
        v = _dict(v, what)
        dtype = _get(v, "dtype", what)
        if dtype not in EMBEDDING_DTYPES:
            raise _bad(f"{what} dtype", dtype, f"one of {EMBEDDING_DTYPES}")
        enc = _dict(_get(v, "encoder", what), f"{what} encoder")
        ename = _get(enc, "name", f"{what} encoder")
        if not isinstance(ename, str):
            raise _bad(f"{what} encoder name", ename, "a string")
        modalities[name] = ModalityInfo(
            dim=_int(_get(v, "dim", what), f"{what} dim", 1),
            dtype=dtype,
            encoder=EncoderInfo(
                ename,
                _str_or_none(enc.get("checkpoint"), f"{what} encoder checkpoint"),
                _str_or_none(enc.get("sha256"), f"{what} encoder sha256"),
            ),
        )
    has_labels = _get(d, "has_labels", "the manifest")
    if not isinstance(has_labels, bool):
        raise _bad("has_labels", has_labels, "true or false")
    label_names = d.get("label_names")
    if label_names is not None and (
        not isinstance(label_names, list) or not all(isinstance(n, str) for n in label_names)
    ):
        raise _bad("label_names", label_names, "a list of strings or null")
    shard_list = _get(d, "shards", "the manifest")
    if not isinstance(shard_list, list):
        raise _bad("shards", shard_list, "a list")
    m = Manifest(
        modalities=modalities,
        has_labels=has_labels,
        label_names=label_names,
        progress=_dict(d.get("progress") or {}, "progress"),
        source=_dict(d.get("source") or {}, "source"),
    )
    history = d.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise _bad("history", history, "a list of objects")
    m.history = history
    seen: set[str] = set()
    for i, s in enumerate(shard_list):
        s = _dict(s, f"shard {i}")
        name = check_name(_get(s, "name", f"shard {i}"), f"shard {i} name")
        if name in seen:
            raise MemoryFormatError(f"corrupt manifest: shard {name!r} is listed twice")
        seen.add(name)
        what = f"shard {name!r}"
        files = {}
        for fname, fi in _dict(_get(s, "files", what), f"{what} files").items():
            check_name(fname, f"{what} file")
            fi = _dict(fi, f"{what} file {fname!r}")
            digest = _get(fi, "sha256", f"{what} file {fname!r}")
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise _bad(f"{what} file {fname!r} sha256", digest, "64 hex digits")
            files[fname] = FileInfo(
                bytes=_int(_get(fi, "bytes", f"{what} file {fname!r}"), f"{what} bytes", 0),
                sha256=digest,
            )
        rows = _int(_get(s, "rows", what), f"{what} rows", 0)
        if version == 1:
            first_id: int | None = m.rows  # format 1: ids are the row numbers
        else:
            first_id = s.get("first_id")
            if first_id is not None:
                first_id = _int(first_id, f"{what} first_id", 0)
        shard = ShardInfo(name=name, rows=rows, files=files, first_id=first_id)
        missing = [f for f in m.required_files(shard) if f not in files]
        if missing:
            raise MemoryFormatError(f"corrupt manifest: {what} lists no {', '.join(missing)}")
        m.shards.append(shard)
    if version == 1:
        m.next_id = m.rows
        numbers = [int(s.name) for s in m.shards if s.name.isdigit()]
        m.next_shard = max(numbers, default=-1) + 1
        return m
    m.commit = _int(_get(d, "commit", "the manifest"), "commit", 0)
    m.next_id = _int(_get(d, "next_id", "the manifest"), "next_id", 0)
    m.next_shard = _int(_get(d, "next_shard", "the manifest"), "next_shard", 0)
    for s in m.shards:
        if s.first_id is not None and s.first_id + s.rows > m.next_id:
            raise _bad(f"shard {s.name!r} first_id", s.first_id, f"ids below next_id={m.next_id}")
    stones = _get(d, "tombstones", "the manifest")
    if not isinstance(stones, list):
        raise _bad("tombstones", stones, "a list")
    for i, t in enumerate(stones):
        t = _dict(t, f"tombstones[{i}]")
        what = f"tombstones[{i}]"
        digest = _get(t, "sha256", what)
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise _bad(f"{what} sha256", digest, "64 hex digits")
        m.tombstones.append(
            TombstoneInfo(
                name=check_name(_get(t, "name", what), f"{what} name"),
                rows=_int(_get(t, "rows", what), f"{what} rows", 1),
                bytes=_int(_get(t, "bytes", what), f"{what} bytes", 0),
                sha256=digest,
            )
        )
    if len({t.name for t in m.tombstones}) != len(m.tombstones):
        raise MemoryFormatError("corrupt manifest: a tombstone file is listed twice")
    if m.deleted > m.rows:
        raise MemoryFormatError(
            f"corrupt manifest: {m.deleted} rows are tombstoned, but the shards hold {m.rows}"
        )
    retired = _get(d, "retired", "the manifest")
    if not isinstance(retired, list):
        raise _bad("retired", retired, "a list")
    for i, r in enumerate(retired):
        r = _dict(r, f"retired[{i}]")
        m.retired.append(
            Retired(
                commit=_int(_get(r, "commit", f"retired[{i}]"), f"retired[{i}] commit", 1),
                shards=_names(_get(r, "shards", f"retired[{i}]"), f"retired[{i}] shard"),
                tombstones=_names(
                    _get(r, "tombstones", f"retired[{i}]"), f"retired[{i}] tombstone"
                ),
            )
        )
    shards, stones = {s.name for s in m.shards}, {t.name for t in m.tombstones}
    for r in m.retired:
        if shards & set(r.shards) or stones & set(r.tombstones):
            raise MemoryFormatError("corrupt manifest: a retired file is still listed as live")
    return m
