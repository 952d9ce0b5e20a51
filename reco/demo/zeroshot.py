"""Experiment 2 (RECO, Iscen et al., ICLR 2024): retrieval-enhanced zero-shot classification.

A small CLIP (linear projections aligning frozen image and text encoders, LiT-style) is trained
on captioned images of some classes only; the others are unseen concepts for it. RECO's fusion
layers are trained with the paper's loss on a separate split; a memory of captioned images
covers every class. Zero-shot accuracy with class prompts, split into seen and unseen classes,
and a control: the trained RECO evaluated with the unseen classes removed from its memory."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..memory import Memory
from ..models import RECO, FusionConfig, ProjectionCLIP, RECOConfig, Retriever, build_model
from ..train.data import EmbeddingDataset
from ..train.tasks import ContrastiveTask, RECOTask
from ..train.trainer import TrainConfig, Trainer

PROMPTS = ("a photo of a {}.", "a picture of the {}.", "{}")


@dataclass
class ZeroShotParams:
    seen_fraction: float = 0.5  # classes the small CLIP is trained on
    pretrain: int = 15000  # captioned images of seen classes for the small CLIP
    fusion_train: int = 5000  # a separate split (any class) for RECO's fusion layers
    dim: int = 256
    clip_steps: int = 600
    reco_steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    k: int = 10
    k_sweep: tuple[int, ...] = (1, 5, 10, 20)
    # The 2x2 search x fusion table and the k sweep, on the first seed (6 more trainings).
    ablations: bool = False
    heads: int = 8
    clip_temperature: float = 0.07  # the small CLIP's InfoNCE
    temperature: float = 0.2  # RECO's InfoNCE (not stated in the paper)
    prompts: tuple[str, ...] = field(default=PROMPTS)
    # Validation: this many captioned training images per class, outside the pretraining and
    # fusion splits and the memory; the small CLIP's and RECO's choices are made on it.
    val_per_class: int = 50
    # Each model's declared search (the same number of trials, SearchSpace.trials, for both):
    # lr x temperature (the small CLIP's InfoNCE temperature, or RECO's).
    search_lr: tuple[float, ...] = (1e-3, 3e-3)
    search_temperature: tuple[float, ...] = (0.07, 0.2)


def modality(query: str, kind: str) -> str:
    """uni: the query's own modality; cross: the other one."""
    return query if kind == "uni" else ("text" if query == "image" else "image")


def reco_config(search: str, fusion: str, k: int, p: ZeroShotParams) -> RECOConfig:
    return RECOConfig(
        k=k,
        image_search=modality("image", search),
        image_fusion=modality("image", fusion),
        text_search=modality("text", search),
        text_fusion=modality("text", fusion),
        fusion=FusionConfig(dim=p.dim, heads=p.heads),
    )


def _train_cfg(steps: int, n: int, p: ZeroShotParams, seed: int) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        batch_size=min(p.batch_size, n),
        lr=p.lr,
        warmup_steps=min(50, steps // 10),
        seed=seed,
        progress=False,
        resume=False,
    )


def train_small_clip(
    image: Tensor, text: Tensor, p: ZeroShotParams, seed: int, device: torch.device
) -> ProjectionCLIP:
    torch.manual_seed(seed)
    model = ProjectionCLIP(image.shape[1], text.shape[1], p.dim)
    data = EmbeddingDataset({"image": image, "text": text})
    cfg = _train_cfg(p.clip_steps, len(image), p, seed)
    Trainer(model, ContrastiveTask(p.clip_temperature), data, cfg, device=device).fit()
    return model.eval().cpu()


@torch.no_grad()
def project(model: ProjectionCLIP, x: Tensor, which: str) -> Tensor:
    fn = model.encode_image if which == "image" else model.encode_text
    return torch.cat([fn(x[i : i + 8192]) for i in range(0, len(x), 8192)])


