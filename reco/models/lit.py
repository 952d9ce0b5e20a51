"""LiT-style alignment of two frozen encoders: a linear projection per modality into a shared
space, trained contrastively; a small "CLIP" when no pretrained one can be had."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F


class ProjectionCLIP(nn.Module):
    """image features [B, image_dim] and text features [B, text_dim] -> L2-normalised [B, dim]."""

    def __init__(self, image_dim: int, text_dim: int, dim: int = 256) -> None:
        super().__init__()
        if min(image_dim, text_dim, dim) < 1:
            raise ValueError(f"dims must be >= 1, got {image_dim}, {text_dim}, {dim}")
        self.image = nn.Linear(image_dim, dim)
        self.text = nn.Linear(text_dim, dim)

    def encode_image(self, x: Tensor) -> Tensor:
        return F.normalize(self.image(x), dim=-1)

    def encode_text(self, x: Tensor) -> Tensor:
        return F.normalize(self.text(x), dim=-1)

    def forward(self, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        return self.encode_image(image), self.encode_text(text)
