"""Every SIMD level of the CPU kernel (csrc/cpu) against the reference cases of
tests/native/cpu_levels_check.cpp: the levels of this machine built natively, and the arm64 build
(CMake, cross-compiled) whose generic and neon levels run the cases under qemu-aarch64, where
Debian's g++-aarch64-linux-gnu and qemu-user are installed (.ci/run installs them)."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import reco.ops

ROOT = Path(__file__).resolve().parents[1]
CPU = ROOT / "csrc" / "cpu"
CHECK = ROOT / "tests" / "native" / "cpu_levels_check.cpp"
COMMON = [
    "-std=c++17", "-O2", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno", "-Wall", "-Wextra",
    f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'csrc' / 'include'}",
]  # fmt: skip
# The x86-64 levels' translation units and flags, as CMakeLists.txt builds them.
AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
          "-mprefer-vector-width=512"]  # fmt: skip
X86_LEVELS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": AVX512,
    "avx512bf16": [*AVX512, "-mavx512bf16"],
}
DEFINE = {"avx2": "AVX2", "avx512": "AVX512", "avx512bf16": "AVX512BF16", "neon": "NEON"}
ARM64_SYSROOT = Path("/usr/aarch64-linux-gnu")  # Debian's, for qemu-aarch64 -L
EM_AARCH64 = 183  # ELF e_machine


def _run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _compile(cxx: str, units: list[tuple[Path, list[str]]], out: Path) -> list[str]:
    """Compiles (source, extra flags) pairs two at a time; returns the objects."""

    def one(unit: tuple[Path, list[str]]) -> str:
        src, flags = unit
        obj = out / (src.stem + ".o")
        r = _run([cxx, *flags, "-c", str(src), "-o", str(obj)])
        assert r.returncode == 0, r.stderr
        return str(obj)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(one, units))


def _expect_every_level_ok(cmd: list[str], levels: list[str]) -> None:
    r = _run([*cmd, "--levels"], 60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == levels
    names = _run([*cmd, "--list"], 60).stdout.split()
    assert len(names) > 100 and len(set(names)) == len(names)
    r = _run(cmd)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert r.stdout.split("\n")[:-1] == [f"ok {name} {len(names)}" for name in levels], r.stdout


@pytest.mark.skipif(reco.ops._C is None, reason="reco._C is not built")
def test_x86_levels_pass_the_reference_cases(tmp_path):
    """The levels reco._C runs on this machine, each TU built with CMakeLists.txt's flags."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"an x86-64 test; this machine is {platform.machine()}")
    cxx = shutil.which((sysconfig.get_config_var("CXX") or "c++").split()[0]) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler here")
    here = list(reco.ops._C.cpu_levels())
    flags = [*COMMON, *(f"-DRECO_HAVE_{DEFINE[name]}" for name in here if name != "generic")]
    units = [(CPU / "dispatch.cpp", flags), (CPU / "retrieve_attend_generic.cpp", flags),
             (CHECK, flags)]  # fmt: skip
    units += [(CPU / f"retrieve_attend_{name}.cpp", [*flags, *X86_LEVELS[name]])
              for name in here if name != "generic"]  # fmt: skip
    objs = _compile(cxx, units, tmp_path)
    exe = tmp_path / "cpu_levels_check"
    r = _run([cxx, "-fopenmp", *objs, "-o", str(exe)])
    assert r.returncode == 0, r.stderr
    _expect_every_level_ok([str(exe)], here)


@pytest.fixture(scope="module")
def arm64_build(tmp_path_factory):
    """reco._C configured and built by CMake for aarch64 Linux with Debian's cross compiler."""
    cxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if cxx is None or qemu is None or not ARM64_SYSROOT.is_dir():
        pytest.skip("needs aarch64-linux-gnu-g++, qemu-aarch64 and /usr/aarch64-linux-gnu "
                    "(Debian: apt-get install g++-aarch64-linux-gnu qemu-user)")  # fmt: skip
    cmake = shutil.which("cmake")
    try:
        import pybind11
    except ImportError:
        pybind11 = None
    if cmake is None or pybind11 is None:
        pytest.skip("needs cmake and pybind11 (the test extra) for the arm64 cross build")
    build = tmp_path_factory.mktemp("arm64")
    r = _run([
        cmake, "-S", str(ROOT), "-B", str(build), "-G", "Unix Makefiles",
        "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
        f"-DCMAKE_CXX_COMPILER={cxx}", "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON",
        "-DRECO_CUDA=OFF", "-DRECO_EMULATION=OFF", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-DPython_INCLUDE_DIR={sysconfig.get_paths()['include']}",
    ])  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = _run([cmake, "--build", str(build), "-j2"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return build, r.stdout + r.stderr, cxx, qemu


def test_arm64_cross_build_has_the_neon_level_and_no_x86_flags(arm64_build):
    build, log, _, _ = arm64_build
    assert "warning:" not in log, log
    commands = json.loads((build / "compile_commands.json").read_text())
    sources = {Path(c["file"]).name for c in commands}
    assert "retrieve_attend_neon.cpp" in sources
    assert not sources & {"retrieve_attend_avx2.cpp", "retrieve_attend_avx512.cpp"}
    for c in commands:
        assert " -m" not in c["command"], c["command"]  # no -mavx2, -mfma, -march=...
        if Path(c["file"]).name == "dispatch.cpp":
            assert "-DRECO_HAVE_NEON" in c["command"]
    (module,) = build.glob("_C*.so")
    header = module.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == EM_AARCH64


def test_arm64_levels_pass_the_reference_cases_under_qemu(arm64_build, tmp_path):
    """The cross build's own CPU objects (generic and neon levels), linked with the check and run
    under qemu-aarch64."""
    build, _, cxx, qemu = arm64_build
    objs = {p.name: p for p in build.rglob("*.o")}
    kernel = [objs[f"{name}.cpp.o"] for name in
              ("dispatch", "retrieve_attend_generic", "retrieve_attend_neon")]  # fmt: skip
    (check,) = _compile(cxx, [(CHECK, [*COMMON, "-Werror", "-DRECO_HAVE_NEON"])], tmp_path)
    exe = tmp_path / "cpu_levels_check"
    r = _run([cxx, "-fopenmp", check, *map(str, kernel), "-o", str(exe)])
    assert r.returncode == 0, r.stderr
    _expect_every_level_ok([qemu, "-L", str(ARM64_SYSROOT), str(exe)], ["generic", "neon"])


@pytest.mark.skipif(reco.ops._C is None, reason="reco._C is not built")
def test_machine_limit_loops_for_the_benchmarks():
    """reco._C's loops behind benchmarks/common.machine_limits, at every level here."""
    import torch

    C = reco.ops._C
    x = torch.arange(1 << 16, dtype=torch.float32)
    for level in C.cpu_levels():
        rate = C.bench_fma_rate(level, 1, 0.01)
        assert 1e8 < rate < 1e13, (level, rate)  # multiply-adds per second on one thread
        dot = C.bench_fma_rate(level, 1, 0.01, bf16_dot=True)
        assert (dot > 1e8) == (level == "avx512bf16"), (level, dot)
        assert 0 < C.bench_read_seconds(x, 2, level) < 1
    with pytest.raises(ValueError, match="array must be contiguous"):
        C.bench_read_seconds(x[::2], 1)
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        C.bench_fma_rate(None, 0)
    with pytest.raises(ValueError, match="is not available here"):
        C.bench_read_seconds(x, 1, "sse9")
