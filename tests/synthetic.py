"""Synthetic tasks for the training tests (importable by spawned processes)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from reco.models import Retriever
from reco.train import EmbeddingDataset

C, D, DV = 10, 32, 16
COUNTS = [300, 150, 80, 40, 20, 10, 5, 3, 2, 2]  # a long tail: the last classes are few-shot


def long_tail_task(seed: int, distractors: float = 0.0):
    """Query features are noisy class prototypes (one frozen encoder); the memory holds 200
    items per class whose values are their captions' embeddings (another encoder), plus, as a
    fraction of the memory, distractors: items near the queries with unrelated values."""
    g = torch.Generator().manual_seed(seed)
    mu = F.normalize(torch.randn(C, D, generator=g), dim=1)
    tau = F.normalize(torch.randn(C, DV, generator=g), dim=1)

    def sample(c, n):
        return F.normalize(mu[c] + 0.3 * torch.randn(n, D, generator=g), dim=1)

    x_train = torch.cat([sample(c, n) for c, n in enumerate(COUNTS)])
    y_train = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])
    x_test = torch.cat([sample(c, 100) for c in range(C)])
    y_test = torch.arange(C).repeat_interleave(100)
    keys = torch.cat([sample(c, 200) for c in range(C)])
    values = F.normalize(
        tau.repeat_interleave(200, 0) + 0.1 * torch.randn(C * 200, DV, generator=g), dim=1
    )
    n_dist = int(distractors * len(keys) / (1 - distractors))
    if n_dist:
        keys = torch.cat([keys] + [sample(c, n_dist // C) for c in range(C)])
        values = torch.cat(
            [values, F.normalize(torch.randn(n_dist // C * C, DV, generator=g), dim=1)]
        )
    data = EmbeddingDataset({"image": x_train, "label": y_train})
    return data, (x_test, y_test), Retriever(keys, values, k=10)


def train_small_long_tail_model(steps: int = 8):
    """The model the DDP test trains (same seeds in every process): 8 steps of memory attention
    + linear head on long_tail_task(seed=5). Returns the trained model."""
    from reco.models import LinearHead, MemoryAttention, MemoryAttentionConfig, RetrievalClassifier
    from reco.train import LongTailTask, TrainConfig, Trainer

    data, _, retriever = long_tail_task(seed=5)
    torch.manual_seed(7)
    model = RetrievalClassifier(
        MemoryAttention(MemoryAttentionConfig(D, DV, dim=32, heads=1)), LinearHead(D, C)
    )
    cfg = TrainConfig(steps=steps, batch_size=64, warmup_steps=2, progress=False)
    Trainer(model, LongTailTask(retriever), data, cfg, device="cpu").fit()
    return model


def train_small_reco_model(steps: int = 6):
    """RECO on random image-text pairs that are also the memory (each pair excludes its own
    row); the same in every process. Returns the trained model."""
    from reco.models import RECO, FusionConfig, RECOConfig
    from reco.train import RECOTask, TrainConfig, Trainer

    g = torch.Generator().manual_seed(8)
    img = F.normalize(torch.randn(400, 16, generator=g), dim=1)
    txt = F.normalize(img + 0.5 * torch.randn(400, 16, generator=g), dim=1)
    torch.manual_seed(9)
    model = RECO(RECOConfig(k=5, fusion=FusionConfig(dim=16, heads=2)))
    retrievers = {"image": Retriever(img, txt, k=5), "text": Retriever(txt, img, k=5)}
    data = EmbeddingDataset({"image": img, "text": txt, "row": torch.arange(400)})
    cfg = TrainConfig(steps=steps, batch_size=32, warmup_steps=1, grad_clip=None, progress=False)
    Trainer(model, RECOTask(retrievers, 0.1), data, cfg, device="cpu").fit()
    return model
