"""The frozen open_clip encoders that evaluation (and the CLI) load from a memory's manifest or
from flags: model configs checked before open_clip registers them, checkpoint errors that name
the flag or file they came from."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, at most limit characters."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def add_model_configs(paths: list[str], flag: str = "--model-config") -> None:
    """Registers open_clip model configs (files or folders of them) after checking each: open_clip
    keeps a registered path for good, so a bad file would break every later model lookup."""
    if not paths:
        return
    import open_clip

    for given in paths:
        path = Path(given)
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        for f in files:
            if not f.is_file():
                raise ValueError(f"{flag} {given}: no such file or folder (or not a regular file)")
            if f.suffix != ".json" or f.stat().st_size > 1 << 24:
                raise ValueError(f"{flag} {f}: not an open_clip model config (.json)")
            try:
                cfg = json.loads(f.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise ValueError(f"{flag} {f}: not a JSON model config ({e})") from None
            if not isinstance(cfg, dict) or not all(
                k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")
            ):
                raise ValueError(
                    f"{flag} {f}: not an open_clip model config (it needs embed_dim, vision_cfg "
                    "and text_cfg)"
                )
        open_clip.add_model_config(path)


def open_clip_encoder(model: str, pretrained: str | None, flag: str, **kw):
    """An OpenCLIPEncoder; a checkpoint that does not load is an error naming flag."""
    import pickle

    from reco.encoders import OpenCLIPEncoder

    try:
        return OpenCLIPEncoder(model, pretrained, **kw)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as e:
        if pretrained is None:
            raise
        raise ValueError(
            f"{flag} {pretrained} cannot be loaded as a checkpoint of {model} ({one_line(e)})"
        ) from None


def load_encoders(
    model: str | None,
    pretrained: str | None = None,
    text_model: str | None = None,
    text_pretrained: str | None = None,
    *,
    model_configs: Sequence[str] = (),
    device: str | None = None,
    batch_size: int = 64,
    allow_random_weights: bool = False,
):
    """(image encoder, text encoder) as `reco build-memory` names them by flags (the text encoder
    is the image one unless text_model is given); device checked against this machine."""
    if model is None:
        raise ValueError("--model is required (an open_clip architecture name)")
    if device is not None:
        import torch

        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"--device {device!r} is not a device ({e})") from None
        if dev.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0 or (dev.index is not None and dev.index >= count):
                raise ValueError(f"--device {device}: this machine has {count} CUDA devices")
    add_model_configs(list(model_configs))
    kw = {"device": device, "batch_size": batch_size, "allow_random_weights": allow_random_weights}
    image = open_clip_encoder(model, pretrained, "--pretrained", **kw)
    if text_model is None:
        return image, image
    return image, open_clip_encoder(text_model, text_pretrained, "--text-pretrained", **kw)
