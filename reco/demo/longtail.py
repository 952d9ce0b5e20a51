"""Experiment 1 (Iscen et al., CVPR 2023): long-tailed recognition with a retrieval memory.

A long-tailed training set of frozen image features; a memory of other captioned images (same
image encoder for keys, caption embeddings as values); linear, MLP, mean k-NN and memory
attention classifiers compared by shot bucket."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import eval as ev
from ..memory import EmbeddingTable, Memory
from ..models import ClassifierConfig, RetrievalClassifier, Retriever, build_model
from ..train.data import EmbeddingDataset
from ..train.tasks import LongTailTask
from ..train.trainer import TrainConfig, Trainer

METHODS = ("linear", "mlp", "mean_knn", "attention")
METHOD_NAMES = {
    "linear": "linear",
    "mlp": "MLP",
    "mean_knn": "mean k-NN",
    "attention": "MemoryAttention",
    "attention_fused": "MemoryAttention (fused op)",
}


@dataclass
class LongTailData:
    """One seed's long-tailed split: queries (frozen image features) and labels."""

    train_z: Tensor  # [n, d] float32
    train_y: Tensor  # [n] int64
    counts: Tensor  # [C] training images per class
    test_z: Tensor
    test_y: Tensor


@dataclass
class LongTailParams:
    k: int = 10
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-2
    attention_dim: int = 256  # not stated in the paper: the light-weight choice
    heads: int = 8
    mlp_hidden: int = 1024
    # Memory values: caption embeddings ("text"), image features ("image"), or both side by side.
    fusion_modality: str = "text"


def memory_values(memory: Memory, which: str) -> EmbeddingTable | Tensor:
    """The memory values experiment 1 fuses: one modality's table (memory-mapped), or "both":
    [text | image] side by side in one float16 tensor."""
    if which in ("text", "image"):
        return memory.values(which)
    if which == "both":
        return torch.cat([memory.values(m).materialize() for m in ("text", "image")], 1)
    raise ValueError(f"fusion_modality must be 'text', 'image' or 'both', got {which!r}")


# Each method as the factory's (aggregator, head).
_ARCHITECTURES = {
    "linear": ("none", "linear"),
    "mlp": ("none", "mlp"),
    "mean_knn": ("mean_knn", "linear"),
    "attention": ("attention", "linear"),
}


def make_model(method: str, qdim: int, vdim: int, classes: int, p: LongTailParams):
    if method not in _ARCHITECTURES:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    aggregator, head = _ARCHITECTURES[method]
    cfg = ClassifierConfig(
        qdim,
        vdim,
        classes,
        aggregator,
        head,
        attention_dim=p.attention_dim,
        heads=p.heads,
        mlp_hidden=p.mlp_hidden,
    )
    return build_model(cfg)


class LongTailRun:
    """Trains and evaluates the methods of one seed against one memory. The memory's keys are
    searched once for every training and test query (exact top-k; the encoders and the memory
    are frozen) and those neighbours are looked up while training."""

    def __init__(
        self,
        data: LongTailData,
        memory: Memory,
        params: LongTailParams,
        seed: int,
        device: torch.device,
        neighbours: dict[str, tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        self.data, self.memory, self.p, self.seed, self.device = data, memory, params, seed, device
        self.values = memory_values(memory, params.fusion_modality)
        self.retriever = Retriever(memory.keys("image"), self.values, params.k)
        if neighbours is None:
            neighbours = {
                "train": self.retriever.precompute(data.train_z),
                "test": self.retriever.precompute(data.test_z),
            }
        self.neighbours = neighbours
        self.classes = int(data.counts.numel())

    def with_memory(self, memory: Memory) -> LongTailRun:
        """The same split against another memory with the same keys (e.g. other captions)."""
        return LongTailRun(self.data, memory, self.p, self.seed, self.device, self.neighbours)

    def _dataset(self) -> EmbeddingDataset:
        idx, sc = self.neighbours["train"]
        return EmbeddingDataset(
            {
                "image": self.data.train_z,
                "label": self.data.train_y,
                "neighbours": idx,
                "neighbour_scores": sc,
            }
        )

    def train(self, method: str) -> RetrievalClassifier:
        qdim = self.data.train_z.shape[1]
        model = make_model(method, qdim, self.retriever.value_dim, self.classes, self.p)
        torch.manual_seed(self.seed)
        cfg = TrainConfig(
            steps=self.p.steps,
            batch_size=min(self.p.batch_size, len(self.data.train_y)),
            lr=self.p.lr,
            warmup_steps=min(50, self.p.steps // 10),
            seed=self.seed,
            progress=False,
            resume=False,
        )
        Trainer(model, LongTailTask(self.retriever), self._dataset(), cfg, device=self.device).fit()
        return model.eval()

    @torch.no_grad()
    def logits(self, model: RetrievalClassifier) -> Tensor:
        task = LongTailTask(self.retriever)
        z, (idx, sc) = self.data.test_z, self.neighbours["test"]
        out = []
        for i in range(0, len(z), 4096):
            batch = {"image": z[i : i + 4096].to(self.device)}
            if model.aggregator is not None:
                batch["neighbours"] = idx[i : i + 4096]
                batch["neighbour_scores"] = sc[i : i + 4096]
            out.append(task.logits(model, batch).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def fused_logits(self, model: RetrievalClassifier) -> Tensor:
        """MemoryAttention's inference through one fused retrieve-attend call per chunk: the
        search over all memory keys and the attention over the retrieved values together."""
        keys = self.memory.keys("image").materialize(self.device)
        values = self.values
        values = values.materialize(self.device) if isinstance(values, EmbeddingTable) else values
        z = self.data.test_z
        out = []
        for i in range(0, len(z), 4096):
            q = z[i : i + 4096].to(self.device)
            out.append(model.head(model.aggregator.fused_forward(q, keys, values, self.p.k)).cpu())
        return torch.cat(out)

    def metrics(self, logits: Tensor) -> dict:
        pred = logits.argmax(1)
        res = ev.long_tail_accuracy(pred, self.data.test_y, self.data.counts)
        res["mean_class_acc"] = ev.mean_per_class_accuracy(pred, self.data.test_y, self.classes)
        return res
