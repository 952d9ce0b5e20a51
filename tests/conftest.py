"""Shared fixtures."""

from __future__ import annotations

import pathlib
import platform
import socket

import pytest
import torch

import reco.ops

LEVELS = reco.ops._C.cpu_levels() if reco.ops._C is not None else []
# Every CPU level of this architecture: the ones this build or CPU lacks are skipped, saying why.
ARCH_LEVELS = {
    "x86_64": ["generic", "avx2", "avx512", "avx512bf16"],
    "amd64": ["generic", "avx2", "avx512", "avx512bf16"],
    "aarch64": ["generic", "neon"],
    "arm64": ["generic", "neon"],
}.get(platform.machine().lower(), LEVELS)
DATA = pathlib.Path(__file__).parent / "data"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that no one listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "browser: the web page of `reco serve` in headless Chromium (selenium)"
    )


@pytest.fixture(autouse=True)
def _gradual_underflow():
    """Each test starts with subnormals honoured. torch.compile on CPU in torch 2.4 turns on
    flush-to-zero and denormals-are-zero for the calling thread and keeps them on (inductor
    links its kernels with -ffast-math: pytorch#126848, fixed in 2.5), which would change the
    arithmetic of every later test in the process (the oracle's, numpy's, hypothesis's)."""
    yield
    torch.set_flush_denormal(False)


@pytest.fixture(params=ARCH_LEVELS if LEVELS else ["reference"])
def cpu_level(request, monkeypatch):
    """Runs a test once per SIMD level of this architecture (RECO_CPU_LEVEL); a level not compiled
    in or not supported by this CPU is skipped."""
    if request.param != "reference":
        if request.param not in LEVELS:
            pytest.skip(f"the {request.param} level is not in this build or not supported by this "
                        f"CPU (reco._C.cpu_levels() = {LEVELS})")  # fmt: skip
        monkeypatch.setenv("RECO_CPU_LEVEL", request.param)
    return request.param


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny open_clip architecture (tests/data/reco-tiny-clip.json) and a checkpoint file of
    its (seeded random) weights: (model name, checkpoint path)."""
    open_clip = pytest.importorskip("open_clip")
    open_clip.add_model_config(DATA / "reco-tiny-clip.json")
    torch.manual_seed(0)
    model = open_clip.create_model("reco-tiny-clip")
    path = tmp_path_factory.mktemp("weights") / "reco-tiny-clip.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return "reco-tiny-clip", path


@pytest.fixture
def image_tree(tmp_path):
    """An ImageFolder tree, 2 classes x 6 random 32x32 PNGs: tmp_path/tree/<class>/<i>.png."""
    import numpy as np

    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for c in ("ant", "bee"):
        (tmp_path / "tree" / c).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "tree" / c / f"{i}.png")
    return tmp_path / "tree"


def tiny_clip_args(tiny_clip) -> list[str]:
    """`reco` CLI arguments selecting the tiny open_clip model and its checkpoint."""
    name, weights = tiny_clip
    return [
        "--model",
        name,
        "--pretrained",
        str(weights),
        "--model-config",
        str(DATA / "reco-tiny-clip.json"),
    ]


@pytest.fixture
def tiny_memory(tmp_path, image_tree, tiny_clip):
    """A memory built by `reco build-memory` from image_tree with the tiny open_clip model."""
    from reco.cli import main

    out = tmp_path / "mem"
    build = ["build-memory", str(out), "--image-folder", str(image_tree), "--no-progress"]
    assert main([*build, *tiny_clip_args(tiny_clip)]) == 0
    return out


def tiny_longtail_config(tmp_path, memory) -> pathlib.Path:
    """The cheapest experiment with a checkpoint: a long-tail attention classifier (2 heads,
    k = 4) over `memory` (train and memory alike), 5 steps into tmp_path / "run". Returns the
    config file (tmp_path / "x.yaml"); nothing is trained yet."""
    cfg = tmp_path / "x.yaml"
    cfg.write_text(
        f"""
method: longtail
data: {{train: {memory}, memory: {memory}, train_in_memory: true}}
longtail: {{k: 4, heads: 2}}
train: {{steps: 5, batch_size: 4, warmup_steps: 1, out_dir: {tmp_path / "run"}, progress: false}}
"""
    )
    return cfg


@pytest.fixture
def deadline():
    """deadline(seconds): a context manager that fails a test that blocks (on a FIFO, a device, a
    read that never ends) instead of letting it hang."""
    import contextlib
    import signal

    @contextlib.contextmanager
    def within(seconds: int):
        def fail(signum, frame):
            raise TimeoutError(f"still running after {seconds} s")

        old = signal.signal(signal.SIGALRM, fail)
        signal.alarm(seconds)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)

    return within
