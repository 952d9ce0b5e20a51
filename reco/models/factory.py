"""The one model factory: a model from its config, for `reco train` configs and the demo alike.

build_model(ClassifierConfig(query_dim=512, value_dim=512, classes=1000))  # long-tail
build_model(RECOConfig(k=10))                                              # RECO
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..config import check_number
from .attention import MemoryAttention, MemoryAttentionConfig
from .fusion import RECO, RECOConfig
from .heads import LinearHead, MeanKNN, MLPHead, RetrievalClassifier


@dataclass
class ClassifierConfig:
    """A classifier of query embeddings [B, query_dim] over `classes`, optionally fused with
    retrieved values [B, k, value_dim] first: aggregator "attention" (MemoryAttention, whose
    output has the query's dim), "mean_knn" (the mean of the values beside the query) or "none";
    head "linear" or "mlp" (mlp_hidden units)."""

    query_dim: int
    value_dim: int
    classes: int
    aggregator: Literal["attention", "mean_knn", "none"] = "attention"
    head: Literal["linear", "mlp"] = "linear"
    attention_dim: int | None = None  # default: the query dim
    heads: int = 8
    self_token: bool = False
    drop_retrieved: float = 0.0
    mlp_hidden: int = 1024
    combine: str = "residual"  # MemoryAttention's: "residual" or "concat"
    attend: str = "learned"  # MemoryAttention's logits: "learned" or the retrieval "scores"

    def validate(self) -> None:
        check_number("query_dim", self.query_dim, integer=True, ge=1)
        check_number("value_dim", self.value_dim, integer=True, ge=1)
        check_number("classes", self.classes, integer=True, ge=1)
        check_number("mlp_hidden", self.mlp_hidden, integer=True, ge=1)
        if self.aggregator not in ("attention", "mean_knn", "none"):
            raise ValueError(
                f"aggregator must be 'attention', 'mean_knn' or 'none', got {self.aggregator!r}"
            )
        if self.head not in ("linear", "mlp"):
            raise ValueError(f"head must be 'linear' or 'mlp', got {self.head!r}")


def build_model(cfg: ClassifierConfig | RECOConfig) -> nn.Module:
    """A freshly initialised model: RetrievalClassifier for a ClassifierConfig, RECO for a
    RECOConfig. The aggregator's parameters are drawn before the head's."""
    if isinstance(cfg, RECOConfig):
        return RECO(cfg)
    if not isinstance(cfg, ClassifierConfig):
        raise TypeError(f"build_model needs a ClassifierConfig or RECOConfig, got {cfg!r}")
    cfg.validate()
    agg: nn.Module | None
    if cfg.aggregator == "attention":
        agg = MemoryAttention(
            MemoryAttentionConfig(
                cfg.query_dim,
                cfg.value_dim,
                cfg.attention_dim,
                cfg.heads,
                cfg.self_token,
                cfg.drop_retrieved,
                combine=cfg.combine,
                attend=cfg.attend,
            )
        )
        features = agg.out_dim
    elif cfg.aggregator == "mean_knn":
        agg, features = MeanKNN(), cfg.query_dim + cfg.value_dim
    else:
        agg, features = None, cfg.query_dim
    if cfg.head == "linear":
        head: nn.Module = LinearHead(features, cfg.classes)
    else:
        head = MLPHead(features, cfg.classes, cfg.mlp_hidden)
    return RetrievalClassifier(agg, head)
