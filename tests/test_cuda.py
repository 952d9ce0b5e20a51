"""The CUDA kernel: its build (checked on any machine with a CUDA compiler) and its results
against the reference (on a CUDA device, with RECO_CUDA_KERNEL=1; skipped elsewhere)."""

from __future__ import annotations

import importlib.util
import itertools
import math
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from topk_check import assert_topk_match

import reco
import reco.ops
from reco import reference

_C = reco.ops._C
WITH_CUDA = _C is not None and bool(getattr(_C, "with_cuda", False))


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    spec = importlib.util.find_spec("triton")  # torch's CUDA builds bring one along
    if spec is not None and spec.origin is not None:
        cand = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if cand.is_file():
            return str(cand)
    return None


@pytest.mark.skipif(not WITH_CUDA, reason="reco._C was built without CUDA (no CUDA compiler)")
def test_compiled_core_holds_sm80_and_sm90_code_and_ptx():
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump here")
    elves = subprocess.run([tool, "--list-elf", _C.__file__], capture_output=True, text=True)
    ptx = subprocess.run([tool, "--list-ptx", _C.__file__], capture_output=True, text=True)
    assert elves.returncode == 0, elves.stderr
    assert "sm_80" in elves.stdout and "sm_90" in elves.stdout, elves.stdout
    assert "sm_90" in ptx.stdout, ptx.stdout


