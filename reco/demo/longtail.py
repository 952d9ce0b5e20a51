"""Experiment 1 (Iscen et al., CVPR 2023): long-tailed recognition with a retrieval memory.

A long-tailed training set of frozen image features; a memory of other captioned images (same
image encoder for keys, caption embeddings as values); linear, MLP, mean k-NN and memory
attention classifiers compared by shot bucket."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import eval as ev
from ..memory import EmbeddingTable, Memory
from ..models import ClassifierConfig, RetrievalClassifier, Retriever, build_model
from ..train.data import EmbeddingDataset
from ..train.tasks import LongTailTask, logit_adjustment
from ..train.trainer import TrainConfig, Trainer
from .select import SearchSpace, Selection

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
    # A balanced validation split carved from the training images (never from test): where
    # given, every choice (steps, lr, weight decay, k) is made on it.
    val_z: Tensor | None = None
    val_y: Tensor | None = None


@dataclass
class LongTailParams:
    k: int = 10
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-2
    attention_dim: int = 256  # not stated in the paper: the light-weight choice
    heads: int = 8
    mlp_hidden: int = 1024
    weight_decay: float = 0.05
    # Memory values: caption embeddings ("text"), image features ("image"), or both side by side.
    fusion_modality: str = "both"
    # tau of the logit-adjusted training loss (0: plain cross-entropy), the same for every
    # method: chosen on validation (tau = 1 raised every method's balanced accuracy there).
    logit_adjust: float = 1.0
    # MemoryAttention's combine, logits and attention dropout, chosen on validation: "concat"
    # gives the head the query, the plain mean and the weighted mean of the values; weights
    # from the retrieval scores over a learned temperature did better there than learned
    # projections (which over-fit the few tail images); hiding half the retrieved items in
    # training helped both.
    combine: str = "concat"
    attend: str = "scores"
    drop_retrieved: float = 0.5


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
        drop_retrieved=p.drop_retrieved,
        combine=p.combine,
        attend=p.attend,
    )
    return build_model(cfg)


class LongTailRun:
    """Trains and evaluates the methods of one seed against one memory. The memory's keys are
    searched once for every training, validation and test query (exact top-kmax; the encoders
    and the memory are frozen) and those neighbours are looked up while training; a smaller k
    uses the first k of them (the exact top-k)."""

    def __init__(
        self,
        data: LongTailData,
        memory: Memory,
        params: LongTailParams,
        seed: int,
        device: torch.device,
        neighbours: dict[str, tuple[Tensor, Tensor]] | None = None,
        kmax: int | None = None,
    ) -> None:
        self.data, self.memory, self.p, self.seed, self.device = data, memory, params, seed, device
        self.values = memory_values(memory, params.fusion_modality)
        self.kmax = max(kmax or params.k, params.k)
        self._retrievers: dict[int, Retriever] = {}
        self.retriever = self.retriever_for(params.k)
        if neighbours is None:
            top = self.retriever_for(self.kmax)
            splits = {"train": data.train_z, "test": data.test_z}
            if data.val_z is not None:
                splits["val"] = data.val_z
            neighbours = {name: top.precompute(z) for name, z in splits.items()}
        self.neighbours = neighbours
        self.classes = int(data.counts.numel())

    def retriever_for(self, k: int) -> Retriever:
        if k not in self._retrievers:
            self._retrievers[k] = Retriever(self.memory.keys("image"), self.values, k)
        return self._retrievers[k]

    def with_memory(self, memory: Memory) -> LongTailRun:
        """The same split against another memory with the same keys (e.g. other captions)."""
        return LongTailRun(
            self.data, memory, self.p, self.seed, self.device, self.neighbours, self.kmax
        )

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

    def train(
        self,
        method: str,
        config: dict | None = None,
        eval_every: int | None = None,
        patience: int | None = None,
    ) -> RetrievalClassifier:
        """One model trained with `config` (lr, weight_decay, k; default: the params'). With
        eval_every and a validation split, the checkpoint of best validation accuracy, read every
        eval_every steps, is kept (early stopping; after `patience` reads without gain training
        stops); model.best_step and model.val_accuracy say which. Otherwise all steps run."""
        c = {"lr": self.p.lr, "weight_decay": self.p.weight_decay, "k": self.p.k, **(config or {})}
        retriever = self.retriever_for(int(c["k"]))
        qdim = self.data.train_z.shape[1]
        # Seeded before the weights are drawn: a fixed seed gives the same model every time.
        torch.manual_seed(self.seed)
        model = make_model(method, qdim, retriever.value_dim, self.classes, self.p)
        cfg = TrainConfig(
            steps=self.p.steps,
            batch_size=min(self.p.batch_size, len(self.data.train_y)),
            lr=float(c["lr"]),
            weight_decay=float(c["weight_decay"]),
            warmup_steps=min(50, self.p.steps // 10),
            seed=self.seed,
            progress=False,
            resume=False,
        )
        tau = self.p.logit_adjust
        adjust = logit_adjustment(self.data.counts, tau) if tau else None
        task = LongTailTask(retriever, logit_adjust=adjust)
        trainer = Trainer(model, task, self._dataset(), cfg, device=self.device)
        model.k = int(c["k"])
        model.best_step, model.val_accuracy = self.p.steps, math.nan
        if eval_every is None or self.data.val_z is None:
            trainer.fit()
            return model.eval()
        best, best_state, since = -1.0, None, 0
        stops = [*range(eval_every, self.p.steps, eval_every), self.p.steps]
        for stop in stops:
            trainer.fit(stop)
            acc = self.accuracy(model, "val")
            if acc > best:
                best, best_state, since = acc, copy.deepcopy(model.state_dict()), 0
                model.best_step = stop
            else:
                since += 1
                if patience is not None and since >= patience:
                    break
        model.load_state_dict(best_state)
        model.val_accuracy = best
        return model.eval()

    def select(
        self, method: str, space: SearchSpace, seed: int | None = None
    ) -> tuple[RetrievalClassifier, Selection]:
        """The method's declared search on the validation split: space.trials configurations,
        each early-stopped; the one of best validation accuracy is returned with the record."""
        if self.data.val_z is None:
            raise ValueError("select needs a validation split (LongTailData.val_z)")
        retrieves = _ARCHITECTURES[method][0] != "none"
        sel, best = Selection(), None
        for config in space.draw(method, retrieves, self.seed if seed is None else seed):
            if config.get("k", 0) > self.kmax:
                raise ValueError(f"search k={config['k']} exceeds the neighbours' kmax={self.kmax}")
            model = self.train(method, config, space.eval_every, space.patience)
            sel.add(config, model.val_accuracy, model.best_step)
            if sel.chosen == len(sel.trials) - 1:
                best = model
        return best, sel

    @torch.no_grad()
    def logits(self, model: RetrievalClassifier, split: str = "test") -> Tensor:
        k = getattr(model, "k", self.p.k)
        task = LongTailTask(self.retriever_for(k))
        z = self.data.val_z if split == "val" else self.data.test_z
        idx, sc = self.neighbours[split]
        model.eval()
        out = []
        for i in range(0, len(z), 4096):
            batch = {"image": z[i : i + 4096].to(self.device)}
            if model.aggregator is not None:
                batch["neighbours"] = idx[i : i + 4096, :k]
                batch["neighbour_scores"] = sc[i : i + 4096, :k]
            out.append(task.logits(model, batch).cpu())
        return torch.cat(out)

    def accuracy(self, model: RetrievalClassifier, split: str) -> float:
        y = self.data.val_y if split == "val" else self.data.test_y
        return float((self.logits(model, split).argmax(1) == y).double().mean())

    @torch.no_grad()
    def fused_logits(self, model: RetrievalClassifier) -> Tensor:
        """MemoryAttention's inference through one fused retrieve-attend call per chunk: the
        search over all memory keys and the attention over the retrieved values together."""
        keys = self.memory.keys("image").materialize(self.device)
        values = self.values
        values = values.materialize(self.device) if isinstance(values, EmbeddingTable) else values
        z = self.data.test_z
        k = getattr(model, "k", self.p.k)
        out = []
        for i in range(0, len(z), 4096):
            q = z[i : i + 4096].to(self.device)
            out.append(model.head(model.aggregator.fused_forward(q, keys, values, k)).cpu())
        return torch.cat(out)

    def metrics(self, logits: Tensor) -> dict:
        pred = logits.argmax(1)
        res = ev.long_tail_accuracy(pred, self.data.test_y, self.data.counts)
        res["mean_class_acc"] = ev.mean_per_class_accuracy(pred, self.data.test_y, self.classes)
        return res
