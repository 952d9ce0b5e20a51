"""A build over torch.distributed ranks (launched by torchrun; the caller joins the group).

Rank r of K builds part r of the source (`Partition`: chunks of batch_size consecutive items,
chunk c in part c % K) into its own folder, OUT.parts/part-<r>-of-<K>: an ordinary memory,
crash-safe and resumable on its own. When every part is finished, rank 0 merges them into OUT
in source order (merge.py), then removes the part folders (unless keep_parts). The merged memory
equals a build of the whole source in one process: the same rows, ids and metadata.

A rank that dies is restarted (torchrun --max-restarts restarts the group): each rank resumes
its part and keeps what it committed; a finished part, or a finished OUT, is not built again.
Errors are shared: a rank whose part fails makes every rank raise, naming it.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..memory.files import as_path, flat
from ..memory.manifest import MANIFEST_FILE
from ..memory.store import read_manifest
from .build import BuildReport, Partition, build_from_items
from .merge import MergeReport, merge_memories
from .sources import ItemSource, RawItem

log = logging.getLogger(__name__)


class DistributedBuildError(RuntimeError):
    """A distributed build failed on some rank (the message names it); every rank raises."""


def parts_folder(out: str | os.PathLike) -> Path:
    """Where the parts of a distributed build of `out` are built: OUT.parts, beside it."""
    root = as_path(out)
    return root.with_name(root.name + ".parts")


def part_folder(out: str | os.PathLike, part: int, parts: int) -> Path:
    return parts_folder(out) / f"part-{part:05d}-of-{parts:05d}"


def _finished(out: Path, source: dict[str, Any]) -> bool:
    """Whether out holds a finished build (or merge) of source."""
    if not os.path.lexists(out / MANIFEST_FILE):
        return False
    m = read_manifest(out)
    return m.source == source and bool(m.progress.get("done"))


def _remove_parts(out: Path, world: int, source: dict[str, Any]) -> None:
    """Removes the part folders of this build of out (each checked to be a part memory of this
    source and partition first), then OUT.parts if nothing else is left in it."""
    for r in range(world):
        folder = part_folder(out, r, world)
        if not os.path.lexists(folder / MANIFEST_FILE):
            continue
        m = read_manifest(folder)
        mark = m.source.get("partition", {})
        base = {k: v for k, v in m.source.items() if k != "partition"}
        if base == source and mark.get("part") == r and mark.get("parts") == world:
            shutil.rmtree(folder)
    try:
        parts_folder(out).rmdir()
    except OSError:  # something else is there: it stays
        pass


def _share_errors(error: str | None, what: str) -> None:
    """Raises on every rank if any rank's step failed (error: its message, or None)."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        raise DistributedBuildError(
            f"{what} failed on " + "; ".join(f"rank {r}: {e}" for r, e in failed)
        )


def build_distributed(
    out: str | os.PathLike,
    items: ItemSource | Iterable[RawItem],
    *,
    batch_size: int = 256,
    shard_rows: int = 1 << 16,
    dedup: bool = True,
    keep_parts: bool = False,
    progress_bar: bool = True,
    **build_kw: Any,
) -> BuildReport | MergeReport:
    """Builds the memory `out` from items over the default process group's ranks; call it on
    every rank with the same arguments (items listed in the same order on every rank). Returns
    this rank's part report (the merge's on rank 0). build_kw: build_from_items' other options
    (encoders, label_names, dtype, near_duplicates, workers, ...); append is not supported."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "build_distributed needs a torch.distributed process group (launch with torchrun)"
        )
    if build_kw.get("append"):
        raise ValueError("a distributed build makes a new memory: it cannot append")
    root = as_path(out)
    rank, world = dist.get_rank(), dist.get_world_size()
    source = build_kw.pop("source", None)
    if source is None and isinstance(items, ItemSource):
        source = items.source
    if source is None:
        raise ValueError("a distributed build needs a source identity (an ItemSource, or source=)")
    if world == 1:  # one part is the whole source: built in place
        kw = {"batch_size": batch_size, "shard_rows": shard_rows, "dedup": dedup}
        return build_from_items(
            root, items, source=source, progress_bar=progress_bar, **kw, **build_kw
        )
    state = [_finished(root, source) if rank == 0 else None]
    dist.broadcast_object_list(state, src=0)
    if state[0]:
        log.info("%s is already built from this source: nothing to do", root)
        if rank == 0 and not keep_parts:  # a restart after the merge, before the parts went
            _remove_parts(root, world, source)
        return BuildReport(rows=read_manifest(root).rows)

    part = part_folder(root, rank, world)
    error, report = None, None
    try:
        part.parent.mkdir(parents=True, exist_ok=True)
        report = build_from_items(
            part,
            items,
            batch_size=batch_size,
            shard_rows=shard_rows,
            dedup=dedup,
            source=source,
            partition=Partition(rank, world, batch_size),
            progress_bar=progress_bar and rank == 0,
            **build_kw,
        )
    except Exception as e:
        error = f"{type(e).__name__}: {flat(e)}"
        log.error("rank %d: building %s failed: %s", rank, part, error)
    _share_errors(error, f"building the parts of {root}")

    merged, error = None, None
    if rank == 0:
        try:
            parts = [part_folder(root, r, world) for r in range(world)]
            merged = merge_memories(
                root, parts, dedup=dedup, shard_rows=shard_rows, progress_bar=progress_bar
            )
            if not keep_parts:
                _remove_parts(root, world, source)
        except Exception as e:
            error = f"{type(e).__name__}: {flat(e)}"
            log.error("rank 0: merging into %s failed: %s", root, error)
    _share_errors(error, f"merging the parts into {root}")
    assert report is not None
    return merged if merged is not None else report