@pytest.mark.skipif(not WITH_CUDA, reason="reco._C was built without CUDA (no CUDA compiler)")
def test_no_kernel_uses_local_memory():
    """ptxas's resource report of every kernel in the build (sm_80 and sm_90): no stack, no local
    memory (register spills), and the tensor-core searches present."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump here")
    usage = subprocess.run([tool, "--dump-resource-usage", _C.__file__], capture_output=True)
    assert usage.returncode == 0, usage.stderr
    lines = usage.stdout.decode().splitlines()
    kernels = [
        (name.split()[1], res)
        for name, res in itertools.pairwise(lines)
        if name.strip().startswith("Function") and "REG:" in res
    ]
    names = " ".join(n for n, _ in kernels)
    assert "search_mma_kernel" in names and "merge_attend_kernel" in names, names
    for name, res in kernels:
        fields = dict(f.split(":", 1) for f in res.split())
        assert fields["STACK"] == "0" and fields["LOCAL"] == "0", f"{name}: {res.strip()}"


def test_tensor_core_tile_layout_against_an_emulated_mma(tmp_path):
    """ldmatrix.x4 and mma.m16n8k16 emulated on the host from the PTX ISA's fragment rules, fed
    through the kernel's offset functions (csrc/cuda/mma_layout.h), must reproduce the product of
    the shared-memory tiles; ldmatrix rows must be aligned and free of bank conflicts."""
    cxx = shutil.which((sysconfig.get_config_var("CXX") or "c++").split()[0]) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler here")
    root = Path(__file__).resolve().parents[1]
    exe = tmp_path / "mma_layout_check"
    build = subprocess.run(
        [cxx, "-std=c++17", "-O1", f"-I{root / 'csrc'}", f"-I{root / 'csrc' / 'include'}",
         "-o", str(exe),
         str(root / "tests" / "native" / "mma_layout_check.cpp")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("ok"), run.stdout


@pytest.mark.parametrize("dtype, count", [(torch.float16, 2), (torch.bfloat16, 3)])
def test_query_terms_sum_to_the_query_to_float32_precision(dtype, count):
    """The terms the tensor-core search multiplies by 16-bit keys: their sum is the query scaled
    per row by a power of two (1 for bfloat16), and scores from them are the exact scores in that
    scale to about float32 precision, over rows of very different magnitudes."""
    g = torch.Generator().manual_seed(count)
    B, d, N = 12, 96, 50
    q = torch.randn(B, d, generator=g) * torch.logspace(-20, 20, B)[:, None]
    q[3, :5] = 0.0  # zeros among the elements
    q[4] = 0.0  # an all-zero row
    keys = torch.randn(N, d, generator=g).to(dtype)
    terms = reco.ops.query_terms(q, dtype)
    assert terms.shape == (count, B, d) and terms.dtype == dtype
    total = terms.double().sum(0)
    exact = q.double() @ keys.double().T
    scaled = total @ keys.double().T
    bound = 2.0 ** (-22 if dtype == torch.float16 else -24)
    for b in range(B):
        if b == 4:
            assert (total[b] == 0).all()
            continue
        j = int(exact[b].abs().argmax())
        ratio = float(scaled[b, j] / exact[b, j])
        assert ratio > 0 and abs(ratio - 2.0 ** round(math.log2(ratio))) < 1e-6 * ratio
        scale = 2.0 ** round(math.log2(ratio))
        if dtype == torch.bfloat16:
            assert scale == 1.0
        else:  # the largest scaled element lies in [2^14, 2^15)
            assert 2.0**14 <= float(q[b].abs().max()) * scale < 2.0**15
        err = (scaled[b] - scale * exact[b]).abs()
        budget = bound * scale * (q[b].double().abs() @ keys.double().abs().T)
        if dtype == torch.float16:  # relative to the row's largest element
            budget = bound * scale * float(q[b].abs().max()) * keys.double().abs().sum(1)
        assert bool((err <= budget).all()), float((err / budget).max())


def test_query_terms_keep_infinities_and_nans():
    q = torch.randn(3, 16)
    q[0, 2] = float("inf")
    q[1, 5] = float("nan")
    for dtype in (torch.float16, torch.bfloat16):
        total = reco.ops.query_terms(q, dtype).float().sum(0)
        assert total[0, 2] == float("inf") and torch.isfinite(total[0, [0, 1, 3]]).all()
        assert total[1, 5].isnan() and torch.isfinite(total[2]).all()


needs_gpu = pytest.mark.skipif(
    not (WITH_CUDA and torch.cuda.is_available()),
    reason="needs a CUDA device and reco._C built with CUDA",
)


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setenv("RECO_CUDA_KERNEL", "1")
    assert reco.ops.cuda_kernel_enabled()


def _data(B, N, d, dv, dtype, seed, H=None, query_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, d, generator=g).to(query_dtype)
    keys = torch.randn(N, d, generator=g).to(dtype)
    values = torch.randn(N, dv, generator=g).to(dtype)
    aq = None if H is None else torch.randn(B, H, dv, generator=g)
    return q, keys, values, aq


def _compare(q, keys, values, k, aq=None, exclude=None, temperature=1.0):
    dev = torch.device("cuda")
    got = reco.fused_retrieve_attend(
        q.to(dev),
        keys.to(dev),
        values.to(dev),
        k,
        attn_query=None if aq is None else aq.to(dev),
        exclude=None if exclude is None else exclude.to(dev),
        temperature=temperature,
    )
    want = reference.fused_retrieve_attend(
        q.double(),
        keys.double(),
        values.double(),
        k,
        attn_query=None if aq is None else aq.double(),
        exclude=exclude,
        temperature=temperature,
    )
    # Scores are accumulated in float32 in the search (exact products of the inputs, as given):
    # near-ties may swap (tie-aware check).
    tol = 1e-4 * q.shape[1] ** 0.5
    assert_topk_match(
        q, keys, got.indices.cpu(), got.scores.cpu().double(), want.indices, tol, exclude
    )
    same = (got.indices.cpu() == want.indices).all(1)  # rows with the same selection
    torch.testing.assert_close(
        got.output.cpu()[same].double(), want.output[same], rtol=1e-3, atol=1e-4
    )
    torch.testing.assert_close(
        got.weights.cpu()[same].double(), want.weights[same], rtol=1e-3, atol=1e-5
    )
    return got


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "B, N, d, dv, k",
    [
        (1, 1000, 64, 32, 10),
        (5, 4099, 77, 13, 16),
        (37, 20000, 512, 512, 32),
        (300, 3000, 33, 8, 1),
    ],
)
def test_matches_reference(kernel, dtype, B, N, d, dv, k):
    q, keys, values, _ = _data(B, N, d, dv, dtype, seed=B + N)
    _compare(q, keys, values, k)


@needs_gpu
def test_heads_exclude_and_temperature(kernel):
    q, keys, values, aq = _data(9, 5000, 40, 24, torch.float16, seed=3, H=4)
    g = torch.Generator().manual_seed(4)
    exclude = torch.randint(0, 5000, (9, 20), generator=g)
    exclude[:, ::3] = -1
    exclude[0, :10] = reference.search(q[:1], keys.float(), 10)[0][0]  # the true top 10
    got = _compare(q, keys, values, 12, aq=aq, exclude=exclude, temperature=0.3)
    for b in range(9):
        assert not set(got.indices[b].tolist()) & set(exclude[b].tolist())


@needs_gpu
@pytest.mark.parametrize("k", [257, 1024])
def test_large_k(kernel, k):
    q, keys, values, _ = _data(3, 30000, 48, 16, torch.float32, seed=k)
    _compare(q, keys, values, k)


@needs_gpu
def test_ties_go_to_the_lower_row(kernel):
    keys = torch.randint(-2, 3, (3000, 16)).float()
    keys[1000:2000] = keys[:1000]  # exact duplicates: equal scores
    values = torch.randn(3000, 8)
    q = torch.randint(-2, 3, (6, 16)).float()
    got = reco.fused_retrieve_attend(q.cuda(), keys.cuda(), values.cuda(), 50)
    want = reference.fused_retrieve_attend(q, keys, values, 50)
    assert torch.equal(got.indices.cpu(), want.indices)  # small integers: exact arithmetic


@needs_gpu
@pytest.mark.parametrize(
    "N, dtype", [(2000, torch.float32), (64, torch.float16)]
)  # CUDA-core search; tensor-core search (k = N <= 64)
def test_nan_rows_rank_last(kernel, N, dtype):
    q, keys, values, _ = _data(4, N, 16, 8, dtype, seed=9, query_dtype=dtype)
    keys[5] = float("nan")
    got = reco.fused_retrieve_attend(q.cuda(), keys.cuda(), values.cuda(), N)
    assert int(got.indices[0, -1]) == 5  # every row selected: the NaN one last
    nan_q = reco.fused_retrieve_attend(
        torch.full((1, 16), float("nan"), dtype=dtype).cuda(), keys.cuda(), values.cuda(), 7
    )
    assert nan_q.indices.cpu().tolist() == [list(range(7))]


@needs_gpu
def test_runs_on_the_current_stream_and_in_a_cuda_graph(kernel):
    q, keys, values, _ = _data(16, 10000, 64, 32, torch.float16, seed=5)
    q, keys, values = q.cuda(), keys.cuda(), values.cuda()
    eager = reco.fused_retrieve_attend(q, keys, values, 8)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        side = reco.fused_retrieve_attend(q, keys, values, 8)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(side.indices, eager.indices)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = reco.fused_retrieve_attend(q, keys, values, 8)
    q.copy_(torch.flip(q, [0]))
    graph.replay()
    torch.cuda.synchronize()
    again = reco.fused_retrieve_attend(q, keys, values, 8)
    assert torch.equal(captured.indices, again.indices)
    torch.testing.assert_close(captured.output, again.output)


@needs_gpu
def test_data_dependent_errors_poison_only_that_query(kernel):
    """Raising would need a host synchronisation: an exclude row out of range, or k above N minus
    a query's excluded rows, gives that query index -1 and NaN results; the others are exact."""
    q, keys, values, _ = _data(3, 40, 8, 4, torch.float32, seed=1)
    exclude = torch.full((3, 35), -1)
    exclude[1, 0] = 40  # out of range
    exclude[2] = torch.arange(35)  # leaves 5 rows for k = 8
    got = reco.fused_retrieve_attend(
        q.cuda(), keys.cuda(), values.cuda(), 8, exclude=exclude.cuda()
    )
    assert (got.indices[1:] == -1).all() and got.output[1:].isnan().all()
    assert got.weights[1:].isnan().all() and got.scores[1:].isnan().all()
    want = reference.fused_retrieve_attend(q[:1], keys, values, 8)
    assert torch.equal(got.indices[0].cpu(), want.indices[0])


