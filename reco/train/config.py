"""The experiment config of `reco train`, `reco eval` and `reco explain` (YAML or TOML, read by
reco.config): which method, which data, which model, how to train.

    method: longtail            # or: reco
    data:
      train: runs/train-memory  # a memory folder of the training items (labels for longtail)
      memory: runs/memory       # the memory retrieved from
      test: runs/test-memory    # for `reco eval`
    longtail: {aggregator: attention, head: linear, k: 10}
    train: {steps: 2000, batch_size: 256, lr: 0.001, out_dir: runs/lt}

Values the papers do not state are config values with defaults (documented per field).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from .. import config as _config
from ..config import check_number
from ..models import ClassifierConfig, RECOConfig
from .trainer import TrainConfig

Modality = Literal["image", "text"]


@dataclass
class DataConfig:
    train: str  # memory folder of the training items
    memory: str  # memory folder retrieved from
    test: str | None = None  # memory folder of the evaluation items
    # The training items are rows of `memory` itself (RECO trains on memory pairs): each item
    # then excludes its own row from its retrieval.
    train_in_memory: bool = False


@dataclass
class LongTailConfig:
    aggregator: Literal["attention", "mean_knn", "none"] = "attention"
    head: Literal["linear", "mlp"] = "linear"
    k: int = 10
    query_modality: Modality = "image"  # the training items' embedding used as the query
    search_modality: Modality = "image"  # memory keys: the same encoder as the query
    fusion_modality: Modality = "text"  # memory values fused (any encoder)
    attention_dim: int | None = None  # default: the query dim
    heads: int = 8
    self_token: bool = False
    drop_retrieved: float = 0.0  # not stated in the paper
    mlp_hidden: int = 1024
    combine: str = "residual"  # attention: z + update, or "concat" [z ; mean ; attended]
    attend: str = "learned"  # attention logits: "learned" projections or the retrieval "scores"
    near_duplicate: float | None = None  # mask retrieved items this close to the query
    logit_adjust: float = 0.0  # tau of the logit-adjusted loss (0: plain cross-entropy)
    many_above: int = 100  # shot buckets: many > 100, medium 20..100, few < 20
    few_below: int = 20

    def validate(self) -> None:
        check_number("k", self.k, integer=True, ge=1)
        check_number("attention_dim", self.attention_dim, integer=True, ge=1, optional=True)
        check_number("heads", self.heads, integer=True, ge=1)
        if self.attention_dim is not None and self.attention_dim % self.heads:
            raise ValueError(
                f"heads={self.heads} does not divide attention_dim={self.attention_dim}"
            )
        check_number("drop_retrieved", self.drop_retrieved, ge=0, lt=1)
        check_number("mlp_hidden", self.mlp_hidden, integer=True, ge=1)
        check_number("near_duplicate", self.near_duplicate, optional=True)
        check_number("logit_adjust", self.logit_adjust, ge=0)
        check_number("few_below", self.few_below, integer=True, ge=0)
        check_number("many_above", self.many_above, integer=True, ge=self.few_below)

    def classifier(self, query_dim: int, value_dim: int, classes: int) -> ClassifierConfig:
        """The model part of this section (for reco.models.build_model)."""
        return ClassifierConfig(
            query_dim,
            value_dim,
            classes,
            self.aggregator,
            self.head,
            self.attention_dim,
            self.heads,
            self.self_token,
            self.drop_retrieved,
            self.mlp_hidden,
            self.combine,
            self.attend,
        )


@dataclass
class ZeroShotConfig:
    """Class prompts for RECO's zero-shot evaluation: either a .npy [C, d] or [C, P, d] of text
    embeddings (P prompt templates) in the memory's text space, or class names (default: the
    test memory's label names) and templates, encoded with the memory's text encoder."""

    class_embeddings: str | None = None
    class_names: list[str] | None = None
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    model_config: str | None = None  # extra open_clip model config JSON for the text encoder


@dataclass
class ExperimentConfig:
    method: Literal["longtail", "reco"]
    data: DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    longtail: LongTailConfig = field(default_factory=LongTailConfig)
    reco: RECOConfig = field(default_factory=RECOConfig)
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    temperature: float = 0.07  # RECO's InfoNCE temperature (not stated in the paper)

    def validate(self) -> None:
        check_number("temperature", self.temperature, gt=0)


def load_experiment(path) -> ExperimentConfig:
    return _config.load_config(path, ExperimentConfig)


# The generic loader lived here before reco.config; old imports of it still work, with a warning.
_MOVED = ("ConfigError", "dump_config", "from_dict", "load_config", "to_dict")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"reco.train.config.{name} moved to reco.config.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
