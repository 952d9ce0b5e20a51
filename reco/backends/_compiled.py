"""The compiled modules: reco._C (required, unless RECO_ALLOW_REFERENCE=1) and reco._C_emu (the
CUDA emulation, optional), and what the build holds."""

from __future__ import annotations

import os
import sys
from typing import Any

from .._version import __version__

try:
    from .. import _C
except ImportError as e:  # a source checkout without a build, or a broken install
    if os.environ.get("RECO_ALLOW_REFERENCE") != "1":
        raise ImportError(
            "reco's compiled core (reco._C) is not here: install reco with `pip install .` "
            "(from a source checkout, run Python from outside it, or the checkout's reco/ is "
            "imported instead of the installed one). RECO_ALLOW_REFERENCE=1 runs every op on "
            f"the pure-torch reference instead, hundreds of times slower. ({e})"
        ) from e
    _C = None
try:
    from .. import _C_emu
except ImportError:
    _C_emu = None


def build_info() -> dict[str, Any]:
    """What this build of reco holds: its version, the CPU SIMD levels compiled in (and usable on
    this CPU) and the one chosen, the CUDA architectures compiled, whether the CUDA emulation is
    there, and the compilers that built it."""
    info: dict[str, Any] = {"reco": __version__, "python": sys.version.split()[0]}
    if _C is None:
        info["compiled_core"] = False
        return info
    info.update(
        compiled_core=True,
        cpu_levels=list(_C.cpu_levels()),
        cpu_level=_C.default_cpu_level(),
        with_cuda=bool(_C.with_cuda),
        cuda_architectures=list(_C.cuda_architectures) if _C.with_cuda else [],
        cuda_emulation=_C_emu is not None,
        cxx_compiler=_C.cxx_compiler,
        cuda_compiler=_C.cuda_compiler if _C.with_cuda else None,
    )
    return info
