"""Writing and reading memory folders.

The crash-safety contract: at any point of a write (a crash, `kill -9`, Ctrl-C, a full disk), the
folder holds the last committed manifest and every file it names, intact, and a new writer resumes
from there. A commit is a sequence of atomic steps:

1. the journal (`.journal.json`, replaced atomically) records the shard folder names about to be
   created;
2. the shard is written into a temporary folder, every file and the folder fsynced, and renamed
   into place;
3. a new manifest naming the shard is written to a temporary file, fsynced and renamed over
   `manifest.json` (the commit point);
4. the journal is cleared.

A delete writes the tombstoned ids to a new file under `tombstones/` the same way (journaled,
fsynced, renamed) and commits a manifest listing it. A compaction writes the shards that hold
tombstoned rows again without them, as new shard folders (journaled), and commits a manifest that
names the new shards and lists the old shards and tombstone files as `retired`; it removes none of
them. `gc()` (and the next compaction) removes retired files once no live reader lease (see
leases.py) holds a version older than their retirement, and only then drops them from the
manifest (a crash in between leaves names of files already gone, which the next gc skips).

Cleanup after an interrupted commit removes only the journal's names that the manifest on disk
does not list; no code path deletes a file that a committed manifest names, nor a file the writer
did not create. One writer at a time holds an flock on `.lock` (released by the kernel if the
process dies, so `kill -9` never leaves a stale lock). Readers open only regular files inside the
memory folder, of the size the manifest gives.
"""

from __future__ import annotations

import bisect
import dataclasses
import errno
import fcntl
import hashlib
import io
import json
import os
import secrets
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import files, leases
from .files import as_path, fsync_dir
from .manifest import (
    EMBEDDING_DTYPES,
    IDS_FILE,
    JOURNAL_FILE,
    JOURNAL_TMP,
    LABELS_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    MANIFEST_TMP,
    MAX_MANIFEST_BYTES,
    METADATA_FILE,
    RESERVED,
    SHARDS_DIR,
    TOMBSTONES_DIR,
    EncoderInfo,
    FileInfo,
    Manifest,
    MemoryFormatError,
    MemorySourceError,
    ModalityInfo,
    Retired,
    ShardInfo,
    TombstoneInfo,
    check_name,
    embedding_file,
)


class MemoryLockedError(RuntimeError):
    """Another process is writing to the same memory folder."""


class MemoryWriteError(OSError):
    """A write failed (disk full, I/O error); the memory stays at its last commit."""


# Fault points: tests set this to a callable that raises at a named step of a commit.
_fault_hook: Callable[[str], None] | None = None


