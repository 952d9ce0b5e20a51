"""Writing and reading memory folders.

Writes are crash-safe: a shard is written into a temporary folder (every file fsynced), renamed
into place, and only then listed in a new manifest (written to a temporary file, fsynced, renamed).
A crash at any point leaves the last committed manifest, and every shard it lists, intact; the next
writer removes the debris. One writer at a time holds an flock on `.lock` (released by the kernel if
the process dies, so `kill -9` never leaves a stale lock).
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import hashlib
import io
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .manifest import (
    LABELS_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    SHARDS_DIR,
    FileInfo,
    Manifest,
    MemoryFormatError,
    ModalityInfo,
    ShardInfo,
    embedding_file,
)


class MemoryLockedError(RuntimeError):
    """Another process is writing to the same memory folder."""


class MemoryWriteError(OSError):
    """A write failed (disk full, I/O error); the memory stays at its last commit."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> FileInfo:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return FileInfo(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _parquet_bytes(columns: Mapping[str, list]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table(dict(columns)), buf)
    return buf.getvalue()


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Atomically replaces root/manifest.json: the commit point of every write."""
    tmp = root / (MANIFEST_FILE + ".tmp")
    _write_synced(tmp, manifest.to_json().encode())
    os.replace(tmp, root / MANIFEST_FILE)
    _fsync_dir(root)


def read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise MemoryFormatError(f"{root} is not a reco memory (no {MANIFEST_FILE})")
    return Manifest.from_json(path.read_text(), where=str(path))


def _to_numpy(x: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)


class MemoryWriter:
    """Appends rows to a memory folder in shards; resumes an existing memory with the same layout.

    Rows are buffered and committed as one shard once `shard_rows` are pending (a shard holds
    whole `add` batches, so it may exceed `shard_rows` by less than one batch), on `commit()`, and
    on `close()`. `progress` (any JSON-able dict, e.g. how many source items were consumed) is
    committed with the rows it describes, so a builder resumes exactly after the last commit.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        modalities: Mapping[str, ModalityInfo],
        *,
        has_labels: bool = False,
        label_names: Sequence[str] | None = None,
        shard_rows: int = 1 << 16,
        source: Mapping[str, Any] | None = None,
    ) -> None:
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
        self.root = Path(path)
        self.shard_rows = shard_rows
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise MemoryLockedError(
                f"{self.root} is being written by another process (it holds {LOCK_FILE}); "
                "wait for it to finish or stop it, then resume"
            ) from None
        try:
            wanted = Manifest(
                modalities=dict(modalities),
                has_labels=has_labels,
                label_names=list(label_names) if label_names is not None else None,
                source=dict(source or {}),
            )
            if (self.root / MANIFEST_FILE).exists():
                self.manifest = read_manifest(self.root)
                self._check_compatible(wanted)
            else:
                self.manifest = wanted
                write_manifest(self.root, self.manifest)
            self._remove_debris()
        except BaseException:
            self._release()
            raise
        self._pending: dict[str, list[np.ndarray]] = {m: [] for m in self.manifest.modalities}
        self._pending_labels: list[np.ndarray] = []
        self._pending_meta: dict[str, list] = {}
        self._pending_rows = 0
        self._pending_progress: dict[str, Any] | None = None

    # -- state ---------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        """Rows committed so far."""
        return self.manifest.rows

    @property
    def progress(self) -> dict[str, Any]:
        """The progress recorded with the last commit ({} for a new memory)."""
        return dict(self.manifest.progress)

    def _check_compatible(self, wanted: Manifest) -> None:
        have = self.manifest
        problems = []
        if have.modalities != wanted.modalities:
            problems.append(f"modalities {have.modalities} != {wanted.modalities}")
        if have.has_labels != wanted.has_labels:
            problems.append(f"has_labels {have.has_labels} != {wanted.has_labels}")
        if wanted.label_names is not None and have.label_names != wanted.label_names:
            problems.append("label names differ")
        if problems:
            raise MemoryFormatError(
                f"{self.root} already holds a memory built differently ({'; '.join(problems)}); "
                "use a new folder"
            )

    def _remove_debris(self) -> None:
        shards = self.root / SHARDS_DIR
        shards.mkdir(exist_ok=True)
        keep = {s.name for s in self.manifest.shards}
        for p in shards.iterdir():
            if p.name not in keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        tmp = self.root / (MANIFEST_FILE + ".tmp")
        if tmp.exists():
            tmp.unlink()

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
        if set(embeddings) != set(self.manifest.modalities):
            raise ValueError(
                f"embeddings must have exactly the modalities {sorted(self.manifest.modalities)}, "
                f"got {sorted(embeddings)}"
            )
        arrays = {m: _to_numpy(x) for m, x in embeddings.items()}
        n = None
        for m, a in arrays.items():
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
        assert n is not None
        if self.manifest.has_labels:
            if labels is None:
                raise ValueError("this memory has labels: pass labels=[n] int64")
            lab = np.asarray(_to_numpy(labels) if isinstance(labels, Tensor) else labels)
            if lab.shape != (n,) or not np.issubdtype(lab.dtype, np.integer):
                raise ValueError(f"labels must be [n={n}] integers, got {lab.shape} {lab.dtype}")
            self._pending_labels.append(lab.astype(np.int64))
        elif labels is not None:
            raise ValueError("this memory was created without labels (has_labels=False)")
        meta = dict(metadata or {})
        if self._pending_rows and set(meta) != set(self._pending_meta):
            raise ValueError(
                f"metadata columns {sorted(meta)} differ from {sorted(self._pending_meta)}"
            )
        for col, values in meta.items():
            if len(values) != n:
                raise ValueError(f"metadata[{col!r}] has {len(values)} values for {n} rows")
            self._pending_meta.setdefault(col, []).extend(values)
        for m, a in arrays.items():
            self._pending[m].append(a.astype(self.manifest.modalities[m].dtype, copy=False))
        self._pending_rows += n
        if progress is not None:
            self._pending_progress = dict(progress)
        if self._pending_rows >= self.shard_rows:
            self.commit()

    def set_progress(self, progress: Mapping[str, Any]) -> None:
        """Records progress without rows (e.g. the last source items were all skipped); it is
        committed with the next commit."""
        self._pending_progress = dict(progress)

    def commit(self) -> None:
        """Writes the pending rows as one shard and commits the manifest."""
        if self._pending_rows == 0:
            if self._pending_progress is not None:
                self._commit_manifest(None)
            return
        name = f"{len(self.manifest.shards):05d}"
        shards = self.root / SHARDS_DIR
        tmp = shards / f"{name}.tmp-{os.getpid()}"
        try:
            tmp.mkdir()
            files = {}
            for m, parts in self._pending.items():
                files[embedding_file(m)] = _write_synced(
                    tmp / embedding_file(m), _npy_bytes(np.concatenate(parts))
                )
            if self.manifest.has_labels:
                files[LABELS_FILE] = _write_synced(
                    tmp / LABELS_FILE, _npy_bytes(np.concatenate(self._pending_labels))
                )
            meta = self._pending_meta or {"row": list(range(self._pending_rows))}
            files[METADATA_FILE] = _write_synced(tmp / METADATA_FILE, _parquet_bytes(meta))
            _fsync_dir(tmp)
            os.rename(tmp, shards / name)
            _fsync_dir(shards)
            self._commit_manifest(ShardInfo(name=name, rows=self._pending_rows, files=files))
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(shards / name, ignore_errors=True)
            what = "the disk is full" if e.errno in (errno.ENOSPC, errno.EFBIG) else str(e)
            raise MemoryWriteError(
                e.errno,
                f"writing shard {name} of {self.root} failed ({what}); the memory stays at its "
                f"last commit ({self.rows} rows) and a new writer resumes from there",
            ) from e
        self._pending = {m: [] for m in self.manifest.modalities}
        self._pending_labels = []
        self._pending_meta = {}
        self._pending_rows = 0

    def _commit_manifest(self, shard: ShardInfo | None) -> None:
        shards = self.manifest.shards + ([shard] if shard is not None else [])
        progress = (
            self._pending_progress if self._pending_progress is not None else self.manifest.progress
        )
        new = Manifest(
            modalities=self.manifest.modalities,
            has_labels=self.manifest.has_labels,
            label_names=self.manifest.label_names,
            shards=shards,
            progress=progress,
            source=self.manifest.source,
        )
        write_manifest(self.root, new)
        self.manifest = new
        self._pending_progress = None

    # -- closing -------------------------------------------------------------------------------
    def _release(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def close(self, commit: bool = True) -> None:
        """Commits pending rows (unless commit=False) and releases the lock."""
        try:
            if commit and self._lock_fd is not None:
                self.commit()
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
        """Gathers rows (an int64 tensor of any shape) into [..., dim]."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        if len(self.shards) == 1:
            return self.shards[0][rows.to(self.device)]
        flat = rows.reshape(-1).cpu()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.rows):
            raise IndexError(f"row ids must be in [0, {self.rows})")
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


def _open_npy(path: Path, rows: int, cols: int | None, dtype: str, expect_bytes: int) -> Tensor:
    if not path.is_file():
        raise MemoryFormatError(f"shard file {path} is missing")
    size = path.stat().st_size
    if size != expect_bytes:
        raise MemoryFormatError(
            f"shard file {path} is {size} bytes, the manifest says {expect_bytes} "
            "(truncated or replaced)"
        )
    try:
        arr = np.load(path, mmap_mode="c", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise MemoryFormatError(f"shard file {path} is not a readable .npy ({e})") from e
    want = (rows,) if cols is None else (rows, cols)
    if arr.shape != want or arr.dtype != np.dtype(dtype):
        raise MemoryFormatError(
            f"shard file {path} holds {arr.dtype} {arr.shape}, the manifest says {dtype} {want}"
        )
    return torch.from_numpy(arr)


class Memory:
    """A memory folder opened for reading: memory-mapped embeddings, labels, metadata."""

    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        tables: dict[str, EmbeddingTable],
        labels: Tensor | None,
    ) -> None:
        self.root = root
        self.manifest = manifest
        self._tables = tables
        self._labels = labels
        self._meta_cache: dict[int, Any] = {}

    @classmethod
    def open(cls, path: str | os.PathLike, verify: str = "size") -> Memory:
        """Opens a memory. verify: "size" (file sizes and .npy headers, cheap) or "full" (also
        the sha256 of every file). Raises MemoryFormatError naming the bad file."""
        if verify not in ("size", "full"):
            raise ValueError(f"verify must be 'size' or 'full', got {verify!r}")
        root = Path(path)
        manifest = read_manifest(root)
        if not manifest.shards:
            raise MemoryFormatError(f"{root} holds no committed rows yet")
        parts: dict[str, list[Tensor]] = {m: [] for m in manifest.modalities}
        labels = []
        for shard in manifest.shards:
            d = root / SHARDS_DIR / shard.name
            for m, info in manifest.modalities.items():
                f = embedding_file(m)
                if f not in shard.files:
                    raise MemoryFormatError(f"shard {shard.name} lists no {f}")
                parts[m].append(
                    _open_npy(d / f, shard.rows, info.dim, info.dtype, shard.files[f].bytes)
                )
            if manifest.has_labels:
                size = shard.files[LABELS_FILE].bytes
                labels.append(_open_npy(d / LABELS_FILE, shard.rows, None, "int64", size))
            meta = d / METADATA_FILE
            if not meta.is_file() or meta.stat().st_size != shard.files[METADATA_FILE].bytes:
                raise MemoryFormatError(f"shard file {meta} is missing or truncated")
        mem = cls(
            root,
            manifest,
            {m: EmbeddingTable(p) for m, p in parts.items()},
            torch.cat(labels) if labels else None,
        )
        if verify == "full":
            mem.verify()
        return mem

    def verify(self, rows: tuple[int, int] | None = None) -> None:
        """Checks the sha256 of every shard file (or of the shards holding rows [start, stop))
        against the manifest."""
        offsets = self._tables[self.modalities[0]].offsets
        for s, shard in enumerate(self.manifest.shards):
            if rows is not None and not (offsets[s] < rows[1] and rows[0] < offsets[s + 1]):
                continue
            for fname, info in shard.files.items():
                path = self.root / SHARDS_DIR / shard.name / fname
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        h.update(block)
                if h.hexdigest() != info.sha256:
                    raise MemoryFormatError(f"shard file {path} fails its sha256 check (corrupt)")

    # -- contents ------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.manifest.rows

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

    def metadata(self, rows: Sequence[int]) -> list[dict[str, Any]]:
        """The metadata rows (caption, source, ...) of the given row ids."""
        import pyarrow.parquet as pq

        offsets = self._tables[self.modalities[0]].offsets
        out = []
        for r in rows:
            r = int(r)
            if not 0 <= r < self.rows:
                raise IndexError(f"row {r} is outside the memory's {self.rows} rows")
            s = bisect.bisect_right(offsets, r) - 1
            if s not in self._meta_cache:
                path = self.root / SHARDS_DIR / self.manifest.shards[s].name / METADATA_FILE
                self._meta_cache[s] = pq.read_table(path).to_pylist()
            out.append(self._meta_cache[s][r - offsets[s]])
        return out

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> Memory:
        """A copy with every modality's embeddings in one tensor on device (e.g. "cuda")."""
        tables = {m: t.to(device, dtype) for m, t in self._tables.items()}
        labels = None if self._labels is None else self._labels.to(device)
        return Memory(self.root, self.manifest, tables, labels)

    def __repr__(self) -> str:
        mods = ", ".join(f"{m}: {i.dim}d {i.dtype}" for m, i in self.manifest.modalities.items())
        return f"Memory({str(self.root)!r}, rows={self.rows}, {mods})"
