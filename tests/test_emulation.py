"""The CUDA emulation shim (csrc/emulation): its native test program, compiled with the host C++
compiler the way the emulation build compiles csrc/cuda, one pytest case per native case."""

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.emulated

ROOT = Path(__file__).resolve().parents[1]
# The kernels' translation units are instrumented (-fsanitize=thread) so that every access reaches
# the shim's hooks; the shim itself is not, and no sanitizer runtime is linked.
KERNEL_FLAGS = [
    "-DRECO_EMULATION",
    "-fsanitize=thread",
    "--param=tsan-instrument-func-entry-exit=0",
    "-Wno-unknown-pragmas",
]
COMMON = [
    "-std=c++17",
    "-O1",
    "-g",
    "-Wall",
    "-Wextra",
    "-Werror",
    f"-I{ROOT / 'csrc' / 'emulation'}",
    f"-I{ROOT / 'csrc'}",
    f"-I{ROOT / 'csrc' / 'include'}",
]


def _cxx():
    cxx = shutil.which((sysconfig.get_config_var("CXX") or "c++").split()[0]) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler here")
    return cxx


def _compile(cxx, out, sources):
    objs = []
    for src, flags in sources:
        obj = out / (Path(src).stem + ".o")
        lang = ["-x", "c++"] if Path(src).suffix == ".cu" else []
        r = subprocess.run([cxx, *COMMON, *flags, *lang, "-c", str(src), "-o", str(obj)],
                           capture_output=True, text=True)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert "warning" not in r.stderr, r.stderr
        objs.append(str(obj))
    return objs


@pytest.fixture(scope="module")
def emulation_check(tmp_path_factory):
    cxx = _cxx()
    out = tmp_path_factory.mktemp("emulation")
    objs = _compile(cxx, out, [
        (ROOT / "csrc" / "emulation" / "emu.cpp", []),
        (ROOT / "tests" / "native" / "emulation_check.cpp", KERNEL_FLAGS),
    ])  # fmt: skip
    exe = out / "emulation_check"
    r = subprocess.run([cxx, *objs, "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return exe


def _cases():
    return [
        "shuffles", "votes", "block_reduction", "bitonic_sorts", "ldmatrix", "mma", "cp_async",
        "device_attributes", "launch_limits", "race", "write_after_read", "out_of_bounds",
        "uninitialised", "missing_cp_async_wait", "partial_shuffle", "deadlock", "half_warps",
    ]  # fmt: skip


def test_every_native_case_is_listed(emulation_check):
    r = subprocess.run([str(emulation_check), "--list"], capture_output=True, text=True)
    assert r.returncode == 0
    assert r.stdout.split() == _cases()


@pytest.mark.parametrize("case", _cases())
def test_shim(emulation_check, case):
    r = subprocess.run([str(emulation_check), case], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok"), r.stdout


def test_an_unknown_case_fails(emulation_check):
    r = subprocess.run([str(emulation_check), "no_such_case"], capture_output=True, text=True)
    assert r.returncode != 0 and "FAIL" in r.stdout


@pytest.fixture(scope="module")
def search_mma_check(tmp_path_factory):
    """csrc/cuda/search_mma.cu itself, compiled by the host compiler against the shim."""
    cxx = _cxx()
    out = tmp_path_factory.mktemp("search_mma")
    objs = _compile(cxx, out, [
        (ROOT / "csrc" / "emulation" / "emu.cpp", []),
        (ROOT / "csrc" / "cuda" / "search_mma.cu", KERNEL_FLAGS),
        (ROOT / "tests" / "native" / "search_mma_check.cpp", ["-DRECO_EMULATION"]),
    ])  # fmt: skip
    exe = out / "search_mma_check"
    r = subprocess.run([cxx, *objs, "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return exe


CONFIGS = ["f16", "f16x2", "bf16", "bf16x3", "s8"]


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("config", CONFIGS)
def test_tensor_core_search_kernel(search_mma_check, config, arch):
    """Every key type and query-term count of the tensor-core search, two query blocks (one
    partial), two splits of a full and a partial tile, a zero-filled chunk of d, exclude rows."""
    r = subprocess.run([str(search_mma_check), config, arch], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok"), r.stdout
