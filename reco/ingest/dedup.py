"""Duplicates: near-duplicates of evaluation images (`NearDuplicateFilter`), the exact-duplicate
state of a memory being resumed, and the normalisation of embedding rows both rely on."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..memory.files import flat as _flat
from ..memory.files import stat_regular as _stat_regular
from ..memory.manifest import METADATA_FILE, SHARDS_DIR
from ..memory.store import read_manifest, read_tombstones, shard_ids
from ..ops import search


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
        best = search(q, self.eval, 1).scores[:, 0]
        return best < self.threshold


def _committed_column(root: Path, column: str) -> list:
    """A metadata column over the live rows of all committed shards (to rebuild dedup state on
    resume; a deleted row's image may be added again); shards without the column contribute
    nothing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = read_manifest(root)
    dead = read_tombstones(root, manifest)
    out: list = []
    for shard in manifest.shards:
        path = root / SHARDS_DIR / shard.name / METADATA_FILE
        try:
            if column not in pq.read_schema(path).names:
                continue
            values = pq.read_table(path, columns=[column]).column(column).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: the memory's metadata cannot be read ({_flat(e)})") from None
        if len(dead):
            live = ~np.isin(shard_ids(root, shard).numpy(), dead)
            values = [v for v, keep in zip(values, live) if keep]
        out.extend(values)
    return out
