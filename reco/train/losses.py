"""Training objectives: InfoNCE (CLIP-style, symmetric) and the RECO combination."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def info_nce(a: Tensor, b: Tensor, temperature: float = 0.07) -> Tensor:
    """Symmetric InfoNCE between matching rows of a [B, d] and b [B, d] (L2-normalised inside):
    mean of the a->b and b->a cross-entropies over the cosine logits / temperature."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"a and b must both be [B, d], got {tuple(a.shape)}, {tuple(b.shape)}")
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def reco_loss(
    image_refined: Tensor,
    text_refined: Tensor,
    image: Tensor,
    text: Tensor,
    temperature: float = 0.07,
) -> Tensor:
    """RECO: InfoNCE(v', t') + InfoNCE(v', t) + InfoNCE(v, t'); v, t the frozen embeddings."""
    return (
        info_nce(image_refined, text_refined, temperature)
        + info_nce(image_refined, text, temperature)
        + info_nce(image, text_refined, temperature)
    )
