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


def test_build_info_says_what_was_compiled():
    info = reco.build_info()
    assert info["reco"] == reco.__version__ and info["compiled_core"] is True
    assert info["cpu_levels"] == list(reco.ops._C.cpu_levels())
    assert info["cpu_level"] in info["cpu_levels"]
    assert info["with_cuda"] == bool(reco.ops._C.with_cuda)
    if info["with_cuda"]:
        assert "80-real" in info["cuda_architectures"] and "90-real" in info["cuda_architectures"]
        assert info["cuda_compiler"]
    assert info["cuda_emulation"] == (reco.ops._C_emu is not None)
    assert info["cxx_compiler"].split()[0] in ("GNU", "Clang", "AppleClang")


def _source_tree_without_core(tmp_path):
    """A copy of reco's Python files with no compiled module, as a source checkout has, under
    another name (an editable install would otherwise find its compiled modules for reco.*)."""
    import shutil

    src = pathlib.Path(reco.__file__).parent
    ignore = shutil.ignore_patterns("*.so", "__pycache__")
    shutil.copytree(src, tmp_path / "reco_source", ignore=ignore)
    return tmp_path


def test_a_source_tree_without_the_compiled_core_refuses_to_import(tmp_path):
    """Not a silent fall back to the pure-torch reference, hundreds of times slower."""
    root = _source_tree_without_core(tmp_path)
    env = {k: v for k, v in __import__("os").environ.items() if k != "RECO_ALLOW_REFERENCE"}
    r = subprocess.run([sys.executable, "-c", "import reco_source"], cwd=root, env=env,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode != 0
    assert "ImportError: reco's compiled core (reco._C) is not here" in r.stderr
    assert "pip install ." in r.stderr and "RECO_ALLOW_REFERENCE=1" in r.stderr


def test_the_reference_runs_when_asked_for(tmp_path):
    root = _source_tree_without_core(tmp_path)
    code = (
        "import torch, warnings, reco_source as reco\n"
        "q, k = torch.randn(2, 8), torch.randn(20, 8)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    r = reco.search(q, k, 3)\n"
        "assert any('pure-torch reference' in str(x.message) for x in w)\n"
        "assert torch.equal(r.indices, (q @ k.T).topk(3).indices)\n"
        "print(reco.build_info()['compiled_core'])\n"
    )
    env = dict(__import__("os").environ, RECO_ALLOW_REFERENCE="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
