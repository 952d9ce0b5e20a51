"""A training run from an experiment config: `build` turns the config into a model, its
training objective and its dataset (from memory folders); `train` fits it (`reco train`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import ConfigError, to_dict
from ..memory import Memory
from ..models import Retriever, build_model
from .config import ExperimentConfig
from .data import EmbeddingDataset
from .tasks import LongTailTask, RECOTask, logit_adjustment
from .trainer import Trainer


@dataclass
class Built:
    model: nn.Module
    task: LongTailTask | RECOTask
    dataset: EmbeddingDataset
    memory: Memory
    train_memory: Memory


def build(cfg: ExperimentConfig) -> Built:
    """The model, its objective and the training dataset for an experiment config."""
    memory = Memory.open(cfg.data.memory)
    train_mem = Memory.open(cfg.data.train)
    if cfg.method == "longtail":
        lt = cfg.longtail
        if train_mem.labels is None:
            raise ConfigError(f"data.train={cfg.data.train} has no labels (longtail needs them)")
        classes = len(train_mem.manifest.label_names or []) or int(train_mem.labels.max()) + 1
        dataset = EmbeddingDataset.from_memory(
            train_mem, (lt.query_modality,), rows=cfg.data.train_in_memory
        )
        qdim = train_mem.keys(lt.query_modality).dim
        vdim = memory.values(lt.fusion_modality).dim
        model: nn.Module = build_model(lt.classifier(qdim, vdim, classes))
        retriever = None
        if lt.aggregator != "none":
            retriever = Retriever.from_memory(
                memory,
                lt.search_modality,
                lt.fusion_modality,
                lt.k,
                near_duplicate=lt.near_duplicate,
            )
        adjust = None
        if lt.logit_adjust:
            labels = torch.as_tensor(np.asarray(train_mem.labels), dtype=torch.int64)
            adjust = logit_adjustment(torch.bincount(labels, minlength=classes), lt.logit_adjust)
        task: LongTailTask | RECOTask = LongTailTask(retriever, lt.query_modality, adjust)
    else:
        dataset = EmbeddingDataset.from_memory(
            train_mem, ("image", "text"), rows=cfg.data.train_in_memory
        )
        dataset.tensors.pop("label", None)
        dims = {m: memory.keys(m).dim for m in memory.modalities}
        if len(set(dims.values())) != 1 or dims.get("image") != cfg.reco.fusion.dim:
            raise ConfigError(
                f"reco.fusion.dim={cfg.reco.fusion.dim} must equal the memory's embedding "
                f"dims {dims}"
            )
        model = build_model(cfg.reco)
        task = RECOTask(model.retrievers(memory), cfg.temperature)
    return Built(model, task, dataset, memory, train_mem)


def train(
    cfg: ExperimentConfig, out_dir: str | None = None, steps: int | None = None
) -> dict[str, Any]:
    """Trains the experiment (out_dir and steps override train.out_dir and train.steps); returns
    the last logged metrics."""
    if out_dir is not None:
        cfg.train.out_dir = out_dir
    if steps is not None:
        cfg.train.steps = steps
        cfg.train.validate()
    built = build(cfg)
    log = Trainer(built.model, built.task, built.dataset, cfg.train, config=to_dict(cfg)).fit()
    return log[-1] if log else {}
