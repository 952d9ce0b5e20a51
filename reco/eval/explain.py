"""`reco explain`: an image query's retrieved neighbours and their attention weights, drawn."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..models import Retrieved, Retriever
from .encoders import add_model_configs, open_clip_encoder
from .trained import load_trained


@dataclass
class Explanation:
    """One batch of queries explained. indices [B, k] int64 (rows of the memory searched, the
    model's order: best first); scores [B, k] float32; weights [B, H, k] float32, each item's
    attention weight per head (H = 1 where the model averages its heads: RECO's fusion);
    logits [B, C] of a classifier (long-tail), else None."""

    indices: Tensor
    scores: Tensor
    weights: Tensor
    logits: Tensor | None


def query_modalities(cfg) -> tuple[str, ...]:
    """The query modalities an experiment's model refines or classifies."""
    return (cfg.longtail.query_modality,) if cfg.method == "longtail" else ("image", "text")


def check_explainable(cfg) -> None:
    """A ValueError unless the experiment's model attends over what it retrieves."""
    if cfg.method == "longtail" and cfg.longtail.aggregator != "attention":
        raise ValueError("explain needs an attention aggregator (longtail.aggregator)")
    if cfg.method not in ("longtail", "reco"):
        raise ValueError(f"explain needs a longtail or reco experiment, not {cfg.method!r}")


def retriever_of(cfg, built, modality: str) -> Retriever:
    """The retriever the trained model uses for a query of this modality."""
    if cfg.method == "longtail":
        return built.task.retriever
    return built.model.retrievers(built.memory)[modality]


def search_modalities(cfg, modality: str) -> tuple[str, str]:
    """(searched, fused) memory modalities of a query of this modality."""
    if cfg.method == "longtail":
        return cfg.longtail.search_modality, cfg.longtail.fusion_modality
    c = cfg.reco
    return (
        (c.image_search, c.image_fusion) if modality == "image" else (c.text_search, c.text_fusion)
    )


@torch.no_grad()
def explain_query(
    cfg, built, z: Tensor, modality: str, retrieved: Retrieved | None = None
) -> Explanation:
    """The neighbours of queries z [B, d] and the trained model's attention on them (and its
    logits for a classifier); retrieved: neighbours found elsewhere (another memory, e.g. the
    one served), else the model's own retriever searches."""
    check_explainable(cfg)
    r = retrieved if retrieved is not None else retriever_of(cfg, built, modality)(z)
    if cfg.method == "longtail":
        agg = built.model.aggregator
        weights, _ = agg._weights(z, r.values, r.keep, r.scores)  # [B, H, (1 +) k]
        weights = weights[..., 1:] if agg.cfg.self_token else weights
        logits = built.model(z, r.values, r.keep, r.scores)
    else:
        fusion = built.model.image_fusion if modality == "image" else built.model.text_fusion
        weights = fusion.attention_weights(z, r.values, r.keep)[:, 1:].unsqueeze(1)
        logits = None
    return Explanation(r.indices, r.scores, weights.float(), logits)


def explain(
    image_path: str | os.PathLike,
    config: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    out: str | os.PathLike = "explain.png",
    model: str | None = None,
    pretrained: str | None = None,
    model_configs: Sequence[str] = (),
    allow_random_weights: bool = False,
) -> int:
    """`reco explain`: draws an image query, its retrieved neighbours and their attention weights
    into the PNG `out` (model, pretrained: the image encoder, default the memory's); returns the
    number of neighbours drawn."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("reco explain draws with matplotlib: pip install 'reco[viz]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    cfg, built, _ = load_trained(config, checkpoint)
    if "image" not in query_modalities(cfg):
        raise ValueError("explain shows image queries; this experiment queries with texts")
    check_explainable(cfg)
    info = built.train_memory.manifest.modalities["image"].encoder
    add_model_configs(list(model_configs))
    enc = open_clip_encoder(
        model or info.name.removeprefix("open_clip:"),
        pretrained or info.checkpoint,
        "--pretrained",
        allow_random_weights=allow_random_weights,
    )
    image = Image.open(image_path).convert("RGB")
    with torch.no_grad():
        z = enc.encode_images([image])
    ex = explain_query(cfg, built, z, "image")
    weights, k = ex.weights[0].mean(0), ex.weights.shape[-1]
    meta = built.memory.metadata(ex.indices[0].tolist())
    cols = min(k, 5) + 1
    rows = (k + cols - 2) // (cols - 1)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("query", fontsize=9)
    for j, (m, w) in enumerate(zip(meta, weights.tolist())):
        ax = axes[j // (cols - 1), 1 + j % (cols - 1)]
        src = Path(str(m.get("source") or ""))
        if src.is_file():
            ax.imshow(Image.open(src).convert("RGB"))
        else:
            ax.text(0.5, 0.5, "(no image)", ha="center", va="center", fontsize=8)
        caption = str(m.get("caption") or "")[:40]
        ax.set_title(f"w={w:.3f}\n{caption}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return k
