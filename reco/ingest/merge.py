"""Merging memories built with the same encoders into one, streaming and resumably.

Two orders:
- the parts of one partitioned build (every part of a `Partition` of one source, each finished):
  rows are interleaved back into source order (by their `item` column), so the merge equals a
  build of the whole source in one process: the same rows, ids, metadata and progress;
- any other memories: concatenated in the order given.

The merged memory is written by a MemoryWriter (crash-safe commits); its progress records a
cursor per part and the parts' versions, so after a crash or Ctrl-C the same merge resumes where
its last commit left off. Rows are read a block at a time from the memory-mapped parts: never
all at once. Every row gets a new stable id in the merged memory (ids 0.. in merge order);
deleted rows of the parts are left out. With dedup, a row whose image_sha256 an earlier row of
the merge has is dropped (the digests seen are the one per-row state held in RAM).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..memory.files import as_path
from ..memory.manifest import (
    METADATA_FILE,
    SHARDS_DIR,
    Manifest,
    MemoryFormatError,
    MemorySourceError,
)
from ..memory.store import Memory, MemoryWriter, inside, layout_differences, read_manifest
from .build import _progress
from .dedup import _committed_column
from .sources import _check_count

log = logging.getLogger(__name__)

SKIP_COUNTS = ("unreadable", "empty_caption", "missing_caption", "duplicates", "near_duplicates")


@dataclass
class MergeReport:
    rows: int = 0  # rows in the merged memory
    added: int = 0  # rows this run added
    parts: int = 0
    interleaved: bool = False  # the parts of one partitioned build, put back in source order
    deleted: int = 0  # deleted rows of the parts, left out
    duplicates: int = 0  # rows dropped by dedup (over the whole merge, resumed runs included)

    def summary(self) -> str:
        order = "source order" if self.interleaved else "concatenated"
        return (
            f"{self.rows} rows from {self.parts} parts ({order}; {self.added} added this run); "
            f"left out: {self.deleted} deleted rows, {self.duplicates} exact duplicates"
        )


def _check_compatible(parts: list[tuple[Path, Manifest]]) -> None:
    """Refuses parts whose modalities, dims, dtypes, encoders or labels differ from the first's."""
    (root0, m0), problems = parts[0], []
    for root, m in parts[1:]:
        why = layout_differences(m0, m, ("the first part's", "this part's"))
        if m.label_names != m0.label_names and "label names differ" not in why:
            why.append("label names differ")
        if why:
            problems.append(f"{root}: {'; '.join(why)}")
    if problems:
        raise MemoryFormatError(
            f"cannot merge memories built differently from the first part ({root0}): "
            + " | ".join(problems)
        )


def _partitioned(parts: list[tuple[Path, Manifest]]) -> dict[str, Any] | None:
    """The common source of the parts when they are every part of one partitioned build (all
    finished), else None (concatenation); an incomplete or inconsistent set is an error."""
    marks = [m.source.get("partition") for _, m in parts]
    if all(p is None for p in marks):
        return None
    if any(p is None for p in marks):
        raise ValueError(
            "the parts mix parts of a partitioned build with other memories: merge a "
            "partitioned build's parts on their own"
        )
    base = {k: v for k, v in parts[0][1].source.items() if k != "partition"}
    want = marks[0]["parts"]
    for (root, m), mark in zip(parts, marks):
        if {k: v for k, v in m.source.items() if k != "partition"} != base:
            raise ValueError(f"{root} is a part of a build of another source than {parts[0][0]}")
        if (mark["parts"], mark["chunk"]) != (want, marks[0]["chunk"]):
            raise ValueError(f"{root} is a part of another partition than {parts[0][0]}")
        if not m.progress.get("done"):
            raise ValueError(
                f"{root} (part {mark['part']} of {want}) is not finished: build it first"
            )
    have = sorted(mark["part"] for mark in marks)
    if have != list(range(want)):
        missing = sorted(set(range(want)) - set(have))
        twice = sorted({p for p in have if have.count(p) > 1})
        why = [f"missing part(s) {missing}"] if missing else []
        why += [f"part(s) {twice} given twice"] if twice else []
        raise ValueError(
            f"a partitioned build of {want} parts needs each part once: {'; '.join(why)}"
        )
    return base


