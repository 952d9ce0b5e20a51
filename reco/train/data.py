"""Datasets of precomputed embeddings, batched by index in a fixed, resumable order."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..memory import EmbeddingTable, Memory


class EmbeddingDataset:
    """Named tensors sharing their first dimension (e.g. {"image": [n, d], "label": [n]}), which
    may be memory-mapped: a batch reads only its rows."""

    def __init__(self, tensors: Mapping[str, Tensor | EmbeddingTable]) -> None:
        if not tensors:
            raise ValueError("an EmbeddingDataset needs at least one tensor")
        sizes = {name: len(t) for name, t in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"tensors must share their first dimension, got {sizes}")
        self.tensors = dict(tensors)
        self.size = next(iter(sizes.values()))

    @classmethod
    def from_memory(
        cls, memory: Memory, modalities: tuple[str, ...] = ("image", "text"), rows: bool = True
    ) -> EmbeddingDataset:
        """A memory's embeddings (memory-mapped: a batch reads only its rows, across shards),
        labels when it has them, and "row": each item's row id, so that training can exclude an
        item from its own retrieval."""
        t: dict[str, Tensor | EmbeddingTable] = {m: memory.keys(m) for m in modalities}
        if memory.labels is not None:
            t["label"] = memory.labels
        if rows:
            t["row"] = torch.arange(memory.rows)
        return cls(t)

    def __len__(self) -> int:
        return self.size

    def batch(self, index: Tensor, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """The rows `index` of every tensor, as float32 (embeddings) or int64, on device."""
        out = {}
        for name, t in self.tensors.items():
            x = t[index]  # an EmbeddingTable gathers across its shards
            out[name] = (x.float() if x.is_floating_point() else x.long()).to(device)
        return out


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> Tensor:
    """The dataset rows of global batch `step`: epoch e = step // (n // batch_size) shuffles with
    seed + e, and the step's slice of that permutation is the batch. A pure function of its
    arguments, so a resumed run sees exactly the batches an uninterrupted one would."""
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise ValueError(f"batch_size={batch_size} exceeds the dataset's {n} rows")
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return perm[i * batch_size : (i + 1) * batch_size]
