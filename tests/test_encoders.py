"""reco.encoders: open_clip from a local checkpoint, and the adapter for other models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reco.encoders import FunctionEncoder, OpenCLIPEncoder, file_sha256

open_clip = pytest.importorskip("open_clip")
PIL = pytest.importorskip("PIL.Image")


def test_open_clip_checkpoint_gives_the_models_embeddings(tiny_clip):
    """Loading from the file reproduces the saved model, computed here straight with open_clip."""
    name, path = tiny_clip
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.load_state_dict(torch.load(path)["state_dict"])
    model.eval()
    rng = np.random.default_rng(0)
    images = [PIL.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)) for _ in range(5)]
    texts = ["a cat", "two dogs on a sofa", "", "tram"]
    with torch.no_grad():
        want_img = model.encode_image(torch.stack([preprocess(im) for im in images]))
        want_txt = model.encode_text(open_clip.get_tokenizer(name)(texts))
    enc = OpenCLIPEncoder(name, path, device="cpu", batch_size=2)
    got_img, got_txt = enc.encode_images(images), enc.encode_texts(texts)
    torch.testing.assert_close(got_img, torch.nn.functional.normalize(want_img, dim=1))
    torch.testing.assert_close(got_txt, torch.nn.functional.normalize(want_txt, dim=1))
    assert got_img.dtype == torch.float32 and enc.dim == 32
    assert enc.sha256 == file_sha256(path) and enc.info().checkpoint == str(path)


def test_open_clip_refusals(tiny_clip, tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        OpenCLIPEncoder(tiny_clip[0], tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        OpenCLIPEncoder("ViT-Nonexistent-99", allow_random_weights=True)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        OpenCLIPEncoder(tiny_clip[0], tiny_clip[1], batch_size=0)


def test_function_encoder_adapter():
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(3, 8, generator=g)
    calls = []

    def text_fn(texts):
        calls.append(len(texts))
        return np.stack([np.full(3, len(t), np.float32) for t in texts]) @ proj.numpy()

    enc = FunctionEncoder("toy", 8, text_fn=text_fn, batch_size=4)
    texts = ["a", "bb", "ccc", "dddd", "e", "ff"]
    out = enc.encode_texts(texts)
    assert calls == [4, 2]
    want = torch.nn.functional.normalize(
        torch.tensor([[len(t)] * 3 for t in texts]).float() @ proj, dim=1
    )
    torch.testing.assert_close(out, want)
    assert enc.modalities == ("text",)
    with pytest.raises(TypeError, match="encodes no images"):
        enc.encode_images([None])
    bad = FunctionEncoder("bad", 5, text_fn=lambda t: np.zeros((len(t), 4)))
    with pytest.raises(ValueError, match=r"returned shape \(2, 4\), expected \[n, 5\]"):
        bad.encode_texts(["x", "y"])
    with pytest.raises(ValueError, match="give image_fn, text_fn or both"):
        FunctionEncoder("none", 3)
