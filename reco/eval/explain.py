"""`reco explain`: an image query's retrieved neighbours and their attention weights, drawn."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .encoders import add_model_configs, open_clip_encoder
from .trained import load_trained


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
    import torch
    from PIL import Image

    cfg, built, _ = load_trained(config, checkpoint)
    query_modality = cfg.longtail.query_modality if cfg.method == "longtail" else "image"
    if query_modality != "image":
        raise ValueError("explain shows image queries; this experiment queries with texts")
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
        if cfg.method == "longtail":
            lt = cfg.longtail
            if cfg.longtail.aggregator != "attention":
                raise ValueError("explain needs an attention aggregator (longtail.aggregator)")
            r = built.task.retriever(z)
            weights = built.model.aggregator.attention_weights(z, r.values, r.keep)[0]
            k = lt.k
        else:
            r = built.model.retrievers(built.memory)["image"](z)
            weights = built.model.image_fusion.attention_weights(z, r.values, r.keep)[0, 1:]
            k = cfg.reco.k
    meta = built.memory.metadata(r.indices[0].tolist())
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