def _plan(B, N, d, k, terms):
    plan = _C.cuda_plan(B, N, d, k, terms, 0)
    assert plan[0]  # ok
    return plan[4]  # the tensor-core search applies


half_dtypes = pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])


@needs_gpu
@half_dtypes
@pytest.mark.parametrize(
    "B, N, d, dv, k",
    [
        (1, 1000, 64, 32, 10),  # one query, a few tiles
        (3, 300, 8, 8, 5),  # fewer rows than one tile, d = 8
        (70, 5003, 512, 64, 16),  # two query blocks, the second nearly empty
        (130, 20000, 200, 16, 64),  # d not a multiple of the 32-element chunk; k at its limit
        (64, 100000, 768, 32, 32),
    ],
)
def test_tensor_core_search_matches_reference(kernel, dtype, B, N, d, dv, k):
    """A query of the keys' 16-bit dtype takes the tensor-core search: products of 16-bit inputs
    are exact in fp32, so the result is the reference's on the same inputs up to float32
    accumulation order."""
    assert _plan(B, N, d, k, 1)
    q, keys, values, _ = _data(B, N, d, dv, dtype, seed=B + N + d, query_dtype=dtype)
    _compare(q, keys, values, k)


@needs_gpu
def test_tensor_core_plan_falls_back_where_it_cannot_apply():
    assert _plan(8, 10000, 512, 16, 1)  # a query of the keys' dtype
    assert _plan(9, 10000, 512, 16, 2) and _plan(9, 10000, 512, 16, 3)  # split float32 queries
    assert not _plan(8, 10000, 512, 16, 2)  # few float32 queries: memory-bound, CUDA cores
    assert not _plan(8, 10000, 512, 16, 0)  # float32 keys
    assert not _plan(8, 10000, 100, 16, 1)  # d not a multiple of 8
    assert not _plan(8, 10000, 512, 65, 1)  # k above the tensor-core list


