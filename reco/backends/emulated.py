"""The emulated CUDA device: with RECO_EMULATE_CUDA=sm_90 (H100) or sm_80 (A100), CPU tensors
take the CUDA path of `cuda` (planning, binding, launches, kernels, merge) through reco._C_emu,
csrc/cuda's own source compiled against the CPU emulation of csrc/emulation. Slow: for tests.
The cpu kernels hand their calls here first; None means the CUDA path cannot take the call."""

from __future__ import annotations

import os

from . import cuda
from ._compiled import _C_emu


def arch() -> str | None:
    """The GPU that RECO_EMULATE_CUDA names, "sm_90" or "sm_80", or None when it is unset."""
    name = os.environ.get("RECO_EMULATE_CUDA", "")
    if not name:
        return None
    if name not in ("sm_80", "sm_90"):
        raise ValueError(f"RECO_EMULATE_CUDA must be sm_80, sm_90 or unset, got {name!r}")
    if _C_emu is None:
        raise RuntimeError(
            "RECO_EMULATE_CUDA is set, but this build of reco has no CUDA emulation "
            "(reco._C_emu is built with GCC on Linux; RECO_EMULATION=OFF leaves it out)"
        )
    _C_emu.set_arch(name)
    return name


def fused_retrieve_attend(*args):
    return cuda.retrieve_attend(_C_emu, *args) if arch() is not None else None


def fused_retrieve_attend_int8(*args):
    return cuda.retrieve_attend_int8(_C_emu, *args) if arch() is not None else None


def search(*args):
    return cuda.search(_C_emu, *args) if arch() is not None else None