def _shard_columns(root: Path, shard: str) -> list[str]:
    """The metadata columns of a shard (its Parquet schema; none for the writer's placeholder)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = root / SHARDS_DIR / shard / METADATA_FILE
    inside(root, path, f"shard {shard!r} file {METADATA_FILE!r}")
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError) as e:
        raise MemoryFormatError(f"shard file {path} is not readable Parquet ({e})") from None
    return [] if names == ["row"] else names


class _Cursor:
    """Reads one part's rows in order, a block within one shard at a time."""

    def __init__(self, root: Path, manifest: Manifest, row: int) -> None:
        self.root, self.row = root, row
        self.mem = Memory.open(root) if manifest.shards else None
        self.rows = manifest.rows
        self._shard, self._meta = -1, None
        self._items: np.ndarray | None = None  # the loaded shard's `item` column

    def close(self) -> None:
        if self.mem is not None:
            self.mem.close()

    @property
    def done(self) -> bool:
        return self.row >= self.rows

    def _load(self) -> tuple[int, int]:
        """(shard index, first row) of the shard holding self.row; its metadata loaded."""
        assert self.mem is not None
        offsets = self.mem.shard_offsets
        s = int(np.searchsorted(offsets, self.row, side="right")) - 1
        if s != self._shard:
            table = self.mem.shard_metadata(s)
            names = [] if table.column_names == ["row"] else table.column_names  # placeholder
            self._meta = {c: table.column(c).to_pylist() for c in names}
            items = self._meta.get("item")
            self._items = None if items is None else np.asarray(items, dtype=np.int64)
            self._shard = s
        return s, offsets[s]

    def items(self) -> np.ndarray:
        """The `item` column from self.row to the end of its shard."""
        _, first = self._load()
        if self._items is None:
            raise MemoryFormatError(f"{self.root}: a partitioned build's part without `item`")
        return self._items[self.row - first :]  # a view: no copy per run

    def take(self, n: int) -> dict[str, Any]:
        """The next n rows (at most to the end of the current shard), and moves past them."""
        assert self.mem is not None
        s, first = self._load()
        assert self._meta is not None
        stop = min(self.row + n, self.mem.shard_offsets[s + 1])
        rows = torch.arange(self.row, stop)
        block = {
            "embeddings": {m: self.mem.keys(m)[rows] for m in self.mem.modalities},
            "labels": None if self.mem.labels is None else self.mem.labels[rows],
            "meta": {c: v[self.row - first : stop - first] for c, v in self._meta.items()},
            "live": self.mem.live[rows],
        }
        self.row = stop
        return block


