"""Retrieval inside a model's forward pass: exact search of the memory, gathered values, masks."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..index import Index
from ..memory import EmbeddingTable, Memory


class Retrieved(NamedTuple):
    """values [B, k, dv] float32; indices [B, k] int64; scores [B, k] float32 (query . key);
    keep [B, k] bool (False: an item masked out, e.g. a near-duplicate of the query)."""

    values: Tensor
    indices: Tensor
    scores: Tensor
    keep: Tensor


class Retriever:
    """Searches `keys` with the query embedding and returns the matching rows of `values`.

    keys/values: tensors [N, d] / [N, dv] or a memory's EmbeddingTables (memory-mapped). The
    search is exact (the fused op; on the keys' device). near_duplicate: items whose score
    (cosine, for normalised embeddings) is >= this are masked out, so a training item does not
    see itself or a near-copy that `exclude` does not list. The memory can be swapped at any time
    (`swap`), e.g. trained with a small memory and evaluated with a large one.
    """

    def __init__(
        self,
        keys: Tensor | EmbeddingTable,
        values: Tensor | EmbeddingTable,
        k: int = 10,
        *,
        near_duplicate: float | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.near_duplicate = near_duplicate
        self.swap(keys, values)

    @classmethod
    def from_memory(
        cls,
        memory: Memory,
        search_modality: str = "image",
        fusion_modality: str = "text",
        k: int = 10,
        **kwargs,
    ) -> Retriever:
        """Uni-modal search (query modality == search_modality) with cross-modal fusion is the
        RECO default: an image query searches memory images and fuses their texts."""
        return cls(memory.keys(search_modality), memory.values(fusion_modality), k, **kwargs)

    def swap(self, keys: Tensor | EmbeddingTable, values: Tensor | EmbeddingTable) -> None:
        """Replaces the memory (the model's weights do not depend on it)."""
        self.index = Index(keys, values)
        if self.k > self.index.rows:
            raise ValueError(f"k={self.k} exceeds the memory's {self.index.rows} rows")

    @property
    def value_dim(self) -> int:
        return self.index.values.dim

    @torch.no_grad()
    def search(
        self, query: Tensor, exclude: Tensor | None = None, k: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """(indices [B, k] int64, scores [B, k] float32) of the exact top-k of query [B, d]."""
        hit = self.index.search(query.detach().float(), k or self.k, exclude=exclude)
        return hit.indices, hit.scores

    @torch.no_grad()
    def precompute(
        self,
        queries: Tensor,
        k: int | None = None,
        exclude: Tensor | None = None,
        chunk: int = 4096,
    ) -> tuple[Tensor, Tensor]:
        """search() over many queries [n, d], chunk by chunk. With frozen encoders and a frozen
        memory the neighbours of a training item never change, so they can be searched once and
        looked up every epoch (`lookup`): training then costs only the model."""
        k = k or self.k
        idx, sc = [], []
        for i in range(0, len(queries), chunk):
            ex = exclude[i : i + chunk] if exclude is not None else None
            a, b = self.search(queries[i : i + chunk], ex, k)
            idx.append(a)
            sc.append(b)
        if not idx:
            return torch.empty(0, k, dtype=torch.int64), torch.empty(0, k)
        return torch.cat(idx), torch.cat(sc)

    @torch.no_grad()
    def lookup(
        self, indices: Tensor, scores: Tensor, device: torch.device | str | None = None
    ) -> Retrieved:
        """Retrieved from neighbours found earlier (`precompute`), sorted best first and at least
        k per query: the first k are used, exactly what a search with this k returns."""
        if indices.dim() != 2 or indices.shape != scores.shape or indices.shape[1] < self.k:
            raise ValueError(
                f"indices and scores must be [B, >= k={self.k}] and alike, got "
                f"{tuple(indices.shape)} and {tuple(scores.shape)}"
            )
        indices, scores = indices[:, : self.k], scores[:, : self.k].float()
        device = device if device is not None else indices.device
        values = self.index.values[indices.cpu()].float().to(device)
        keep = torch.ones_like(scores, dtype=torch.bool)
        if self.near_duplicate is not None:
            keep = scores < self.near_duplicate
        return Retrieved(values, indices.to(device), scores.to(device), keep.to(device))

    def __call__(self, query: Tensor, exclude: Tensor | None = None) -> Retrieved:
        """query [B, d] (no gradient flows into the search) -> Retrieved."""
        indices, scores = self.search(query, exclude)
        return self.lookup(indices, scores, query.device)
