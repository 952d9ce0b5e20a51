"""Classifiers on frozen features, and the mean-of-neighbours baseline."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LinearHead(nn.Module):
    """features [B, dim] -> logits [B, classes]."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


class MLPHead(nn.Module):
    """features [B, dim] -> hidden (GELU, dropout) -> logits [B, classes]."""

    def __init__(self, dim: int, classes: int, hidden: int = 1024, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def masked_mean(values: Tensor, keep: Tensor | None) -> Tensor:
    """[B, dv]: the mean of values [B, k, dv] over the items with keep [B, k] True (0 where
    none is)."""
    if keep is None:
        return values.mean(1)
    w = keep.to(values.dtype).unsqueeze(-1)
    return (values * w).sum(1) / w.sum(1).clamp_min(1.0)


class MeanKNN(nn.Module):
    """The plain mean of the retrieved values [B, k, dv] (items with keep False left out),
    concatenated to the query z [B, dq] unless query=False: [B, dq + dv] or [B, dv]."""

    def __init__(self, query: bool = True) -> None:
        super().__init__()
        self.query = query

    def forward(
        self,
        z: Tensor,
        values: Tensor,
        keep: Tensor | None = None,
        scores: Tensor | None = None,  # unused: the mean weighs every item alike
    ) -> Tensor:
        mean = masked_mean(values, keep)
        return torch.cat([z, mean.to(z.dtype)], -1) if self.query else mean


class RetrievalClassifier(nn.Module):
    """The long-tail recognition model: an aggregator over retrieved values (MemoryAttention,
    MeanKNN, or None for the parametric baselines) and a head. forward(z, retrieved) -> logits."""

    def __init__(self, aggregator: nn.Module | None, head: nn.Module) -> None:
        super().__init__()
        self.aggregator = aggregator
        self.head = head

    def forward(
        self,
        z: Tensor,
        values: Tensor | None = None,
        keep: Tensor | None = None,
        scores: Tensor | None = None,
    ) -> Tensor:
        """scores [B, k]: the retrieval scores, for an aggregator that weighs by them."""
        if self.aggregator is None:
            return self.head(z)
        if values is None:
            raise ValueError("this classifier aggregates retrieved values: pass values [B, k, dv]")
        if scores is None:
            return self.head(self.aggregator(z, values, keep))
        return self.head(self.aggregator(z, values, keep, scores))