@needs_gpu
@half_dtypes
def test_float32_query_is_split_into_terms_for_tensor_cores(kernel, dtype):
    """More than 8 float32 queries against 16-bit keys take the tensor-core search through
    query_terms: scores to about float32 precision, rows of very different magnitudes."""
    B, N, d, k = 100, 30000, 256, 16
    assert _plan(B, N, d, k, 2 if dtype == torch.float16 else 3)
    q, keys, values, _ = _data(B, N, d, 32, dtype, seed=11)
    q = q * torch.logspace(-3, 3, B)[:, None]
    got = reco.fused_retrieve_attend(q.cuda(), keys.cuda(), values.cuda(), k)
    want = reference.fused_retrieve_attend(q.double(), keys.double(), values.double(), k)
    tol = 1e-5 * (q.abs().double() @ keys.abs().double().T).amax(1, keepdim=True)
    exact = (q.double() @ keys.double().T).gather(1, got.indices.cpu())
    assert bool(((exact - want.scores).abs() <= tol).all())  # the same scores: ties aside
    assert bool(((got.scores.cpu().double() - exact).abs() <= tol).all())


@needs_gpu
@half_dtypes
def test_tensor_core_search_with_heads_exclude_and_temperature(kernel, dtype):
    q, keys, values, aq = _data(75, 9000, 96, 24, dtype, seed=3, H=3, query_dtype=dtype)
    g = torch.Generator().manual_seed(4)
    exclude = torch.randint(0, 9000, (75, 30), generator=g)
    exclude[:, ::4] = -1
    true_top = reference.search(q.float(), keys.float(), 20)[0]
    exclude[:, :20] = true_top  # the true top 20 are all excluded
    got = _compare(q, keys, values, 24, aq=aq, exclude=exclude, temperature=0.5)
    for b in range(75):
        assert not set(got.indices[b].tolist()) & set(exclude[b].tolist())


@needs_gpu
def test_tensor_core_search_when_every_row_beats_the_last(kernel):
    """Scores rising with the row index: every row enters the running top list, so the staging
    area fills on every step and is merged again and again."""
    d, N = 64, 40000
    direction = torch.nn.functional.normalize(torch.randn(d), dim=0)
    keys = (torch.linspace(0.01, 4.0, N)[:, None] * direction).half()
    q = direction.half()[None].repeat(3, 1)
    values = torch.randn(N, 8).half()
    _compare(q, keys, values, 40)


