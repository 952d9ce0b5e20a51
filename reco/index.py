"""One search interface over a memory or plain tensors, with interchangeable backends.

- "fused" (default): the project's exact op, on whatever device the keys live.
- "torch": the pure-torch reference (exact; slow; the oracle).
- "faiss": a faiss index from a factory string ("Flat", "IVF4096,Flat", "HNSW32", "IVF1024,PQ64"
  ...), for memories larger than memory or when approximate search is acceptable.
- "int8": int8 codes of the keys (reco.quantize_keys, made once at construction) searched
  coarsely, the best `int8_candidates` rows re-ranked exactly (reco.fused_retrieve_attend_int8):
  approximate, half the bytes of float16 keys to read (int8 tensor cores on CUDA).

Every backend returns the same types. A memory of several shards is searched shard by shard (each
memory-mapped shard streams from disk) and the per-shard top-k lists are merged exactly.

Filters: `allow` [N] bool masks (rows with False are never returned) and, for an index over a
memory, SQL `where` clauses over its metadata (reco.memory.where), combined with the memory's
deletions (Memory.live). Results carry each row's stable id (Memory.ids; the row itself for
plain tensors).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from . import reference
from .memory import EmbeddingTable, Memory
from .ops import (
    RetrieveAttend,
    check_allow,
    fused_retrieve_attend,
    fused_retrieve_attend_int8,
    quantize_keys,
)
from .ops import search as _search_op

BACKENDS = ("fused", "torch", "faiss", "int8")


class SearchResult(NamedTuple):
    """indices [B, k] int64 (rows of the memory, best first); scores [B, k] float32; ids [B, k]
    int64, the rows' stable ids (Memory.ids; the rows themselves for an index over tensors)."""

    indices: Tensor
    scores: Tensor
    ids: Tensor | None = None


def _as_table(x: Tensor | EmbeddingTable, name: str) -> EmbeddingTable:
    if isinstance(x, EmbeddingTable):
        return x
    if isinstance(x, Tensor):
        if x.dim() != 2 or x.shape[0] == 0:
            raise ValueError(f"{name} must be [N >= 1, d], got shape {tuple(x.shape)}")
        return EmbeddingTable([x])
    raise TypeError(f"{name} must be a torch.Tensor or an EmbeddingTable, got {type(x).__name__}")


PAD_ROW = torch.iinfo(torch.int64).max


def check_exclude_rows(exclude: Tensor | None, rows: int) -> None:
    """ValueError where exclude [B, E] int64 holds a value that is neither a row of an N = rows
    memory nor -1 (padding): the fused op's check, with its message, naming the first such entry
    in row-major order. For callers that split the rows before the op sees them (shards, ranks),
    so that each part's op cannot tell a row of another part from an out-of-range one."""
    if exclude is None or exclude.numel() == 0:
        return
    bad = (exclude < -1) | (exclude >= rows)
    if bool(bad.any()):
        b, j = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"exclude[{b}, {j}] = {int(exclude[b, j])} is not a row of keys (N={rows}) "
            "nor -1 padding"
        )


def mask_excluded(scores: Tensor, rows: Tensor, exclude: Tensor | None) -> tuple[Tensor, Tensor]:
    """Candidates whose row is in exclude[b] become padding (NaN, PAD_ROW), which ranks after
    every real row in merge_topk."""
    if exclude is None or exclude.shape[1] == 0:
        return scores, rows
    bad = (rows.unsqueeze(-1) == exclude.unsqueeze(1)).any(-1)
    return torch.where(bad, torch.nan, scores), torch.where(bad, PAD_ROW, rows)


def merge_candidates(scores: Tensor, rows: Tensor, k: int) -> SearchResult:
    """The exact top-k of candidate lists [B, M] (padding = PAD_ROW); ValueError where a query
    has fewer than k real candidates (k exceeds its selectable rows)."""
    short = (rows != PAD_ROW).sum(1) < k
    if bool(short.any()):
        b = int(short.nonzero()[0])
        raise ValueError(f"k={k} exceeds the selectable rows of query {b}")
    idx, sc = reference.merge_topk(scores, rows, k)
    return SearchResult(idx, sc)


