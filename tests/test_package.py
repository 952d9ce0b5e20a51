"""The installed package: where it comes from, what was compiled, the command line."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import reco

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_imports_the_installed_package_with_its_compiled_core():
    # A top-level reco/ in the checkout must not shadow the installed package (it has no _C).
    assert REPO / "reco" != pathlib.Path(reco.__file__).parent
    assert reco.ops._C is not None, "reco._C is missing: install the package with pip install ."


def test_cpu_levels_and_default():
    levels = reco.ops._C.cpu_levels()
    assert levels[0] == "generic"
    assert reco.ops._C.default_cpu_level() == levels[-1]


def test_op_is_registered():
    assert hasattr(torch_ops(), "fused_retrieve_attend")


def torch_ops():
    import torch

    return torch.ops.reco


def test_cli_info():
    out = subprocess.run(
        [sys.executable, "-m", "reco.cli", "info"],
        capture_output=True,
        text=True,
        check=True,
        cwd=pathlib.Path(reco.__file__).parent.parent,
    )
    info = json.loads(out.stdout)
    assert info["reco"] == reco.__version__
    assert info["compiled_core"] is True
    assert "generic" in info["cpu_levels"]