@needs_gpu
def test_tensor_core_ties_go_to_the_lower_row(kernel):
    keys = torch.randint(-2, 3, (7000, 16)).half()
    keys[3000:6000] = keys[:3000]  # exact duplicates, across tiles and splits
    values = torch.randn(7000, 8).half()
    q = torch.randint(-2, 3, (66, 16)).half()
    got = reco.fused_retrieve_attend(q.cuda(), keys.cuda(), values.cuda(), 50)
    want = reference.fused_retrieve_attend(q.double(), keys.double(), values.double(), 50)
    assert torch.equal(got.indices.cpu(), want.indices)  # small integers: exact arithmetic


@needs_gpu
def test_unaligned_keys_take_the_cuda_core_search(kernel):
    """Rows whose stride is not a multiple of 16 bytes cannot be copied with 16-byte cp.async:
    the same call runs the CUDA-core search, with the same results."""
    q, keys, values, _ = _data(10, 3000, 16, 8, torch.float16, seed=2, query_dtype=torch.float16)
    padded = torch.zeros(3000, 20, dtype=torch.float16)
    padded[:, :16] = keys
    _compare(q, padded[:, :16], values, 9)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "B, N, d, k, candidates",
    [(1, 5000, 64, 10, 10), (70, 20000, 512, 16, 64), (9, 3001, 48, 5, 40)],
)
def test_int8_search_matches_reference(kernel, dtype, B, N, d, k, candidates):
    """The int8 coarse search on tensor cores computes the reference's coarse scores bit for bit
    (float32(int dot) * scale), so it picks the same candidates; the exact re-rank (float64 on the
    GPU, float32 in the reference) may swap only rows whose exact scores tie within rounding."""
    g = torch.Generator().manual_seed(B + N)
    q = torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=1)
    keys = torch.nn.functional.normalize(torch.randn(N, d, generator=g), dim=1).to(dtype)
    values = torch.randn(N, 16, generator=g).to(dtype)
    aq = torch.randn(B, 2, 16, generator=g)
    exclude = torch.randint(-1, N, (B, 7), generator=g)
    codes, scales = reco.quantize_keys(keys)
    args = dict(candidates=candidates, attn_query=aq, exclude=exclude)
    want = reference.retrieve_attend_int8(q, codes, scales, keys, values, k, **args)
    dev = {n: t.cuda() for n, t in dict(attn_query=aq, exclude=exclude).items()}
    got = reco.fused_retrieve_attend_int8(
        q.cuda(), codes.cuda(), scales.cuda(), keys.cuda(), values.cuda(), k,
        candidates=candidates, **dev,
    )  # fmt: skip
    exact = q.double() @ keys.double().T
    got_i = got.indices.cpu()
    torch.testing.assert_close(
        exact.gather(1, got_i), exact.gather(1, want.indices), rtol=0, atol=1e-6
    )
    same = (got_i == want.indices).all(1)
    assert bool(same.float().mean() > 0.9)
    torch.testing.assert_close(got.output.cpu()[same], want.output[same], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.weights.cpu()[same], want.weights[same], rtol=1e-4, atol=1e-6)


@needs_gpu
@pytest.mark.slow
def test_rows_past_2_31(kernel):
    """N > 2^31 rows (34 GB of float16 keys of d = 8): the best rows lie past 2^31, for the
    tensor-core search (a float16 query, int32 offsets within splits) and the CUDA-core search
    (one float32 query)."""
    N, d = 2**31 + 3000, 8
    free, _ = torch.cuda.mem_get_info()
    if free < 40e9:
        pytest.skip(f"needs 40 GB of free GPU memory, has {free / 1e9:.0f} GB")
    keys = torch.zeros(N, d, dtype=torch.float16, device="cuda")
    keys[N - 5] = 1.0
    keys[2**31 + 7] = 0.5
    keys[3] = 0.25
    values = torch.zeros(N, 1, dtype=torch.float16, device="cuda")
    values[N - 5] = 2.0
    for q in (torch.ones(3, d, dtype=torch.float16), torch.ones(1, d)):
        got = reco.fused_retrieve_attend(q.cuda(), keys, values, 3)
        assert got.indices[0].tolist() == [N - 5, 2**31 + 7, 3]
        torch.testing.assert_close(got.scores[0].cpu(), torch.tensor([8.0, 4.0, 2.0]))
    del keys, values
    torch.cuda.empty_cache()
