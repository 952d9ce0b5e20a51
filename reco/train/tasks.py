"""The two methods' training objectives, as loss functions for the Trainer."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from ..distributed import install_clean_shutdown
from ..models import RECO, ProjectionCLIP, RetrievalClassifier, Retriever
from .losses import info_nce, reco_loss


def logit_adjustment(counts: Tensor, tau: float = 1.0) -> Tensor:
    """tau * log(class prior) [C] from training counts per class (a class with none counts as
    one): added to the logits in the training loss only, the logit-adjusted loss of Menon et
    al. (ICLR 2021), which trains the plain logits to be balanced across classes."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() == 0 or bool((counts < 0).any()):
        raise ValueError(f"counts must be a non-empty 1-D tensor of counts >= 0, got {counts}")
    if not (isinstance(tau, (int, float)) and tau >= 0):
        raise ValueError(f"logit adjustment tau must be a number >= 0, got {tau!r}")
    counts = counts.clamp_min(1.0)
    return (tau * torch.log(counts / counts.sum())).float()


class LongTailTask:
    """Classification with retrieval: z = batch[query_key] retrieves from the memory (excluding
    batch["row"] when the training items are themselves in the memory), the classifier
    aggregates and predicts; cross-entropy against batch["label"], with the offsets
    `logit_adjust` [C] (`logit_adjustment`) added to the logits where given. A batch holding
    "neighbours" and "neighbour_scores" (from Retriever.precompute) looks them up instead of
    searching."""

    def __init__(
        self,
        retriever: Retriever | None,
        query_key: str = "image",
        logit_adjust: Tensor | None = None,
    ) -> None:
        self.retriever = retriever
        self.query_key = query_key
        if logit_adjust is not None and logit_adjust.ndim != 1:
            raise ValueError(f"logit_adjust must be [classes], got shape {logit_adjust.shape}")
        self.logit_adjust = logit_adjust

    def logits(self, model: RetrievalClassifier, batch: dict[str, Tensor]) -> Tensor:
        z = batch[self.query_key]
        if model.aggregator is None:
            return model(z)
        if self.retriever is None:
            raise ValueError("this classifier aggregates retrieved values: give a retriever")
        if "neighbours" in batch:
            r = self.retriever.lookup(batch["neighbours"], batch["neighbour_scores"], z.device)
        else:
            exclude = batch["row"].unsqueeze(1) if "row" in batch else None
            r = self.retriever(z, exclude)
        return model(z, r.values, r.keep, r.scores)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        logits = self.logits(model, batch)
        if self.logit_adjust is not None:
            if self.logit_adjust.numel() != logits.shape[1]:
                raise ValueError(
                    f"logit_adjust has {self.logit_adjust.numel()} classes, the model "
                    f"{logits.shape[1]}"
                )
            logits = logits + self.logit_adjust.to(logits.device, logits.dtype)
        return F.cross_entropy(logits, batch["label"])


class RECOTask:
    """RECO's loss on image-text pairs (batch["image"], batch["text"]): refined image and text
    embeddings aligned with each other and with the frozen ones. Items exclude their own memory
    row (batch["row"]) from retrieval. Precomputed neighbours (Retriever.precompute) are used
    where the batch holds "<modality>_neighbours" and "<modality>_neighbour_scores"."""

    def __init__(self, retrievers: dict[str, Retriever], temperature: float = 0.07) -> None:
        self.retrievers = retrievers
        self.temperature = temperature

    def __call__(self, model: RECO, batch: dict[str, Tensor]) -> Tensor:
        v, t = batch["image"], batch["text"]
        exclude = batch["row"].unsqueeze(1) if "row" in batch else None
        v_ref = model.refine("image", v, self.retrievers["image"], exclude, _found(batch, "image"))
        t_ref = model.refine("text", t, self.retrievers["text"], exclude, _found(batch, "text"))
        v_ref, t_ref, v, t = (gather_batch(x) for x in (v_ref, t_ref, v, t))
        return reco_loss(v_ref, t_ref, v, t, self.temperature)


class ContrastiveTask:
    """CLIP's objective on image-text pairs (batch["image"], batch["text"]): symmetric InfoNCE
    of the projected embeddings, over the global batch under torch.distributed."""

    def __init__(self, temperature: float = 0.07) -> None:
        self.temperature = temperature

    def __call__(self, model: ProjectionCLIP, batch: dict[str, Tensor]) -> Tensor:
        v, t = model(batch["image"], batch["text"])
        return info_nce(gather_batch(v), gather_batch(t), self.temperature)


def _found(batch: dict[str, Tensor], modality: str) -> tuple[Tensor, Tensor] | None:
    key = f"{modality}_neighbours"
    return (batch[key], batch[f"{modality}_neighbour_scores"]) if key in batch else None


def gather_batch(x: Tensor) -> Tensor:
    """Under torch.distributed, every rank's rows concatenated (the global batch), with
    gradients flowing back to each rank's own rows: the contrastive loss then sees the same
    negatives as one process with the global batch. Each rank computes that same global loss and
    the gather's backward sums the ranks' gradients, so after DDP's average every rank holds the
    single-process gradient."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    install_clean_shutdown()
    return torch.cat(all_gather(x.contiguous()))