def merge_memories(
    out: str | os.PathLike,
    parts: Sequence[str | os.PathLike],
    *,
    dedup: bool = False,
    shard_rows: int = 1 << 16,
    block_rows: int = 8192,
    progress_bar: bool = False,
) -> MergeReport:
    """Merges the memories `parts` into a new memory at `out` (or resumes that merge).

    The parts must have the same modalities, dims, dtypes, encoders and labels; other parts are
    refused with a MemoryFormatError naming each difference. See the module docstring for the
    order, ids, dedup and resume.
    """
    _check_count("shard_rows", shard_rows)
    _check_count("block_rows", block_rows)
    if isinstance(parts, (str, bytes, os.PathLike)) or not parts:
        raise ValueError("parts must be a non-empty list of memory folders")
    root = as_path(out)
    roots = [as_path(p) for p in parts]
    for r in roots:
        a, b = r.resolve(), root.resolve()
        if a == b or a in b.parents or b in a.parents:
            raise ValueError(f"out {root} must lie outside every part (and hold none): {r}")
    manifests = [(r, read_manifest(r)) for r in roots]
    _check_compatible(manifests)
    base = _partitioned(manifests)
    columns: list[str] = []  # the union of the parts' metadata columns, in first-seen order
    for r, m in manifests:
        for shard in m.shards:
            names = _shard_columns(r, shard.name)
            if dedup and "image_sha256" not in names:
                raise ValueError(f"dedup needs the image_sha256 column, which {r} lacks")
            columns += [c for c in names if c not in columns]
    identity = [{"path": str(r.resolve()), "commit": m.commit} for r, m in manifests]
    if base is not None:
        source = base
    else:
        source = {
            "kind": "merge",
            "parts": [{**i, "source": m.source} for i, (_, m) in zip(identity, manifests)],
        }
    m0 = manifests[0][1]
    report = MergeReport(parts=len(roots), interleaved=base is not None)
    writer = MemoryWriter(
        root,
        m0.modalities,
        has_labels=m0.has_labels,
        label_names=m0.label_names,
        shard_rows=shard_rows,
        source=source,
    )
    with writer:
        state = writer.progress
        # Merged already (or, for a partitioned build's parts, that source is built in full).
        if state.get("done") and (base is not None or state.get("merged") == identity):
            report.rows = writer.rows
            report.duplicates = int(state.get("merge_duplicates", 0))
            return report
        if writer.rows and state.get("merged") != identity:
            raise MemorySourceError(
                f"{root} holds rows that are not an interrupted merge of these parts (of these "
                "versions): merge into a new folder"
            )
        cursor = [int(c) for c in state.get("cursor", [0] * len(roots))]
        report.duplicates = int(state.get("merge_duplicates", 0))
        seen = set(_committed_column(root, "image_sha256")) if dedup and writer.rows else set()
        readers = [_Cursor(r, m, c) for (r, m), c in zip(manifests, cursor)]
        start = writer.rows
        bar = _progress(progress_bar, initial=sum(cursor))
        try:
            while True:
                p, n = _next_run(readers, base is not None, block_rows)
                if p < 0:
                    break
                block = readers[p].take(n)
                bar.update(n)
                keep = block["live"].numpy().copy()
                report.deleted += int((~keep).sum())
                if dedup:
                    for i, digest in enumerate(block["meta"]["image_sha256"]):
                        if not keep[i]:
                            continue
                        if digest in seen:
                            keep[i] = False
                            report.duplicates += 1
                        else:
                            seen.add(digest)
                progress = {
                    "merged": identity,
                    "cursor": [rd.row for rd in readers],
                    "merge_duplicates": report.duplicates,
                }
                sel = torch.from_numpy(np.flatnonzero(keep))
                if not len(sel):
                    writer.set_progress(progress)
                    continue
                idx = sel.tolist()
                meta = {c: [block["meta"].get(c, [None] * n)[i] for i in idx] for c in columns}
                writer.add(
                    {m: e[sel] for m, e in block["embeddings"].items()},
                    labels=None if block["labels"] is None else block["labels"][sel],
                    metadata=meta,
                    progress=progress,
                )
            writer.set_progress(_final_progress(manifests, base, identity, report))
        finally:
            bar.close()
            for rd in readers:
                rd.close()
    report.rows = writer.rows
    report.added = writer.rows - start
    log.info("merged %s: %s", root, report.summary())
    return report


def _next_run(readers: list[_Cursor], interleaved: bool, block_rows: int) -> tuple[int, int]:
    """(part, rows) to read next; (-1, 0) when every part is read. Interleaved: the part whose
    next row comes first in the source, for as long as it stays first."""
    open_parts = [i for i, rd in enumerate(readers) if not rd.done]
    if not open_parts:
        return -1, 0
    if not interleaved:
        return open_parts[0], block_rows
    heads = {i: readers[i].items() for i in open_parts}
    first = min(open_parts, key=lambda i: heads[i][0])
    others = [heads[i][0] for i in open_parts if i != first]
    n = len(heads[first]) if not others else int(np.searchsorted(heads[first], min(others)))
    return first, max(1, min(n, block_rows))


def _final_progress(
    manifests: list[tuple[Path, Manifest]],
    base: dict[str, Any] | None,
    identity: list[dict[str, Any]],
    report: MergeReport,
) -> dict[str, Any]:
    """A finished merge's progress: for a partitioned build's parts, what a build of the whole
    source in one process records (items consumed, skip counts; duplicates across parts
    included), so the merged memory resumes as that build."""
    done: dict[str, Any] = {"merged": identity, "merge_duplicates": report.duplicates, "done": True}
    if base is None:
        return done
    skipped = {k: 0 for k in SKIP_COUNTS}
    for _, m in manifests:
        for k in SKIP_COUNTS:
            skipped[k] += int(m.progress.get("skipped", {}).get(k, 0))
    skipped["duplicates"] += report.duplicates
    consumed = sum(int(m.progress.get("consumed", 0)) for _, m in manifests)
    return {"consumed": consumed, "skipped": skipped, **done}