class Index:
    """Search over keys (and retrieval of values) by inner product.

    keys, values: [N, d] / [N, dv] tensors or a memory's EmbeddingTables (values default to
    keys). device: move both to this device first (e.g. "cuda"; one tensor each).
    faiss_params: search-time parameters of an approximate faiss index, e.g. "nprobe=32" (IVF)
    or "efSearch=128" (HNSW); the defaults of faiss favour speed over recall.
    int8_candidates: rows re-ranked exactly per query and shard by the int8 backend (default
    max(4k, k + 16)).
    allow: [N] bool, rows any search may return (False: never), combined with each search's own.
    ids: [N] int64 stable ids reported with the results (default: the rows).
    An index made by from_memory also skips the memory's deleted rows, accepts where= clauses and
    holds the memory's version until refresh().
    """

    def __init__(
        self,
        keys: Tensor | EmbeddingTable,
        values: Tensor | EmbeddingTable | None = None,
        *,
        backend: str = "fused",
        faiss_factory: str = "Flat",
        faiss_params: str | None = None,
        faiss_train_rows: int = 100_000,
        int8_candidates: int | None = None,
        device: str | torch.device | None = None,
        allow: Tensor | None = None,
        ids: Tensor | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.keys = _as_table(keys, "keys")
        self.values = self.keys if values is None else _as_table(values, "values")
        if self.values.rows != self.keys.rows:
            raise ValueError(
                f"keys have {self.keys.rows} rows but values {self.values.rows}; they must match"
            )
        if device is not None:
            self.keys = self.keys.to(device)
            self.values = self.keys if values is None else self.values.to(device)
        if isinstance(allow, Tensor):
            allow = allow.to(self.keys.device)
        check_allow(allow, self.rows)
        if ids is not None and (
            not isinstance(ids, Tensor) or ids.dtype != torch.int64 or ids.shape != (self.rows,)
        ):
            raise ValueError(f"ids must be an int64 tensor [N] = [{self.rows}]")
        self.allow = None if allow is None or bool(allow.all()) else allow
        self.ids = ids
        self.memory: Memory | None = None
        self._options = dict(
            backend=backend, faiss_factory=faiss_factory, faiss_params=faiss_params,
            faiss_train_rows=faiss_train_rows, int8_candidates=int8_candidates, device=device,
        )  # fmt: skip
        self.backend = backend
        self._faiss = None
        if backend == "faiss":
            self._faiss = self._build_faiss(faiss_factory, faiss_params, faiss_train_rows)
        if int8_candidates is not None and (
            isinstance(int8_candidates, bool)
            or not isinstance(int8_candidates, int)
            or int8_candidates < 1
        ):
            raise ValueError(f"int8_candidates must be a positive int, got {int8_candidates!r}")
        self.int8_candidates = int8_candidates
        # One (codes, scales) per shard, on the shard's device.
        self._int8 = [quantize_keys(s) for s in self.keys.shards] if backend == "int8" else None

    @classmethod
    def from_memory(
        cls, memory: Memory, key_modality: str = "image", value_modality: str = "text", **kwargs
    ) -> Index:
        """Searches memory.keys(key_modality) and retrieves memory.values(value_modality) of the
        memory's version held now, skipping its deleted rows; results carry memory.ids."""
        if "allow" in kwargs or "ids" in kwargs:
            raise TypeError(
                "from_memory takes allow and ids from the memory (pass allow= to search)"
            )
        index = cls(
            memory.keys(key_modality),
            memory.values(value_modality),
            allow=memory.live,
            ids=memory.ids,
            **kwargs,
        )
        index.memory = memory
        index._modalities = (key_modality, value_modality)
        return index

    def refresh(self) -> bool:
        """An index over a memory moves to its latest committed version (Memory.refresh) and
        rebuilds itself; returns whether the version changed. A no-op False for tensors."""
        if self.memory is None or not self.memory.refresh():
            return False
        fresh = Index.from_memory(self.memory, *self._modalities, **self._options)
        self.__dict__.update(fresh.__dict__)
        return True

    @property
    def rows(self) -> int:
        return self.keys.rows

    @property
    def dim(self) -> int:
        return self.keys.dim

    # -- faiss ---------------------------------------------------------------------------------
    def _build_faiss(self, factory: str, params: str | None, train_rows: int):
        try:
            import faiss
        except ImportError as e:
            raise ImportError(
                "backend='faiss' needs faiss (pip install 'reco[faiss]' for faiss-cpu)"
            ) from e
        try:
            index = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ValueError(
                f"faiss_factory={factory!r} is not a valid faiss factory string"
            ) from e
        if not index.is_trained:
            g = torch.Generator().manual_seed(0)
            n = min(self.rows, train_rows)
            sample = torch.randperm(self.rows, generator=g)[:n].sort().values
            index.train(np.ascontiguousarray(self.keys[sample].float().cpu().numpy()))
        for t in self.keys.shards:
            for r in range(0, t.shape[0], 1 << 18):
                index.add(np.ascontiguousarray(t[r : r + (1 << 18)].float().cpu().numpy()))
        if params:
            try:
                faiss.ParameterSpace().set_index_parameters(index, params)
            except RuntimeError as e:
                raise ValueError(f"faiss_params={params!r} do not apply to {factory!r}") from e
        return index

    def _faiss_params(self, allow: Tensor):
        """faiss search parameters restricting the search to the allowed rows (IDSelectorBitmap),
        of the index's kind so that its own settings (nprobe, efSearch) still apply."""
        import faiss

        bitmap = np.packbits(allow.cpu().numpy(), bitorder="little")
        sel = faiss.IDSelectorBitmap(self.rows, faiss.swig_ptr(bitmap))
        ivf = faiss.try_extract_index_ivf(self._faiss)
        if ivf is not None:
            params = faiss.SearchParametersIVF(sel=sel, nprobe=ivf.nprobe)
        elif hasattr(self._faiss, "hnsw"):
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=self._faiss.hnsw.efSearch)
        else:
            params = faiss.SearchParameters(sel=sel)
        return params, (bitmap, sel)  # faiss keeps raw pointers: the caller holds both

    def _search_faiss(
        self, query: Tensor, k: int, exclude: Tensor | None, allow: Tensor | None = None
    ) -> SearchResult:
        extra = 0 if exclude is None else exclude.shape[1]
        fetch = min(self.rows, k + extra)
        x = np.ascontiguousarray(query.float().cpu().numpy())
        if allow is None:
            _, found = self._faiss.search(x, fetch)
        else:
            params, _keep = self._faiss_params(allow)
            _, found = self._faiss.search(x, fetch, params=params)
        found = torch.from_numpy(found).to(query.device)
        valid = found >= 0
        if exclude is not None:
            valid &= ~(found.unsqueeze(-1) == exclude.unsqueeze(1)).any(-1)
        if allow is not None:  # some faiss index kinds ignore a selector (faiss #3114)
            valid &= allow[found.clamp(min=0)]
        if bool((valid.sum(1) < k).any()):
            raise ValueError(
                f"the faiss index returned fewer than k={k} selectable rows for some query "
                "(an approximate index: raise nprobe/efSearch in faiss_params, or use a Flat index)"
            )
        # Re-score the candidates exactly and order them as every backend does.
        rows = torch.where(valid, found, 0)
        exact = torch.einsum("bd,bkd->bk", query.double(), self.keys[rows].double())
        # Invalid slots become padding (NaN, PAD_ROW): they rank after all valid rows.
        scores = torch.where(valid, exact, torch.nan)
        rows_sorted, scores_sorted = reference.merge_topk(
            scores, torch.where(valid, found, PAD_ROW), k
        )
        return SearchResult(rows_sorted, scores_sorted.float())

    # -- search --------------------------------------------------------------------------------
    def _check_query(self, query: Tensor, k: int, exclude: Tensor | None) -> None:
        if not isinstance(query, Tensor) or query.dim() != 2 or query.shape[1] != self.dim:
            shape = tuple(query.shape) if isinstance(query, Tensor) else type(query).__name__
            raise ValueError(f"query must be [B, {self.dim}] (the keys' dim), got {shape}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.rows:
            raise ValueError(f"k={k!r} must be an int in [1, {self.rows}]")
        if exclude is not None and (
            not isinstance(exclude, Tensor)
            or exclude.dtype != torch.int64
            or exclude.dim() != 2
            or exclude.shape[0] != query.shape[0]
        ):
            raise ValueError("exclude must be an int64 tensor [B, E] (-1 = padding)")
        check_exclude_rows(exclude, self.rows)

    def allowed(self, allow: Tensor | None = None, where: str | None = None) -> Tensor | None:
        """The rows a search may return: this index's allow (a memory's live rows), and allow
        [N] bool, and the rows satisfying the SQL clause `where` over the memory's metadata
        (reco.memory.where); None when every row is allowed."""
        check_allow(allow, self.rows)
        parts = [m for m in (self.allow, allow) if m is not None]
        if where is not None:
            if self.memory is None:
                raise ValueError("where= needs an index over a memory (Index.from_memory)")
            from .memory.where import where_mask

            parts.append(where_mask(self.memory, where))
        if not parts:
            return None
        mask = parts[0].to(self.keys.device)
        for m in parts[1:]:
            mask = mask & m.to(self.keys.device)
        return mask

    def _with_ids(self, indices: Tensor, scores: Tensor) -> SearchResult:
        ids = indices if self.ids is None else self.ids.to(indices.device)[indices]
        return SearchResult(indices, scores, ids)

    def _check_selectable(self, k: int, exclude: Tensor | None, allow: Tensor | None) -> None:
        """ValueError naming k and the count where a query has fewer selectable rows than k
        (every backend, before any search: CUDA kernels cannot raise, shards see parts)."""
        if allow is None and (exclude is None or k <= self.rows - exclude.shape[1]):
            return
        counts = reference.selectable_rows(self.rows, exclude, allow)
        if bool((counts < k).any()):
            raise reference.short_k_error(k, self.rows, exclude, allow)

    def search(
        self,
        query: Tensor,
        k: int,
        *,
        exclude: Tensor | None = None,
        allow: Tensor | None = None,
        where: str | None = None,
    ) -> SearchResult:
        """The k keys of largest inner product with each query [B, d], best first, among the
        allowed rows (see allowed) not in exclude [B, E]."""
        self._check_query(query, k, exclude)
        mask = self.allowed(allow, where)
        query = query.to(self.keys.device)
        exclude = None if exclude is None else exclude.to(self.keys.device)
        self._check_selectable(k, exclude, mask)
        if self.backend == "faiss":
            r = self._search_faiss(query, k, exclude, mask)
            return self._with_ids(r.indices, r.scores)
        if len(self.keys.shards) == 1:
            idx, sc = self._search_shard(0, query, k, exclude, mask)
            return self._with_ids(idx, sc.float())
        r = merge_candidates(*self._shard_candidates(query, k, exclude, mask), k)
        return self._with_ids(r.indices, r.scores)

    def _fused(self, s: int, query: Tensor, values: Tensor, k: int, **kwargs) -> RetrieveAttend:
        """The fused op (exact, or int8 with exact re-rank) on shard s of the keys."""
        keys = self.keys.shards[s]
        if self.backend == "int8":
            codes, scales = self._int8[s]
            c = self.int8_candidates  # None: the op's default
            c = None if c is None else max(k, min(keys.shape[0], c))
            return fused_retrieve_attend_int8(
                query, codes, scales, keys, values, k, candidates=c, **kwargs
            )
        return fused_retrieve_attend(query, keys, values, k, **kwargs)

    def _shard_allow(self, s: int, allow: Tensor | None) -> Tensor | None:
        if allow is None:
            return None
        return allow[self.keys.offsets[s] : self.keys.offsets[s + 1]]

    def _search_shard(
        self,
        s: int,
        query: Tensor,
        k: int,
        exclude: Tensor | None = None,
        allow: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(indices, scores) of the top-k of shard s (shard-local rows; allow: the shard's)."""
        keys = self.keys.shards[s]
        if self.backend == "fused":
            return tuple(_search_op(query, keys, k, exclude=exclude, allow=allow))
        if self.backend == "int8":
            # The int8 op has no values-free form yet: the rows' scales stand in as one column of
            # values (the cheapest tensor at hand); its attention output is not used.
            r = self._fused(
                s, query, self._int8[s][1].unsqueeze(1), k, exclude=exclude, allow=allow
            )
            return r.indices, r.scores
        return reference.search(query, keys, k, exclude, allow=allow)

    def _shard_candidates(
        self, query: Tensor, k: int, exclude: Tensor | None, allow: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Every shard's top-(k + E) (E = exclude's width, so that k remain after excluding,
        whatever rows a query excludes where) among its allowed rows, excluded rows turned into
        padding (NaN, PAD_ROW)."""
        extra = 0 if exclude is None else exclude.shape[1]
        rows_parts, score_parts = [], []
        for s, shard in enumerate(self.keys.shards):
            part = self._shard_allow(s, allow)
            have = shard.shape[0] if part is None else int(part.sum())
            ks = min(k + extra, have)
            if ks == 0:
                continue
            idx, sc = self._search_shard(s, query, ks, allow=part)
            rows_parts.append(idx + self.keys.offsets[s])
            score_parts.append(sc.float())
        if not rows_parts:  # nothing allowed anywhere: padding only
            B = query.shape[0]
            return (
                torch.full((B, 1), torch.nan, device=query.device),
                torch.full((B, 1), PAD_ROW, dtype=torch.int64, device=query.device),
            )
        rows, scores = torch.cat(rows_parts, 1), torch.cat(score_parts, 1)
        return mask_excluded(scores, rows, exclude)

    def search_candidates(
        self,
        query: Tensor,
        k: int,
        *,
        exclude: Tensor | None = None,
        allow: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(scores, rows) [B, M >= 1]: a superset of every query's top-k allowed, not excluded
        rows, excluded rows and padding as (NaN, PAD_ROW). For merging with other shards'
        candidates (allow: [N] bool of this index's rows, combined with its own)."""
        self._check_query(query, min(k, self.rows), exclude)
        mask = self.allowed(allow)
        query = query.to(self.keys.device)
        exclude = None if exclude is None else exclude.to(self.keys.device)
        return self._shard_candidates(query, k, exclude, mask)

    def retrieve_attend(
        self,
        query: Tensor,
        k: int,
        *,
        attn_query: Tensor | None = None,
        temperature: float = 1.0,
        exclude: Tensor | None = None,
        allow: Tensor | None = None,
        where: str | None = None,
    ) -> RetrieveAttend:
        """Search, then attention over the retrieved values (see reco.fused_retrieve_attend)."""
        single = len(self.keys.shards) == 1 and len(self.values.shards) == 1
        if self.backend in ("fused", "int8") and single:
            mask = self.allowed(allow, where)
            if mask is not None:
                self._check_query(query, k, exclude)
                ex = None if exclude is None else exclude.to(mask.device)
                self._check_selectable(k, ex, mask)
            return self._fused(
                0,
                query,
                self.values.shards[0],
                k,
                attn_query=attn_query,
                temperature=temperature,
                exclude=exclude,
                allow=mask,
            )
        indices = self.search(query, k, exclude=exclude, allow=allow, where=where).indices
        return reference.attend(
            query.to(self.keys.device), self.keys, self.values, indices, attn_query, temperature
        )
