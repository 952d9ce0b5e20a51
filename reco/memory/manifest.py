"""The memory's manifest: what a memory folder holds, and the commit point of every write.

A memory folder:

    manifest.json                  this file's JSON (written last: the commit point)
    shards/00000/image_emb.npy     [rows, dim] float16 | float32, one file per modality
    shards/00000/text_emb.npy
    shards/00000/labels.npy        optional int64 [rows]
    shards/00000/metadata.parquet  one row per item: caption, source, label_name, ...
    .lock                          held (flock) by the one writer

Only shards listed in the manifest exist for readers; anything else under shards/ is the debris of
an interrupted write and is removed by the next writer.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

FORMAT_NAME = "reco-memory"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
LOCK_FILE = ".lock"
EMBEDDING_DTYPES = ("float16", "float32")
METADATA_FILE = "metadata.parquet"
LABELS_FILE = "labels.npy"


class MemoryFormatError(ValueError):
    """A memory folder, manifest or shard that is missing, malformed, or fails its checks."""


def embedding_file(modality: str) -> str:
    return f"{modality}_emb.npy"


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


@dataclass
class Manifest:
    modalities: dict[str, ModalityInfo]
    has_labels: bool = False
    label_names: list[str] | None = None
    shards: list[ShardInfo] = field(default_factory=list)
    # What the builder had consumed from its source when the last shard was committed (resume).
    progress: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def to_json(self) -> str:
        d = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "rows": self.rows,
            "modalities": {m: dataclasses.asdict(info) for m, info in self.modalities.items()},
            "has_labels": self.has_labels,
            "label_names": self.label_names,
            "shards": [dataclasses.asdict(s) for s in self.shards],
            "progress": self.progress,
            "source": self.source,
        }
        return json.dumps(d, indent=1, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest.json") -> Manifest:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise MemoryFormatError(f"{where} is not valid JSON ({e})") from e
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise MemoryFormatError(f"{where} is not a reco memory manifest")
        if d.get("version") != FORMAT_VERSION:
            raise MemoryFormatError(
                f"{where} has format version {d.get('version')}; this reco reads {FORMAT_VERSION}"
            )
        try:
            modalities = {
                m: ModalityInfo(
                    dim=int(v["dim"]), dtype=str(v["dtype"]), encoder=EncoderInfo(**v["encoder"])
                )
                for m, v in d["modalities"].items()
            }
            shards = [
                ShardInfo(
                    name=str(s["name"]),
                    rows=int(s["rows"]),
                    files={f: FileInfo(**fi) for f, fi in s["files"].items()},
                )
                for s in d["shards"]
            ]
            m = cls(
                modalities=modalities,
                has_labels=bool(d["has_labels"]),
                label_names=d.get("label_names"),
                shards=shards,
                progress=dict(d.get("progress") or {}),
                source=dict(d.get("source") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise MemoryFormatError(f"{where} is malformed: {e!r}") from e
        if m.rows != d.get("rows"):
            raise MemoryFormatError(
                f"{where} says rows={d.get('rows')} but its shards hold {m.rows}"
            )
        for name, info in m.modalities.items():
            if info.dtype not in EMBEDDING_DTYPES or info.dim < 1:
                raise MemoryFormatError(f"{where}: modality {name!r} has dim/dtype {info}")
        return m
