"""The kernels of reco's ops, one module per device: `cpu` (reco._C), `cuda` (reco._C on CUDA
tensors) and `emulated` (the CUDA path through reco._C_emu on CPU tensors, RECO_EMULATE_CUDA).

Each device module's KERNELS maps an op name ("fused_retrieve_attend", "fused_retrieve_attend_int8",
"search") to the function that computes it there, taking the op's arguments after reco.ops has
checked them. reco.ops registers them with torch (this room imports nothing above it).
"""

from __future__ import annotations

from . import cpu, cuda, emulated
from ._compiled import _C, _C_emu, build_info

KERNELS = {"cpu": cpu.KERNELS, "cuda": cuda.KERNELS}

__all__ = ["KERNELS", "_C", "_C_emu", "build_info", "cpu", "cuda", "emulated"]