# The lock fds this process holds. A forked child (a DataLoader worker) closes its copies: the
# flock stays the parent's and ends with the parent's descriptor, not with the child's life.
_HELD_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in list(_HELD_LOCKS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def _fault(point: str) -> None:
    if _fault_hook is not None:
        _fault_hook(point)


def _tmp_name(name: str) -> str:
    return f"{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def _write_synced(path: Path, data: bytes) -> FileInfo:
    with open(path, "xb") as f:  # never overwrites: every name written is fresh or reserved
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return FileInfo(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def _replace_synced(root: Path, tmp_name: str, final_name: str, data: bytes, step: str) -> None:
    """Atomically replaces root/final_name by data (through the reserved root/tmp_name)."""
    tmp = root / tmp_name
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    _write_synced(tmp, data)
    _fault(f"{step}:written")
    os.replace(tmp, root / final_name)
    _fault(f"{step}:replaced")
    fsync_dir(root)
    _fault(f"{step}:synced")


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _parquet_bytes(columns: Mapping[str, list]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.table(dict(columns))
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise ValueError(f"metadata columns cannot be stored in Parquet ({e})") from None
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Atomically replaces root/manifest.json: the commit point of every write."""
    _replace_synced(root, MANIFEST_TMP, MANIFEST_FILE, manifest.to_json().encode(), "manifest")


def inside(root: Path, path: Path, what: str) -> Path:
    """path with symlinks resolved, if it lies inside the memory folder root; else a corrupt-
    manifest error naming what."""
    return files.inside(root, path, f"corrupt manifest: {what}", MemoryFormatError, "memory folder")


def _remove_entry(root: Path, path: Path, what: str) -> str | None:
    """Removes a file or link, or a folder once it is checked to lie inside root; returns "file",
    "folder", or None where nothing was there."""
    if path.is_symlink() or path.is_file():
        path.unlink()
        return "file"
    if path.is_dir():
        inside(root, path, what)
        shutil.rmtree(path)
        return "folder"
    return None


def open_regular(path: Path, what: str, size: int | None = None, limit: int | None = None) -> int:
    return files.open_regular(path, what, size=size, limit=limit, error=MemoryFormatError)


def read_regular(path: Path, what: str, size: int | None = None, limit: int | None = None) -> bytes:
    return files.read_regular(path, what, size=size, limit=limit, error=MemoryFormatError)


def read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST_FILE
    if not path.exists() and not path.is_symlink():
        raise MemoryFormatError(f"{root} is not a reco memory (no {MANIFEST_FILE})")
    inside(root, path, MANIFEST_FILE)
    data = read_regular(path, "manifest", limit=MAX_MANIFEST_BYTES)
    return Manifest.from_json(data, where=str(path))


def _to_numpy(x: object, what: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{what} must be an array, got {type(x).__name__}")
    a = np.asarray(x)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{what} must hold real numbers, got dtype {a.dtype}")
    return a


@dataclass(frozen=True)
class _Buffer:
    """Rows added and not yet committed. add() replaces the whole buffer in one assignment, so
    an interrupt leaves either the old or the new buffer, never half of one."""

    arrays: dict[str, tuple[np.ndarray, ...]]
    labels: tuple[np.ndarray, ...] = ()
    meta: dict[str, tuple[list, ...]] = dataclasses.field(default_factory=dict)
    rows: int = 0
    progress: dict[str, Any] | None = None


def _jsonable(value: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dict(value or {}), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be a JSON-able dict ({e})") from None


def _folder_is_free(root: Path) -> None:
    """Refuses a folder that holds anything but this writer's own files (a new memory goes into a
    new or empty folder; nothing of the user's is ever treated as debris)."""
    try:
        foreign = sorted(p.name for p in root.iterdir() if p.name not in RESERVED)
    except NotADirectoryError:
        raise ValueError(f"{root} is a file, not a memory folder") from None
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ValueError(
            f"{root} is not empty and is not a reco memory (no {MANIFEST_FILE}; it holds "
            f"{shown}); build into a new or empty folder"
        )


def _check_modalities(modalities: object) -> dict[str, ModalityInfo]:
    if not isinstance(modalities, Mapping) or not modalities:
        raise ValueError(
            "modalities must be a non-empty dict {name: ModalityInfo}, got "
            f"{type(modalities).__name__} {modalities!r:.60}"
        )
    for name, info in modalities.items():
        try:
            check_name(name, "modality")
        except MemoryFormatError:
            raise ValueError(f"modality name {name!r} must be a plain file-name part") from None
        if not isinstance(info, ModalityInfo):
            raise TypeError(f"modalities[{name!r}] must be a ModalityInfo, got {info!r:.60}")
        if isinstance(info.dim, bool) or not isinstance(info.dim, int) or info.dim < 1:
            raise ValueError(f"modalities[{name!r}].dim must be an integer >= 1, got {info.dim}")
        if info.dtype not in EMBEDDING_DTYPES:
            raise ValueError(
                f"modalities[{name!r}].dtype must be one of {EMBEDDING_DTYPES}, got {info.dtype!r}"
            )
    return dict(modalities)


def _summary(source: Mapping[str, Any]) -> str:
    text = json.dumps(source, sort_keys=True)
    return text if len(text) <= 200 else text[:197] + "..."


def _encoder_text(e: EncoderInfo) -> str:
    parts = [e.name]
    if e.checkpoint is not None:
        parts.append(f"checkpoint {e.checkpoint}")
    parts.append(f"sha256 {e.sha256[:12]}..." if e.sha256 is not None else "no checkpoint hash")
    return f"{parts[0]} ({', '.join(parts[1:])})"


def layout_differences(
    have: Manifest, other: Manifest, names: tuple[str, str] = ("the memory's", "the new rows'")
) -> list[str]:
    """What keeps rows laid out as `other` says out of the memory `have`: modalities, dims,
    dtypes, encoders, labels and (when other names them) label names; [] when none."""
    problems = []
    if set(have.modalities) != set(other.modalities):
        problems.append(f"modalities {sorted(have.modalities)} != {sorted(other.modalities)}")
    for m in sorted(set(have.modalities) & set(other.modalities)):
        a, b = have.modalities[m], other.modalities[m]
        if (a.dim, a.dtype) != (b.dim, b.dtype):
            problems.append(f"{m}: {a.dim}-d {a.dtype} != {b.dim}-d {b.dtype}")
        if not same_encoder(a.encoder, b.encoder):
            problems.append(
                f"{m} encoder: {names[0]} is {_encoder_text(a.encoder)}, {names[1]} is "
                f"{_encoder_text(b.encoder)}"
            )
    if have.has_labels != other.has_labels:
        problems.append(f"has_labels {have.has_labels} != {other.has_labels}")
    if other.label_names is not None and have.label_names != other.label_names:
        problems.append("label names differ")
    return problems


def same_encoder(a: EncoderInfo, b: EncoderInfo) -> bool:
    """Whether two encoders are the same: the same name and checkpoint sha256 where both have
    one (the file may have moved), else equal in every field."""
    if a.sha256 is not None and b.sha256 is not None:
        return a.name == b.name and a.sha256 == b.sha256
    return a == b


def as_ids(ids: object, what: str = "ids") -> np.ndarray:
    """ids (a tensor, array or sequence of integers >= 0) as a sorted, unique int64 array."""
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"{what} must be integers, got {type(ids).__name__} {ids!r:.40}")
    if isinstance(ids, Tensor):
        if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
            raise TypeError(f"{what} must be integers, got {ids.dtype}")
        a = ids.detach().cpu().numpy()
    else:
        a = np.asarray(ids)
        if a.dtype.kind not in "iu" and a.size:
            raise TypeError(f"{what} must be integers, got dtype {a.dtype}")
    a = a.reshape(-1)
    if a.size and int(a.min()) < 0:
        raise ValueError(f"{what} must be >= 0, got {int(a.min())}")
    if a.dtype.kind == "u" and a.size and int(a.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{what} must fit in int64, got {int(a.max())}")
    return np.unique(a.astype(np.int64))


def show_ids(ids: np.ndarray, limit: int = 10) -> str:
    """The first ids of a list, and how many there are in all."""
    shown = ", ".join(str(int(i)) for i in ids[:limit])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def shard_ids(root: Path, shard: ShardInfo) -> Tensor:
    """The int64 ids of a shard's rows (memory-mapped from ids.npy, or first_id + arange)."""
    if shard.first_id is not None:
        return torch.arange(shard.first_id, shard.first_id + shard.rows, dtype=torch.int64)
    path = root / SHARDS_DIR / shard.name / IDS_FILE
    inside(root, path, f"shard {shard.name!r} file {IDS_FILE!r}")
    return _open_npy(path, shard.rows, None, "int64", shard.files[IDS_FILE].bytes)


def read_tombstones(root: Path, manifest: Manifest) -> np.ndarray:
    """Every id the manifest's tombstone files list (int64, sorted; read whole, they are small)."""
    parts = [np.zeros(0, np.int64)]
    for t in manifest.tombstones:
        path = root / TOMBSTONES_DIR / t.name
        inside(root, path, f"tombstone file {t.name!r}")
        data = read_regular(path, "tombstone file", size=t.bytes)
        try:
            a = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise MemoryFormatError(f"tombstone file {path} is not a readable .npy ({e})") from e
        if not isinstance(a, np.ndarray) or a.shape != (t.rows,) or a.dtype != np.int64:
            got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            raise MemoryFormatError(
                f"tombstone file {path} holds {got}, the manifest says int64 ({t.rows},)"
            )
        parts.append(a)
    return np.sort(np.concatenate(parts))


@dataclass
class CompactReport:
    removed: int = 0  # tombstoned rows dropped
    rewritten: list[str] = dataclasses.field(default_factory=list)  # old shards written anew
    dropped: list[str] = dataclasses.field(default_factory=list)  # old shards with no row left
    collected: list[str] = dataclasses.field(default_factory=list)  # earlier retired files gone

    def summary(self) -> str:
        return (
            f"removed {self.removed} tombstoned rows; wrote {len(self.rewritten)} shards anew, "
            f"dropped {len(self.dropped)} emptied shards (the old files are retired and removed "
            f"once no reader holds them); removed {len(self.collected)} earlier retired files"
        )


@dataclass
class GcReport:
    removed: list[str] = dataclasses.field(default_factory=list)  # shards/<n>, tombstones/<n>
    kept: list[str] = dataclasses.field(default_factory=list)  # retired, still read by a reader

    def summary(self) -> str:
        return (
            f"removed {len(self.removed)} retired files; kept {len(self.kept)} that open readers "
            "may still read"
        )


class MemoryWriter:
    """Appends rows to a memory folder in shards; resumes an existing memory with the same layout.

    Rows are buffered and committed as one shard once `shard_rows` are pending (a shard holds
    whole `add` batches, so it may exceed `shard_rows` by less than one batch), on `commit()`, and
    on `close()`. `progress` (any JSON-able dict, e.g. how many source items were consumed) is
    committed with the rows it describes, so a builder resumes exactly after the last commit.

    `source` identifies what the rows come from. An existing memory resumes only from the source it
    records; another source is refused unless `append=True`, which starts that source from its
    beginning (progress {}) and adds its rows after the memory's.

    Every committed row gets the next stable id (`next_id`, never reused). `delete(ids)`,
    `compact()` and `gc()` edit a committed memory; `MemoryWriter.open(path)` opens one for that.
    """

    def __init__(
        self,
        path: str | bytes | os.PathLike,
        modalities: Mapping[str, ModalityInfo],
        *,
        has_labels: bool = False,
        label_names: Sequence[str] | None = None,
        shard_rows: int = 1 << 16,
        source: Mapping[str, Any] | None = None,
        append: bool = False,
    ) -> None:
        self._lock_fd: int | None = None
        if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
            raise ValueError(f"shard_rows must be an integer >= 1, got {shard_rows!r}")
        modalities = _check_modalities(modalities)
        if label_names is not None:
            if isinstance(label_names, (str, bytes)) or not all(
                isinstance(n, str) for n in label_names
            ):
                raise TypeError(f"label_names must be a list of strings, got {label_names!r:.60}")
            label_names = list(label_names)
        self.root = as_path(path)
        self.shard_rows = shard_rows
        wanted_source = None if source is None else _jsonable(source, "source")
        if self.root.exists() and not (self.root / MANIFEST_FILE).exists():
            _folder_is_free(self.root)  # before creating anything in it
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            wanted = Manifest(
                modalities=modalities,
                has_labels=bool(has_labels),
                label_names=label_names,
                source=wanted_source or {},
            )
            if (self.root / MANIFEST_FILE).exists() or (self.root / MANIFEST_FILE).is_symlink():
                self.manifest = read_manifest(self.root)
                self._check_compatible(wanted)
                self._recover()
            else:
                _folder_is_free(self.root)
                self._recover()
                write_manifest(self.root, wanted)
                self.manifest = wanted
            (self.root / SHARDS_DIR).mkdir(exist_ok=True)
            inside(self.root, self.root / SHARDS_DIR, SHARDS_DIR)
            self._source, self._history = self.manifest.source, self.manifest.history
            self._progress = self.manifest.progress
            if wanted_source is not None and wanted_source != self.manifest.source:
                self._switch_source(wanted_source, append)
        except BaseException:
            self._release()
            raise
        self._buf = self._empty()
        # The shard name and buffer a commit was writing, until it has finished or been settled.
        self._inflight: tuple[str, _Buffer] | None = None
        # A delete, compaction or gc was interrupted: the manifest on disk is the truth.
        self._unsettled = False

    @classmethod
    def open(cls, path: str | bytes | os.PathLike, *, shard_rows: int = 1 << 16) -> MemoryWriter:
        """A writer of the existing memory at path, with its layout (to add, delete, compact)."""
        root = as_path(path)
        m = read_manifest(root)
        return cls(
            root,
            m.modalities,
            has_labels=m.has_labels,
            label_names=m.label_names,
            shard_rows=shard_rows,
        )

    def _lock(self) -> None:
        lock = self.root / LOCK_FILE
        if lock.is_symlink():
            raise MemoryFormatError(f"{lock} is a symlink; a memory's lock file must be its own")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MemoryLockedError(
                f"{self.root} is being written by another process (it holds {LOCK_FILE}); "
                "wait for it to finish or stop it, then resume"
            ) from None
        self._lock_fd = fd
        _HELD_LOCKS.add(fd)

    def _switch_source(self, source: dict[str, Any], append: bool) -> None:
        have = self.manifest
        if not have.rows and not have.progress:  # nothing consumed yet: the new source starts
            self._source = source
            return
        if not append:
            raise MemorySourceError(
                f"{self.root} was built from another source ({_summary(have.source)}), not "
                f"this one ({_summary(source)}); a resume continues only the same source. To add "
                "this source's rows to the memory, append (append=True, or `reco build-memory "
                "--append`); to build it alone, use another folder"
            )
        self._source, self._progress = source, {}
        self._history = [*have.history, have.source]

    def _empty(self) -> _Buffer:
        return _Buffer(arrays={m: () for m in self.manifest.modalities})

    # -- state ---------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        """Rows committed so far."""
        return self.manifest.rows

    @property
    def progress(self) -> dict[str, Any]:
        """The progress recorded with the last commit of this source ({} for a new one)."""
        return dict(self._progress)

    @property
    def next_id(self) -> int:
        """The id the next committed row gets."""
        return self.manifest.next_id

    def _check_compatible(self, wanted: Manifest) -> None:
        problems = layout_differences(self.manifest, wanted)
        if problems:
            raise MemoryFormatError(
                f"{self.root} already holds a memory built differently ({'; '.join(problems)}); "
                "use a new folder"
            )

    # -- the journal ---------------------------------------------------------------------------
    def _journal(self) -> tuple[list[str], list[str]]:
        """The shard folder and tombstone file names the journal lists (untrusted: each must be a
        plain name)."""
        path = self.root / JOURNAL_FILE
        if not path.exists() and not path.is_symlink():
            return [], []
        inside(self.root, path, JOURNAL_FILE)
        data = read_regular(path, "journal", limit=1 << 20)
        try:
            d = json.loads(data.decode("utf-8"))
            names, stones = d["created"], d.get("tombstones", [])
            if not isinstance(names, list) or not isinstance(stones, list):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise MemoryFormatError(f"{path} is corrupt; nothing was removed") from None
        return (
            [check_name(n, "journal entry") for n in names],
            [check_name(n, "journal entry") for n in stones],
        )

    def _write_journal(self, names: list[str], tombstones: Sequence[str] = ()) -> None:
        d: dict[str, list[str]] = {"created": names}
        if tombstones:
            d["tombstones"] = list(tombstones)
        _replace_synced(self.root, JOURNAL_TMP, JOURNAL_FILE, json.dumps(d).encode(), "journal")

    def _recover(self) -> None:
        """Removes what an interrupted commit left: the journal's names that the manifest on disk
        does not list, live or retired (read again here, so a committed file is never removed)."""
        names, stones = self._journal()
        shards_kept: set[str] = set()
        stones_kept: set[str] = set()
        if (self.root / MANIFEST_FILE).exists():
            disk = read_manifest(self.root)
            shards_kept = {s.name for s in disk.shards}
            stones_kept = {t.name for t in disk.tombstones}
            for r in disk.retired:
                shards_kept.update(r.shards)
                stones_kept.update(r.tombstones)
        for folder, listed, kept in (
            (SHARDS_DIR, names, shards_kept),
            (TOMBSTONES_DIR, stones, stones_kept),
        ):
            for name in listed:
                if name in kept:
                    continue
                _remove_entry(self.root, self.root / folder / name, f"journal entry {name!r}")
        for tmp in (MANIFEST_TMP, JOURNAL_TMP):
            p = self.root / tmp
            if p.is_symlink() or p.is_file():
                p.unlink()
        if names or stones:
            (self.root / JOURNAL_FILE).unlink()
            fsync_dir(self.root)

    def _free_name(self, taken: set[str] | frozenset[str] = frozenset()) -> str:
        """The next shard number that neither the manifest (live or retired), taken, nor the
        folder uses; numbers only grow (next_shard), so a name is never used twice."""
        used = {s.name for s in self.manifest.shards} | set(taken)
        used.update(n for r in self.manifest.retired for n in r.shards)
        n = self.manifest.next_shard
        while f"{n:05d}" in used or os.path.lexists(self.root / SHARDS_DIR / f"{n:05d}"):
            n += 1
        return f"{n:05d}"

    # -- writing -------------------------------------------------------------------------------
    def add(
        self,
        embeddings: Mapping[str, np.ndarray | Tensor],
        *,
        labels: np.ndarray | Tensor | Sequence[int] | None = None,
        metadata: Mapping[str, Sequence] | None = None,
        progress: Mapping[str, Any] | None = None,
    ) -> None:
        """Buffers n rows: embeddings[m] [n, dim] per modality, labels [n], metadata columns [n]."""
        if self._lock_fd is None:
            raise ValueError(f"the writer of {self.root} is closed")
        if not isinstance(embeddings, Mapping) or set(embeddings) != set(self.manifest.modalities):
            got = sorted(embeddings) if isinstance(embeddings, Mapping) else embeddings
            raise ValueError(
                f"embeddings must be a dict with exactly the modalities "
                f"{sorted(self.manifest.modalities)}, got {got!r:.80}"
            )
        n = None
        arrays = {}
        for m, x in embeddings.items():
            a = _to_numpy(x, f"embeddings[{m!r}]")
            info = self.manifest.modalities[m]
            if a.ndim != 2 or a.shape[1] != info.dim:
                raise ValueError(
                    f"embeddings[{m!r}] must be [n, {info.dim}] (the memory's {m} dim), "
                    f"got shape {a.shape}"
                )
            if n is not None and a.shape[0] != n:
                raise ValueError(f"embeddings have different row counts: {a.shape[0]} vs {n}")
            n = a.shape[0]
            if not np.isfinite(a).all():
                raise ValueError(f"embeddings[{m!r}] contains NaN or inf")
            with np.errstate(over="ignore"):
                stored = a.astype(info.dtype, copy=False)
            if not np.isfinite(stored).all():
                raise ValueError(
                    f"embeddings[{m!r}] has values beyond {info.dtype}'s range "
                    f"(max {float(np.finfo(info.dtype).max):g})"
                )
            arrays[m] = stored
        assert n is not None
        buf = self._buf
        new_labels = buf.labels
        if self.manifest.has_labels:
            if labels is None:
                raise ValueError("this memory has labels: pass labels=[n] int64")
            lab = _to_numpy(labels, "labels")
            if lab.shape != (n,) or lab.dtype.kind not in "iu":
                raise ValueError(f"labels must be [n={n}] integers, got {lab.shape} {lab.dtype}")
            names = self.manifest.label_names
            if n and (lab.min() < 0 or (names is not None and lab.max() >= len(names))):
                top = f"{len(names) - 1}" if names is not None else "..."
                raise ValueError(f"labels must lie in [0, {top}], got {lab.min()}..{lab.max()}")
            new_labels = (*buf.labels, lab.astype(np.int64))
        elif labels is not None:
            raise ValueError("this memory was created without labels (has_labels=False)")
        meta = dict(metadata or {})
        if buf.rows and set(meta) != set(buf.meta):
            raise ValueError(f"metadata columns {sorted(meta)} differ from {sorted(buf.meta)}")
        new_meta = dict(buf.meta)
        for col, values in meta.items():
            if not isinstance(col, str):
                raise TypeError(f"metadata column names must be strings, got {col!r}")
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                raise TypeError(
                    f"metadata[{col!r}] must be a list of {n} values, got {type(values).__name__}"
                )
            if len(values) != n:
                raise ValueError(f"metadata[{col!r}] has {len(values)} values for {n} rows")
            new_meta[col] = (*new_meta.get(col, ()), list(values))
        self._buf = _Buffer(
            arrays={m: (*buf.arrays[m], arrays[m]) for m in buf.arrays},
            labels=new_labels,
            meta=new_meta,
            rows=buf.rows + n,
            progress=(_jsonable(progress, "progress") if progress is not None else buf.progress),
        )
        if self._buf.rows >= self.shard_rows:
            self.commit()

    def set_progress(self, progress: Mapping[str, Any]) -> None:
        """Records progress without rows (e.g. the last source items were all skipped); it is
        committed with the next commit."""
        self._buf = dataclasses.replace(self._buf, progress=_jsonable(progress, "progress"))

    def _settle(self) -> None:
        """After an interrupted commit: adopts the manifest on disk (the commit point either was
        reached or was not) and removes the uncommitted files the journal lists."""
        inflight, self._inflight = self._inflight, None
        disk = read_manifest(self.root)
        if inflight is not None and inflight[0] in {s.name for s in disk.shards}:
            self._adopt(disk, inflight[1])
        elif self._unsettled:
            self.manifest = disk
        self._unsettled = False
        self._recover()

    def _adopt(self, manifest: Manifest, committed: _Buffer) -> None:
        """Takes manifest as the last commit, which holds the rows (and progress) of committed."""
        self.manifest, self._progress = manifest, manifest.progress
        if self._buf is committed:  # rows added after an interrupt are kept
            self._buf = self._empty()

    def commit(self) -> None:
        """Writes the pending rows as one shard and commits the manifest. Idempotent: after an
        interrupt anywhere inside it, calling it again commits each row exactly once."""
        self._check_open()
        buf = self._buf
        if buf.rows == 0:
            if buf.progress is not None:
                self._commit_manifest(None, buf.progress)
                self._adopt(self.manifest, buf)
            return
        first = self.manifest.next_id
        ids = np.arange(first, first + buf.rows, dtype=np.int64)
        files = self._encode(buf, ids)  # before touching the disk: bad metadata fails here
        name = self._free_name()
        tmp_name = _tmp_name(name)
        self._inflight = (name, buf)
        try:
            self._write_journal([tmp_name, name])
            infos = self._write_shard(tmp_name, name, files)
            self._commit_manifest(ShardInfo(name=name, rows=buf.rows, files=infos), buf.progress)
            _fault("committed")
            self._adopt(self.manifest, buf)
            _fault("adopted")
            self._inflight = None
            self._write_journal([])
        except OSError as e:
            raise self._failed(
                e, f"writing shard {name}", f"{self.rows} rows; a new writer resumes from there"
            ) from e

    def _check_open(self) -> None:
        """Refuses a closed writer; settles an interrupted commit first."""
        if self._lock_fd is None:
            raise ValueError(f"the writer of {self.root} is closed")
        if self._inflight is not None or self._unsettled:
            self._settle()

    def _write_shard(self, tmp_name: str, name: str, files: Mapping[str, bytes]) -> dict:
        """Writes shards/<tmp_name>/ (every file and the folder fsynced) and renames it to
        shards/<name>; both names must be in the journal already."""
        shards = self.root / SHARDS_DIR
        tmp = shards / tmp_name
        tmp.mkdir()
        _fault("shard:mkdir")
        infos = {}
        for fname, data in files.items():
            infos[fname] = _write_synced(tmp / fname, data)
            _fault("shard:file")
        fsync_dir(tmp)
        _fault("shard:synced")
        os.rename(tmp, shards / name)
        _fault("shard:renamed")
        fsync_dir(shards)
        _fault("shard:dir-synced")
        return infos

    def _encode(self, buf: _Buffer, ids: np.ndarray) -> dict[str, bytes]:
        files = {
            embedding_file(m): _npy_bytes(np.concatenate(parts)) for m, parts in buf.arrays.items()
        }
        if self.manifest.has_labels:
            files[LABELS_FILE] = _npy_bytes(np.concatenate(buf.labels))
        meta = {c: [v for part in parts for v in part] for c, parts in buf.meta.items()}
        files[METADATA_FILE] = _parquet_bytes(meta or {"row": list(range(buf.rows))})
        files[IDS_FILE] = _npy_bytes(ids)
        return files

    def _write_next(self, **changes: Any) -> None:
        """Commits the next version: the manifest with changes, this writer's source, history
        and progress, and commit + 1."""
        fields = {"source": self._source, "history": self._history, "progress": self._progress}
        new = dataclasses.replace(
            self.manifest, **{**fields, **changes, "commit": self.manifest.commit + 1}
        )
        write_manifest(self.root, new)
        self.manifest = new

    def _commit_manifest(self, shard: ShardInfo | None, progress: dict[str, Any] | None) -> None:
        m = self.manifest
        changes: dict[str, Any] = {"progress": progress if progress is not None else self._progress}
        if shard is not None:
            changes["shards"] = [*m.shards, shard]
            changes["next_id"] = m.next_id + shard.rows
            changes["next_shard"] = max(m.next_shard, int(shard.name) + 1)
        self._write_next(**changes)

    # -- editing: delete, compact, gc ----------------------------------------------------------
    def _committed_ids(self) -> np.ndarray:
        parts = [shard_ids(self.root, s).numpy() for s in self.manifest.shards]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def _free_tombstone_name(self) -> str:
        used = {t.name for t in self.manifest.tombstones}
        used.update(n for r in self.manifest.retired for n in r.tombstones)
        n = self.manifest.commit + 1
        while f"{n:08d}.npy" in used or os.path.lexists(
            self.root / TOMBSTONES_DIR / f"{n:08d}.npy"
        ):
            n += 1
        return f"{n:08d}.npy"

    def delete(self, ids: object) -> int:
        """Tombstones the rows of ids (a sequence, array or tensor of ids; repeats count once) in
        one commit; rows still buffered are committed first. An id that no row of the memory has,
        or one already deleted, is a ValueError naming them (nothing is written). The rows stay
        on disk, and readers see them with live False, until compact(). Returns the number of
        rows deleted."""
        self._check_open()
        want = as_ids(ids)
        if not want.size:
            raise ValueError("ids is empty: give at least one id to delete")
        self.commit()
        have = self._committed_ids()
        unknown = want[~np.isin(want, have)]
        if unknown.size:
            raise ValueError(
                f"ids not in the memory {self.root} (it gave ids below {self.next_id}; those "
                f"of compacted rows are gone): {show_ids(unknown)}"
            )
        again = want[np.isin(want, read_tombstones(self.root, self.manifest))]
        if again.size:
            raise ValueError(f"ids already deleted from {self.root}: {show_ids(again)}")
        name = self._free_tombstone_name()
        tmp_name = _tmp_name(name)
        folder = self.root / TOMBSTONES_DIR
        self._unsettled = True
        try:
            self._write_journal([], [tmp_name, name])
            folder.mkdir(exist_ok=True)
            inside(self.root, folder, TOMBSTONES_DIR)
            info = _write_synced(folder / tmp_name, _npy_bytes(want))
            _fault("tombstones:written")
            os.rename(folder / tmp_name, folder / name)
            _fault("tombstones:renamed")
            fsync_dir(folder)
            _fault("tombstones:synced")
            stone = TombstoneInfo(name=name, rows=len(want), bytes=info.bytes, sha256=info.sha256)
            self._write_next(tombstones=[*self.manifest.tombstones, stone])
            _fault("committed")
            self._unsettled = False
            self._write_journal([])
        except OSError as e:
            raise self._failed(e, f"deleting {len(want)} rows") from e
        return len(want)

    def _failed(self, e: OSError, what: str, state: str | None = None) -> MemoryWriteError:
        """The error of a failed write, after the uncommitted files are cleared away; state
        describes the last commit (default: its version)."""
        try:
            self._settle()
        except OSError:
            pass
        why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EFBIG) else str(e)
        state = state or f"version {self.manifest.commit}"
        return MemoryWriteError(
            e.errno,
            f"{what} in {self.root} failed ({why}); the memory stays at its last commit ({state})",
        )

    def _compacted_files(self, shard: ShardInfo, ids: np.ndarray, keep: np.ndarray) -> dict:
        """A shard's files without the rows keep is False for, each source file checked against
        its sha256 first (a compaction never copies a corrupt row into a fresh checksum)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        d = self.root / SHARDS_DIR / shard.name

        def read(fname: str) -> bytes:
            path = d / fname
            inside(self.root, path, f"shard {shard.name!r} file {fname!r}")
            data = read_regular(path, "shard file", size=shard.files[fname].bytes)
            if hashlib.sha256(data).hexdigest() != shard.files[fname].sha256:
                raise MemoryFormatError(f"shard file {path} fails its sha256 check (corrupt)")
            return data

        def array(fname: str, cols: int | None, dtype: str) -> np.ndarray:
            a = np.load(io.BytesIO(read(fname)), allow_pickle=False)
            want = (shard.rows,) if cols is None else (shard.rows, cols)
            if a.shape != want or a.dtype != np.dtype(dtype):
                raise MemoryFormatError(f"shard file {d / fname} holds {a.dtype} {a.shape}")
            return a

        out = {}
        for m, info in self.manifest.modalities.items():
            f = embedding_file(m)
            out[f] = _npy_bytes(array(f, info.dim, info.dtype)[keep])
        if self.manifest.has_labels:
            out[LABELS_FILE] = _npy_bytes(array(LABELS_FILE, None, "int64")[keep])
        if IDS_FILE in shard.files:
            array(IDS_FILE, None, "int64")  # checked; ids holds the same values
        try:
            table = pq.read_table(pa.BufferReader(read(METADATA_FILE)))
        except (pa.ArrowException, OSError, ValueError) as e:
            raise MemoryFormatError(
                f"shard file {d / METADATA_FILE} is not readable Parquet ({e})"
            ) from None
        if table.num_rows != shard.rows:
            raise MemoryFormatError(
                f"shard file {d / METADATA_FILE} has {table.num_rows} rows, the manifest says "
                f"{shard.rows}"
            )
        buf = io.BytesIO()
        pq.write_table(table.take(pa.array(np.flatnonzero(keep))), buf)
        out[METADATA_FILE] = buf.getvalue()
        out[IDS_FILE] = _npy_bytes(ids[keep])
        return out

    def compact(self) -> CompactReport:
        """Writes the shards holding tombstoned rows anew without them (every surviving row
        keeps its id, labels, metadata and embeddings, in the same order) and commits. The old
        shard folders and tombstone files are retired, not removed: gc() (run first by the next
        compaction) removes them once no open reader holds a version that names them."""
        self._check_open()
        self.commit()
        report = CompactReport(collected=self.gc().removed)
        m = self.manifest
        if not m.tombstones:
            return report
        dead = read_tombstones(self.root, m)
        jobs, taken = [], set()
        shards: list[ShardInfo | int] = []
        for s in m.shards:
            ids = shard_ids(self.root, s).numpy()
            keep = ~np.isin(ids, dead)
            if keep.all():
                shards.append(s)
                continue
            report.removed += int((~keep).sum())
            if not keep.any():
                report.dropped.append(s.name)
                continue
            name = self._free_name(taken)
            taken.add(name)
            shards.append(len(jobs))
            jobs.append((s, ids, keep, _tmp_name(name), name))
            report.rewritten.append(s.name)
        if report.removed != len(dead):
            raise MemoryFormatError(
                f"{self.root}: {len(dead)} ids are tombstoned but its shards hold "
                f"{report.removed} of them (corrupt tombstones); nothing was changed"
            )
        self._unsettled = True
        try:
            self._write_journal([n for job in jobs for n in job[3:]])
            written = []
            for s, ids, keep, tmp_name, name in jobs:
                files = self._compacted_files(s, ids, keep)
                infos = self._write_shard(tmp_name, name, files)
                written.append(ShardInfo(name=name, rows=int(keep.sum()), files=infos))
            old = Retired(
                commit=m.commit + 1,
                shards=report.rewritten + report.dropped,
                tombstones=[t.name for t in m.tombstones],
            )
            self._write_next(
                shards=[written[s] if isinstance(s, int) else s for s in shards],
                tombstones=[],
                retired=[*m.retired, old],
                next_shard=max([m.next_shard, *(int(n) + 1 for n in taken)]),
            )
            _fault("committed")
            self._unsettled = False
            self._write_journal([])
        except OSError as e:
            raise self._failed(e, "compacting") from e
        return report

    def gc(self) -> GcReport:
        """Removes the files compactions retired that no live reader lease may still read (a
        lease at version v keeps what was retired after v), then drops them from the manifest
        (not a new version: readers see the same rows). Stale leases are removed too."""
        self._check_open()
        m = self.manifest
        held = leases.held_versions(self.root, remove_stale=True)
        oldest = min(held, default=None)
        free = [r for r in m.retired if oldest is None or oldest >= r.commit]
        report = GcReport()
        for r in m.retired:
            if r not in free:
                report.kept += [f"{SHARDS_DIR}/{n}" for n in r.shards]
                report.kept += [f"{TOMBSTONES_DIR}/{n}" for n in r.tombstones]
        if not free:
            return report
        self._unsettled = True
        try:
            for r in free:
                for folder, names in ((SHARDS_DIR, r.shards), (TOMBSTONES_DIR, r.tombstones)):
                    for name in names:
                        what = f"retired {folder} entry {name!r}"
                        kind = _remove_entry(self.root, self.root / folder / name, what)
                        if kind is None:
                            continue  # removed by an earlier, interrupted gc
                        if kind == "folder":
                            _fault("gc:removed-shard")
                        report.removed.append(f"{folder}/{name}")
            for folder in (SHARDS_DIR, TOMBSTONES_DIR):
                if (self.root / folder).is_dir():
                    fsync_dir(self.root / folder)
            _fault("gc:removed")
            new = dataclasses.replace(m, retired=[r for r in m.retired if r not in free])
            write_manifest(self.root, new)
            self.manifest = new
            self._unsettled = False
        except OSError as e:
            raise self._failed(e, "removing retired files") from e
        return report

    # -- closing -------------------------------------------------------------------------------
    def _release(self) -> None:
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            _HELD_LOCKS.discard(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def close(self, commit: bool = True) -> None:
        """Commits pending rows (unless commit=False) and releases the lock."""
        try:
            if self._lock_fd is not None:
                if commit:
                    self.commit()
                elif self._inflight is not None or self._unsettled:
                    self._settle()
        finally:
            self._release()

    def __enter__(self) -> MemoryWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Ctrl-C: keep what was buffered (whole rows with their progress). Other errors: drop the
        # buffer; the builder resumes from the last commit.
        self.close(commit=exc_type is None or issubclass(exc_type, KeyboardInterrupt))

    def __del__(self) -> None:
        self._release()


class EmbeddingTable:
    """One modality's embeddings over all shards, memory-mapped (nothing is read until used)."""

    def __init__(self, shards: Sequence[Tensor]) -> None:
        if not shards:
            raise ValueError("an EmbeddingTable needs at least one shard")
        self.shards = list(shards)
        self.offsets = [0]
        for s in self.shards:
            self.offsets.append(self.offsets[-1] + s.shape[0])

    @property
    def rows(self) -> int:
        return self.offsets[-1]

    @property
    def dim(self) -> int:
        return self.shards[0].shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.shards[0].dtype

    @property
    def device(self) -> torch.device:
        return self.shards[0].device

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, rows: Tensor) -> Tensor:
        """Gathers rows (integers of any shape, in [0, rows)) into [..., dim]."""
        rows = as_rows(rows, self.rows)
        if len(self.shards) == 1:
            return self.shards[0][rows.to(self.device)]
        flat = rows.reshape(-1).cpu()
        out = torch.empty(flat.numel(), self.dim, dtype=self.dtype, device=self.device)
        bounds = torch.tensor(self.offsets[1:-1], dtype=torch.int64)
        which = torch.searchsorted(bounds, flat, right=True)  # the shard holding each row
        for s in torch.unique(which).tolist():
            sel = (which == s).nonzero().squeeze(1)
            out[sel.to(self.device)] = self.shards[s][(flat[sel] - self.offsets[s]).to(self.device)]
        return out.reshape(*rows.shape, self.dim)

    def materialize(
        self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> Tensor:
        """All rows as one tensor on device (a copy, unless one shard already lives there)."""
        dtype = dtype or self.dtype
        if len(self.shards) == 1:
            return self.shards[0].to(device=device, dtype=dtype)
        out = torch.empty(self.rows, self.dim, dtype=dtype, device=device)
        for s, t in enumerate(self.shards):
            out[self.offsets[s] : self.offsets[s + 1]] = t.to(device=device, dtype=dtype)
        return out

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> EmbeddingTable:
        """The same table with all rows in one tensor on device."""
        return EmbeddingTable([self.materialize(device, dtype)])


def as_rows(rows: object, n: int, what: str = "rows") -> Tensor:
    """rows (a tensor, array or sequence of integers) as an int64 tensor, each in [0, n)."""
    if isinstance(rows, (str, bytes)):
        raise TypeError(f"{what} must be integers, got {type(rows).__name__} {rows!r:.40}")
    if isinstance(rows, Tensor):
        t = rows
    else:
        a = np.asarray(rows)
        if a.dtype.kind not in "iu" and a.size:
            raise TypeError(f"{what} must be integers, got dtype {a.dtype}")
        t = torch.from_numpy(a.astype(np.int64, copy=False))
    if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"{what} must be integers, got {t.dtype}")
    t = t.to(torch.int64)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
        raise IndexError(f"{what} must be in [0, {n}), got {int(t.min())}..{int(t.max())}")
    return t


def _open_npy(path: Path, rows: int, cols: int | None, dtype: str, expect_bytes: int) -> Tensor:
    os.close(open_regular(path, "shard file", size=expect_bytes))
    try:
        arr = np.load(path, mmap_mode="c", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise MemoryFormatError(f"shard file {path} is not a readable .npy ({e})") from e
    want = (rows,) if cols is None else (rows, cols)
    if not isinstance(arr, np.ndarray) or arr.shape != want or arr.dtype != np.dtype(dtype):
        got = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise MemoryFormatError(f"shard file {path} holds {got}, the manifest says {dtype} {want}")
    return torch.from_numpy(arr)


@dataclass
class _Version:
    """One committed version's open files."""

    manifest: Manifest
    tables: dict[str, EmbeddingTable]
    labels: Tensor | None
    shard_ids: list[Tensor]
    tombstones: np.ndarray


def _load(root: Path, verify: str) -> _Version:
    manifest = read_manifest(root)
    if not manifest.shards:
        raise MemoryFormatError(f"{root} holds no rows (none committed yet, or all compacted away)")
    parts: dict[str, list[Tensor]] = {m: [] for m in manifest.modalities}
    labels, ids = [], []
    for shard in manifest.shards:
        d = root / SHARDS_DIR / shard.name
        for fname in shard.files:
            inside(root, d / fname, f"shard {shard.name!r} file {fname!r}")
        for m, info in manifest.modalities.items():
            f = embedding_file(m)
            parts[m].append(
                _open_npy(d / f, shard.rows, info.dim, info.dtype, shard.files[f].bytes)
            )
        if manifest.has_labels:
            size = shard.files[LABELS_FILE].bytes
            labels.append(_open_npy(d / LABELS_FILE, shard.rows, None, "int64", size))
        ids.append(shard_ids(root, shard))
        meta = d / METADATA_FILE
        os.close(open_regular(meta, "shard file", size=shard.files[METADATA_FILE].bytes))
    return _Version(
        manifest,
        {m: EmbeddingTable(p) for m, p in parts.items()},
        torch.cat(labels) if labels else None,
        ids,
        read_tombstones(root, manifest),
    )


class Memory:
    """A memory folder opened for reading: memory-mapped embeddings, labels, metadata, ids.

    A Memory holds one committed version (`version`) until `refresh()`, whatever writers commit
    meanwhile, and keeps a reader lease (leases.py) so that no writer removes a file it reads.
    `close()` (or garbage collection) releases the lease.
    """

    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        tables: dict[str, EmbeddingTable],
        labels: Tensor | None,
        shard_ids: list[Tensor] | None = None,
        tombstones: np.ndarray | None = None,
        lease: leases.Lease | None = None,
    ) -> None:
        self.root = root
        self._lease = lease
        self._placement: tuple[str | torch.device, torch.dtype | None] | None = None
        self._adopt(_Version(manifest, tables, labels, shard_ids or [], tombstones))

    def _adopt(self, v: _Version) -> None:
        self.manifest = v.manifest
        self._tables = v.tables
        self._labels = v.labels
        self._shard_ids = v.shard_ids or [shard_ids(self.root, s) for s in v.manifest.shards]
        self._tombstones = v.tombstones if v.tombstones is not None else np.zeros(0, np.int64)
        self._meta_cache: dict[int, Any] = {}
        self._ids: Tensor | None = None
        self._live: Tensor | None = None

    @classmethod
    def open(cls, path: str | bytes | os.PathLike, verify: str = "size") -> Memory:
        """Opens a memory. verify: "size" (file sizes and .npy headers, cheap) or "full" (also
        the sha256 of every file). Raises MemoryFormatError naming the bad file."""
        if verify not in ("size", "full"):
            raise ValueError(f"verify must be 'size' or 'full', got {verify!r}")
        root = as_path(path)
        lease = None
        if os.path.lexists(root / MANIFEST_FILE):
            lease = leases.Lease(root)
            lease.hold(0)  # everything, until the manifest read below says which version
        try:
            v = _load(root, verify)
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        if lease is not None:
            lease.hold(v.manifest.commit)
        mem = cls(root, v.manifest, v.tables, v.labels, v.shard_ids, v.tombstones, lease)
        if verify == "full":
            mem.verify()
        return mem

    def refresh(self) -> bool:
        """Moves to the memory's latest committed version; returns whether it changed. The
        version held so far stays readable until then (and, on an error, after)."""
        disk = read_manifest(self.root)
        m = self.manifest
        if (disk.commit, disk.shards, disk.tombstones) == (m.commit, m.shards, m.tombstones):
            if self._lease is not None:
                self._lease.hold(m.commit)  # a fresh time stamp
            return False
        v = _load(self.root, "size")  # the lease still holds the old version: nothing goes
        if self._placement is not None:
            v.tables = {k: t.to(*self._placement) for k, t in v.tables.items()}
            v.labels = None if v.labels is None else v.labels.to(self._placement[0])
        self._adopt(v)
        if self._lease is not None:
            self._lease.hold(v.manifest.commit)
        return True

    def close(self) -> None:
        """Releases the reader lease: writers may then remove files this version names (the
        memory-mapped embeddings stay readable; metadata reads may fail)."""
        if self._lease is not None:
            self._lease.release()

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def verify(self, rows: tuple[int, int] | None = None) -> None:
        """Checks the sha256 of every shard file (or of the shards holding rows [start, stop))
        against the manifest. Reads only regular files inside the memory, each at most the size
        the manifest gives."""
        offsets = self._tables[self.modalities[0]].offsets
        checks = []
        for s, shard in enumerate(self.manifest.shards):
            if rows is not None and not (offsets[s] < rows[1] and rows[0] < offsets[s + 1]):
                continue
            for fname, info in shard.files.items():
                path = self.root / SHARDS_DIR / shard.name / fname
                checks.append((path, info, f"shard {shard.name!r} file {fname!r}", "shard file"))
        if rows is None:
            for t in self.manifest.tombstones:
                path = self.root / TOMBSTONES_DIR / t.name
                info = FileInfo(bytes=t.bytes, sha256=t.sha256)
                checks.append((path, info, f"tombstone file {t.name!r}", "tombstone file"))
        for path, info, what, kind in checks:
            inside(self.root, path, what)
            fd = open_regular(path, kind, size=info.bytes)
            h = hashlib.sha256()
            try:
                for block in files.read_blocks(fd, info.bytes, f"{kind} {path}"):
                    h.update(block)
            finally:
                os.close(fd)
            if h.hexdigest() != info.sha256:
                raise MemoryFormatError(f"{kind} {path} fails its sha256 check (corrupt)")

    # -- contents ------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        """Rows of this version, tombstoned ones included (see live)."""
        return self.manifest.rows

    @property
    def version(self) -> int:
        """The committed version held: one more with each commit (0 for a format-1 memory)."""
        return self.manifest.commit

    @property
    def ids(self) -> Tensor:
        """int64 [rows]: the stable id of each row, in row order (strictly increasing)."""
        if self._ids is None:
            ids = (
                torch.cat(self._shard_ids) if self._shard_ids else torch.zeros(0, dtype=torch.int64)
            )
            if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
                raise MemoryFormatError(f"{self.root}: the shards' ids are not strictly increasing")
            if ids.numel() and int(ids[-1]) >= self.manifest.next_id:
                raise MemoryFormatError(
                    f"{self.root}: id {int(ids[-1])} is not below next_id={self.manifest.next_id}"
                )
            self._ids = ids
        return self._ids

    @property
    def live(self) -> Tensor:
        """bool [rows]: False for tombstoned rows (deleted, not yet compacted away)."""
        if self._live is None:
            dead = np.isin(self.ids.numpy(), self._tombstones)
            if int(dead.sum()) != len(self._tombstones):
                raise MemoryFormatError(
                    f"{self.root}: {len(self._tombstones)} ids are tombstoned but its rows hold "
                    f"{int(dead.sum())} of them (corrupt tombstones)"
                )
            self._live = torch.from_numpy(~dead)
        return self._live

    def rows_of(self, ids: object) -> Tensor:
        """int64, the shape of ids: the row of each id in this version (tombstoned rows too).
        An id no row has is a ValueError naming it."""
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"ids must be integers, got {type(ids).__name__} {ids!r:.40}")
        want = ids if isinstance(ids, Tensor) else torch.as_tensor(np.asarray(ids))
        if want.dtype == torch.bool or want.dtype.is_floating_point or want.dtype.is_complex:
            raise TypeError(f"ids must be integers, got {want.dtype}")
        flat = want.detach().cpu().reshape(-1).to(torch.int64)
        have = self.ids
        pos = torch.searchsorted(have, flat)
        found = pos < len(have)
        found[found.clone()] = have[pos[found]] == flat[found]
        if not bool(found.all()):
            missing = np.unique(flat[~found].numpy())
            raise ValueError(
                f"ids not in version {self.version} of the memory {self.root}: {show_ids(missing)}"
            )
        return pos.reshape(want.shape)

    @property
    def shard_offsets(self) -> list[int]:
        """[shards + 1]: shard s holds rows shard_offsets[s] to shard_offsets[s + 1] - 1."""
        return list(self._tables[self.modalities[0]].offsets)

    def shard_of_rows(self, rows: object | None = None) -> Tensor:
        """int64: the index (in manifest.shards) of the shard holding each row (of all rows,
        [rows], when rows is None)."""
        sizes = torch.tensor([s.rows for s in self.manifest.shards], dtype=torch.int64)
        if rows is None:
            return torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        r = as_rows(rows, self.rows)
        ends = torch.tensor(self.shard_offsets[1:], dtype=torch.int64)
        return torch.searchsorted(ends, r, right=True)

    @property
    def modalities(self) -> list[str]:
        return list(self.manifest.modalities)

    def _table(self, modality: str) -> EmbeddingTable:
        if modality not in self._tables:
            raise KeyError(f"memory has no {modality!r} embeddings (it has {self.modalities})")
        return self._tables[modality]

    def keys(self, modality: str) -> EmbeddingTable:
        """The embeddings searched (by similarity to the query), e.g. keys("image")."""
        return self._table(modality)

    def values(self, modality: str) -> EmbeddingTable:
        """The embeddings retrieved and fused, e.g. values("text")."""
        return self._table(modality)

    @property
    def labels(self) -> Tensor | None:
        return self._labels

    def metadata(self, rows: Sequence[int] | Tensor | np.ndarray) -> list[dict[str, Any]]:
        """The metadata rows (caption, source, ...) of the given row ids."""
        ids = as_rows(rows, self.rows).reshape(-1).tolist()
        offsets = self._tables[self.modalities[0]].offsets
        out = []
        for r in ids:
            s = bisect.bisect_right(offsets, r) - 1
            if s not in self._meta_cache:
                self._meta_cache[s] = self.shard_metadata(s).to_pylist()
            out.append(self._meta_cache[s][r - offsets[s]])
        return out

    def shard_metadata(self, shard: int):
        """The metadata of shard `shard` (an index into manifest.shards), as a pyarrow Table
        with one row per row of the shard; read from disk at each call."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        info = self.manifest.shards[shard]
        path = self.root / SHARDS_DIR / info.name / METADATA_FILE
        inside(self.root, path, f"shard {info.name!r} file {METADATA_FILE!r}")
        data = read_regular(path, "shard file", size=info.files[METADATA_FILE].bytes)
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError, ValueError) as e:
            raise MemoryFormatError(f"shard file {path} is not readable Parquet ({e})") from None
        if table.num_rows != info.rows:
            raise MemoryFormatError(
                f"shard file {path} has {table.num_rows} rows, the manifest says {info.rows}"
            )
        return table

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> Memory:
        """A copy with every modality's embeddings in one tensor on device (e.g. "cuda")."""
        tables = {m: t.to(device, dtype) for m, t in self._tables.items()}
        labels = None if self._labels is None else self._labels.to(device)
        lease = None
        if self._lease is not None:  # its own lease: the copy reads metadata files lazily too
            lease = leases.Lease(self.root)
            lease.hold(self.version)
        mem = Memory(
            self.root, self.manifest, tables, labels, self._shard_ids, self._tombstones, lease
        )
        mem._placement = (device, dtype)
        return mem

    def __repr__(self) -> str:
        mods = ", ".join(f"{m}: {i.dim}d {i.dtype}" for m, i in self.manifest.modalities.items())
        return (
            f"Memory({str(self.root)!r}, rows={self.rows}, deleted={self.manifest.deleted}, "
            f"version={self.version}, {mods})"
        )
