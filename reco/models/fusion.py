"""RECO (ICLR 2024): a single transformer layer that fuses retrieved embeddings into a frozen
CLIP embedding, one per modality.

Tokens: the query embedding and its k retrieved embeddings. One pre-norm layer (attention, then
MLP); only the query token's output is used, so only its row of attention is computed. The
refined embedding is that output, L2-normalised. Width 512, 8 heads, MLP 4x is about 3.2M
parameters (the paper's figure for CLIP-B/32).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from ..config import check_number
from .retrieval import Retriever

Modality = Literal["image", "text"]


@dataclass
class FusionConfig:
    dim: int = 512
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    # Zero-initialised output projections (attention and MLP): the layer starts as the identity,
    # so the refined embedding starts as the frozen one. Not stated in the paper; without it the
    # random branches swamp a unit-norm embedding at the start of training.
    zero_init: bool = True

    def validate(self) -> None:
        check_number("dim", self.dim, integer=True, ge=1)
        check_number("heads", self.heads, integer=True, ge=1)
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} is not divisible by heads={self.heads}")
        check_number("mlp_ratio", self.mlp_ratio, gt=0.0)
        if int(self.dim * self.mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio={self.mlp_ratio} leaves no MLP width at dim={self.dim}")
        check_number("dropout", self.dropout, ge=0.0, lt=1.0)


class FusionTransformer(nn.Module):
    """query [B, dim] + retrieved [B, k, dim] (+ keep [B, k]) -> refined [B, dim], L2-normalised."""

    def __init__(self, cfg: FusionConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or FusionConfig()
        cfg.validate()
        self.cfg = cfg
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = nn.MultiheadAttention(cfg.dim, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(cfg.dim)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, hidden),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(hidden, cfg.dim),
        )
        if cfg.zero_init:
            for layer in (self.attn.out_proj, self.mlp[-1]):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def _attend(self, query: Tensor, retrieved: Tensor, keep: Tensor | None, weights: bool):
        tokens = torch.cat([query.unsqueeze(1), retrieved.to(query.dtype)], 1)  # [B, 1 + k, dim]
        x = self.norm1(tokens)
        pad = None
        if keep is not None:
            # The query token is always visible, so no row is fully masked.
            pad = nn.functional.pad(~keep, (1, 0), value=False)
        at_query = x.narrow(1, 0, 1)  # the query token attends over all of them
        out, w = self.attn(at_query, x, x, key_padding_mask=pad, need_weights=weights)
        return tokens, out, w

    def forward(self, query: Tensor, retrieved: Tensor, keep: Tensor | None = None) -> Tensor:
        tokens, out, _ = self._attend(query, retrieved, keep, weights=False)
        h = tokens[:, 0] + out[:, 0]
        h = h + self.mlp(self.norm2(h))
        return nn.functional.normalize(h, dim=-1)

    def attention_weights(
        self, query: Tensor, retrieved: Tensor, keep: Tensor | None = None
    ) -> Tensor:
        """[B, 1 + k]: the query token's attention (averaged over heads) on itself, then on each
        retrieved item."""
        return self._attend(query, retrieved, keep, weights=True)[2][:, 0]


@dataclass
class RECOConfig:
    """Which memory embeddings each query modality searches (keys) and fuses (values).

    The paper's best: uni-modal search, cross-modal fusion (image -> memory images -> their
    texts; text -> memory texts -> their images). Every combination is a config value."""

    k: int = 10
    image_search: Modality = "image"
    image_fusion: Modality = "text"
    text_search: Modality = "text"
    text_fusion: Modality = "image"
    fusion: FusionConfig = field(default_factory=FusionConfig)
    near_duplicate: float | None = None  # mask retrieved items at cosine >= this to the query

    def validate(self) -> None:
        check_number("k", self.k, integer=True, ge=1)
        check_number("near_duplicate", self.near_duplicate, optional=True)


class RECO(nn.Module):
    """One FusionTransformer per modality on top of frozen CLIP embeddings."""

    def __init__(self, cfg: RECOConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or RECOConfig()
        self.cfg.validate()
        self.image_fusion = FusionTransformer(self.cfg.fusion)
        self.text_fusion = FusionTransformer(self.cfg.fusion)

    def retrievers(self, memory) -> dict[str, Retriever]:
        """The image-query and text-query retrievers over a memory, as the config asks."""
        c = self.cfg
        kw = {"k": c.k, "near_duplicate": c.near_duplicate}
        return {
            "image": Retriever.from_memory(memory, c.image_search, c.image_fusion, **kw),
            "text": Retriever.from_memory(memory, c.text_search, c.text_fusion, **kw),
        }

    def refine(
        self,
        modality: Modality,
        emb: Tensor,
        retriever: Retriever,
        exclude: Tensor | None = None,
        neighbours: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Refined embeddings [B, dim] of image or text embeddings emb [B, dim]. neighbours:
        (indices, scores) found earlier (Retriever.precompute) instead of a search."""
        if neighbours is not None:
            r = retriever.lookup(*neighbours, emb.device)
        else:
            r = retriever(emb, exclude)
        fusion = self.image_fusion if modality == "image" else self.text_fusion
        return fusion(emb, r.values, r.keep)