class RECORuns:
    """Trains and evaluates RECO variants over one memory. Neighbours of the fusion split and
    of the test queries are searched once per (query modality, searched modality), when first
    needed, with the largest k, then looked up (the first k of an exact top-K are the exact
    top-k)."""

    def __init__(
        self,
        memory: Memory,
        fusion_pairs: tuple[Tensor, Tensor],
        test_image: Tensor,
        class_text: Tensor,
        p: ZeroShotParams,
        seed: int,
        device: torch.device,
        val_image: Tensor | None = None,
    ) -> None:
        self.memory, self.p, self.seed, self.device = memory, p, seed, device
        self.pairs = {"image": fusion_pairs[0], "text": fusion_pairs[1]}
        self.test = {"image": test_image, "text": class_text}
        self.val = {"image": val_image, "text": class_text}
        self.kmax = max(max(p.k_sweep), p.k)
        self._nb: dict[tuple[str, str, str], tuple[Tensor, Tensor]] = {}

    def neighbours(self, split: str, query: str, searched: str) -> tuple[Tensor, Tensor]:
        """The top-kmax of the split's `query`-modality embeddings among the memory's
        `searched` embeddings, searched on first use only."""
        key = (split, query, searched)
        if key not in self._nb:
            q = {"train": self.pairs, "test": self.test, "val": self.val}[split][query]
            if q is None:
                raise ValueError(f"no {split} {query} queries were given")
            r = Retriever(self.memory.keys(searched), self.memory.values(searched), self.kmax)
            self._nb[key] = r.precompute(q)
        return self._nb[key]

    def train(
        self,
        search: str,
        fusion: str,
        k: int,
        *,
        lr: float | None = None,
        temperature: float | None = None,
        zero_init: bool = True,
    ) -> RECO:
        """RECO's fusion layers trained on the fusion split (lr and the InfoNCE temperature
        default to the params'; zero_init=False: the standard layer's initialisation)."""
        cfg = reco_config(search, fusion, k, self.p)
        cfg.fusion.zero_init = zero_init
        p = dataclasses.replace(self.p, lr=lr or self.p.lr)
        torch.manual_seed(self.seed)
        model = build_model(cfg)
        retrievers = model.retrievers(self.memory)
        tensors = dict(self.pairs)
        for qm, sm in (("image", cfg.image_search), ("text", cfg.text_search)):
            nb = self.neighbours("train", qm, sm)
            tensors[f"{qm}_neighbours"], tensors[f"{qm}_neighbour_scores"] = nb
        n = len(self.pairs["image"])
        Trainer(
            model,
            RECOTask(retrievers, temperature or self.p.temperature),
            EmbeddingDataset(tensors),
            _train_cfg(self.p.reco_steps, n, p, self.seed),
            device=self.device,
        ).fit()
        return model.eval()

    def with_memory(self, memory: Memory) -> RECORuns:
        """The same queries against another memory (the fusion layers do not depend on it)."""
        pairs = (self.pairs["image"], self.pairs["text"])
        return RECORuns(
            memory,
            pairs,
            self.test["image"],
            self.test["text"],
            self.p,
            self.seed,
            self.device,
            self.val["image"],
        )

    @torch.no_grad()
    def refined(self, model: RECO, split: str = "test") -> tuple[Tensor, Tensor]:
        """Refined test (or validation) image embeddings and class prompt embeddings."""
        cfg = model.cfg
        retrievers = model.retrievers(self.memory)
        out = []
        queries = self.val if split == "val" else self.test
        for qm, sm in (("image", cfg.image_search), ("text", cfg.text_search)):
            q, (idx, sc) = queries[qm], self.neighbours(split, qm, sm)
            parts = [
                model.refine(
                    qm,
                    q[i : i + 4096].to(self.device),
                    retrievers[qm],
                    neighbours=(idx[i : i + 4096], sc[i : i + 4096]),
                ).cpu()
                for i in range(0, len(q), 4096)
            ]
            out.append(torch.cat(parts))
        return out[0], out[1]


def zero_shot_accuracy(
    image: Tensor, class_text: Tensor, labels: Tensor, seen: np.ndarray
) -> dict[str, float]:
    """Top-1 accuracy over all classes, and over the test samples of seen / unseen classes."""
    pred = (image @ class_text.T).argmax(1)
    correct = (pred == labels).double()
    is_seen = torch.from_numpy(np.isin(labels.numpy(), seen))
    return {
        "seen": correct[is_seen].mean().item(),
        "unseen": correct[~is_seen].mean().item(),
        "all": correct.mean().item(),
    }
