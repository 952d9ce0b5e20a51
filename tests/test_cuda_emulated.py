"""The CUDA path of the fused op (planning, binding, launches, csrc/cuda's kernels) run on CPU
tensors through the emulation shim (RECO_EMULATE_CUDA, reco._C_emu), on H100 and A100 limits,
against a float64 reference: every search instance, the merge, and the op's whole contract.

Where the CUDA path cannot take a call it falls back silently to the CPU kernel, so every test
reads the launch log to prove which kernels ran. The emulation runs each CUDA thread as a fiber
(seconds per call): shapes are the smallest that reach each code path."""

from __future__ import annotations

import re

import pytest
import torch
from topk_check import assert_topk_match

import reco
import reco.ops
from reco import reference

_EMU = reco.ops._C_emu

pytestmark = [
    pytest.mark.emulated,
    pytest.mark.skipif(
        _EMU is None or reco.ops._C is None,
        reason="this build of reco has no CUDA emulation (reco._C_emu: GCC on Linux)",
    ),
]

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TK = {F32: "float", F16: "__half", BF16: "__nv_bfloat16"}  # the kernels' element types
MMA_OP = {F16: "Float16Mma<false>", BF16: "Float16Mma<true>", torch.int8: "S8"}


@pytest.fixture(params=["sm_90", "sm_80"])
def arch(request, monkeypatch):
    monkeypatch.setenv("RECO_EMULATE_CUDA", request.param)
    assert reco.ops.emulated_cuda() == request.param  # also sets the arch cuda_plan uses
    _EMU.take_launch_log()
    return request.param


def plan(B, N, d, k, terms):
    """(splits, pow2, queries, mma) of the current arch's plan; it must be ok."""
    ok, splits, pow2, queries, mma = _EMU.cuda_plan(B, N, d, k, terms, 0)
    assert ok, (B, N, d, k, terms)
    return splits, pow2, queries, mma


def launches() -> list[tuple[str, dict[str, str]]]:
    """The kernels launched since the last call: (name, template arguments)."""
    out = []
    for line in _EMU.take_launch_log().splitlines():
        if not line.strip():
            continue
        m = re.search(r"(\w+)\(.*\) \[with (.*)\]$", line)
        assert m, line
        params = {}
        for item in m.group(2).split("; "):
            lhs, rhs = item.split(" = ", 1)
            params[lhs.split()[-1]] = rhs
        out.append((m.group(1), params))
    return out


def expect_cuda_core(kernels, keys, values):
    assert [n for n, _ in kernels] == ["search_kernel", "merge_attend_kernel"], kernels
    assert kernels[0][1]["TK"] == TK[keys]
    assert kernels[1][1]["TK"] == TK[keys] and kernels[1][1]["TV"] == TK[values]


def expect_tensor_core(kernels, op, terms, keys, values, arch=None):
    assert [n for n, _ in kernels] == ["search_mma_kernel", "merge_attend_kernel"], kernels
    p = kernels[0][1]
    assert p["Op"] == MMA_OP[op] and p["kTerms"] == str(terms), p
    if arch is not None:  # 3 stages, 2 only where 3 exceed the GPU: 3 bfloat16 terms on an A100
        want = "2" if (op, terms, arch) == (BF16, 3, "sm_80") else "3"
        assert p["kStages"] == want, (arch, p)
    assert kernels[1][1]["TK"] == TK[keys] and kernels[1][1]["TV"] == TK[values]


def data(B, N, d, dv, keys_dtype, query_dtype=F32, values_dtype=None, H=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, d, generator=g).to(query_dtype)
    keys = torch.randn(N, d, generator=g).to(keys_dtype)
    values = torch.randn(N, dv, generator=g).to(values_dtype or keys_dtype)
    aq = None if H is None else torch.randn(B, H, dv, generator=g)
    return q, keys, values, aq


def d64(t):
    return None if t is None else t.double()


def check_outputs(got, B, H, k, dv):
    """The contract's dtypes and shapes."""
    assert got.output.dtype == F32 and got.output.shape == (B, H, dv)
    assert got.weights.dtype == F32 and got.weights.shape == (B, H, k)
    assert got.indices.dtype == torch.int64 and got.indices.shape == (B, k)
    assert got.scores.dtype == F32 and got.scores.shape == (B, k)


def check_attention(got, q, keys, values, aq=None, temperature=1.0, rows=slice(None)):
    """Scores, weights and output of the selected rows against float64 attention over them."""
    aq = None if aq is None else aq[rows]
    att = reference.attend(
        d64(q[rows]), d64(keys), d64(values), got.indices[rows], d64(aq), temperature
    )
    # the winners re-scored in float64, rounded once to float32
    torch.testing.assert_close(
        got.scores[rows].double(), att.scores, rtol=2**-23, atol=1e-12, equal_nan=True
    )
    kw = dict(rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(got.weights[rows].double(), att.weights, **kw)
    torch.testing.assert_close(got.output[rows].double(), att.output, **kw)


def compare(q, keys, values, k, aq=None, exclude=None, temperature=1.0, tol=None):
    """Runs the op (emulated CUDA) and checks it against the float64 reference: a tie-aware
    top-k match (float32 accumulation may swap near-ties), then the attention over the rows it
    selected. Returns (result, kernels launched)."""
    _EMU.take_launch_log()
    got = reco.fused_retrieve_attend(
        q, keys, values, k, attn_query=aq, exclude=exclude, temperature=temperature
    )
    kernels = launches()
    B, dv = q.shape[0], values.shape[1]
    check_outputs(got, B, 1 if aq is None else aq.shape[1], k, dv)
    want = reference.fused_retrieve_attend(
        d64(q), d64(keys), d64(values), k, attn_query=d64(aq), exclude=exclude,
        temperature=temperature,
    )  # fmt: skip
    tol = 1e-4 * q.shape[1] ** 0.5 if tol is None else tol
    assert_topk_match(q, keys, got.indices, got.scores.double(), want.indices, tol, exclude)
    check_attention(got, q, keys, values, aq, temperature)
    return got, kernels


# --- the CUDA-core search ----------------------------------------------------------------------


def _wide(t, extra):
    """t as a column slice of a wider tensor: rows at a stride that is no multiple of 16 B."""
    w = torch.randn(t.shape[0], t.shape[1] + extra).to(t.dtype)
    w[:, : t.shape[1]] = t
    return w[:, : t.shape[1]]


@pytest.mark.parametrize(
    "B, N, d, keys_dtype, layout",
    [
        (1, 300, 8, F32, "contiguous"),  # one query a block, 16-byte loads
        (3, 300, 13, F32, "contiguous"),  # 3 queries, odd d: element loads
        (8, 300, 16, F16, "contiguous"),  # 8 float32 queries vs float16: CUDA cores, 16-byte loads
        (9, 300, 8, F32, "contiguous"),  # two query blocks, the second of one query
        (2, 300, 45, BF16, "contiguous"),  # d not a multiple of 8 bfloat16: element loads, lanes
        # wrapping past 32
        (2, 300, 136, F32, "contiguous"),  # 16-byte loads in two passes, the second partial
        (1, 300, 264, F16, "contiguous"),
        (2, 300, 16, F16, "row stride 20"),  # rows 40 B apart: element loads
        (2, 300, 16, F32, "offset pointer"),  # rows 4 B off 16-byte alignment
    ],
)
def test_cuda_core_search(arch, B, N, d, keys_dtype, layout):
    q, keys, values, _ = data(B, N, d, 5, keys_dtype, seed=B + d)
    if layout == "row stride 20":
        keys = _wide(keys, 4)
    elif layout == "offset pointer":
        keys = torch.cat([torch.randn(N, 1), keys], 1)[:, 1:]
        assert keys.data_ptr() % 16 != 0
    splits, pow2, queries, _ = plan(B, N, d, 7, {F32: 0, F16: 2, BF16: 3}[keys_dtype])
    assert (splits, pow2, queries) == (1, 256, min(B, 8))
    _, kernels = compare(q, keys, values, 7)
    expect_cuda_core(kernels, keys_dtype, keys_dtype)


@pytest.mark.parametrize("k", [256, 257, 512, 1024])
def test_cuda_core_candidate_buffer_sizes(arch, k):
    """k at both ends of the 512 bucket and at 256 and 1024: the candidate buffer (a power of two
    >= max(256, k)) and its bitonic merges at each size. Seven queries: on an A100 the 1024 list
    leaves room for fewer than 7 queries a block, so the queries span two blocks there."""
    B, N, d = 7, k + 90, 8
    splits, pow2, queries, _ = plan(B, N, d, k, 0)
    assert pow2 == max(256, 1 << (k - 1).bit_length()) and splits == 1
    if k == 1024 and arch == "sm_80":
        assert queries < B
    q, keys, values, _ = data(B, N, d, 3, F32, seed=k)
    _, kernels = compare(q, keys, values, k)
    expect_cuda_core(kernels, F32, F32)


@pytest.mark.parametrize("keys_dtype", [F32, BF16])
def test_cuda_core_split_merge(arch, keys_dtype):
    """Rows split between blocks, their top lists merged by merge_attend_kernel; the best rows
    placed in the second split."""
    B, N, d, k = 2, 2100, 8, 12
    splits, _, _, mma = plan(B, N, d, k, 0 if keys_dtype == F32 else 3)
    assert splits >= 2 and not mma
    q, keys, values, _ = data(B, N, d, 4, keys_dtype, seed=5)
    keys[N - 40 : N - 30] = (q[0] * 3).to(keys_dtype)  # the top of query 0 lies at the end
    got, kernels = compare(q, keys, values, k)
    expect_cuda_core(kernels, keys_dtype, keys_dtype)
    assert set(range(N - 40, N - 30)) <= set(got.indices[0].tolist())


@pytest.mark.parametrize("k", [200, 1500])
def test_cuda_core_merge_of_long_split_lists(arch, k):
    """Two splits' lists are longer together than the merge's buffer, so it merges them in
    rounds; with k = 1500 each split holds fewer than k rows and pads its list with empty slots,
    which must never be selected."""
    N = 2100
    splits, pow2, _, _ = plan(1, N, 8, k, 0)
    assert splits >= 2 and splits * k > pow2 and (k < N // splits) == (k == 200)
    q, keys, values, _ = data(1, N, 8, 3, F32, seed=k + 1)
    got, kernels = compare(q, keys, values, k)
    expect_cuda_core(kernels, F32, F32)
    assert got.indices.min() >= 0


def _rising(N, d, dtype, seed):
    """Keys along one direction with norms rising with the row index, and queries along it: each
    row beats every earlier one, so each is staged and the staging area fills on every tile."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    keys = (torch.linspace(0.01, 4.0, N)[:, None] * direction).to(dtype)
    return direction.to(dtype)[None], keys, torch.randn(N, 3, generator=g).to(dtype)


def test_cuda_core_search_when_every_row_beats_the_last(arch):
    q, keys, values = _rising(1100, 32, F32, seed=1)
    got, kernels = compare(q.repeat(2, 1), keys, values, 300)
    expect_cuda_core(kernels, F32, F32)
    assert got.indices[:, :5].tolist() == [[1099, 1098, 1097, 1096, 1095]] * 2


# --- the tensor-core search --------------------------------------------------------------------


@pytest.mark.parametrize(
    "B, N, d, k, dtype",
    [
        (1, 300, 32, 9, F16),  # one query, rows of one tile and a partial one
        (3, 300, 32, 9, BF16),
        (3, 300, 40, 64, F16),  # d not a multiple of the 32-element chunk; k at its limit
        (2, 300, 96, 5, BF16),  # several chunks of d: the pipeline wraps around its stages
        (2, 300, 8, 1, F16),  # the smallest d, k = 1
        (65, 300, 16, 5, BF16),  # two query blocks, the second of one query; half a chunk of d
    ],
)
def test_tensor_core_search_one_term(arch, B, N, d, k, dtype):
    """A query of the keys' 16-bit dtype: exact products, float32 accumulation."""
    _, _, _, mma = plan(B, N, d, k, 1)
    assert mma
    q, keys, values, _ = data(B, N, d, 6, dtype, query_dtype=dtype, seed=B + d)
    _, kernels = compare(q, keys, values, k)
    expect_tensor_core(kernels, dtype, 1, dtype, dtype, arch)


def test_tensor_core_limits_fall_to_cuda_cores(arch):
    """k = 65 exceeds the tensor-core list; rows at a stride that is no multiple of 16 bytes
    cannot be copied by cp.async: both take the CUDA-core search, with the same results."""
    q, keys, values, _ = data(2, 300, 16, 4, F16, query_dtype=F16, seed=3)
    assert not plan(2, 300, 16, 65, 1)[3]
    _, kernels = compare(q, keys, values, 65)
    expect_cuda_core(kernels, F16, F16)
    assert plan(2, 300, 16, 9, 1)[3]
    _, kernels = compare(q, _wide(keys, 4), values, 9)
    expect_cuda_core(kernels, F16, F16)


@pytest.mark.parametrize("dtype, terms", [(F16, 2), (BF16, 3)])
def test_tensor_core_search_float32_query_in_terms(arch, dtype, terms):
    """Nine float32 queries (more than a CUDA-core block) against 16-bit keys are split into 2
    (float16) or 3 (bfloat16) terms; rows of very different magnitudes, scores to about float32
    precision. bfloat16's 3 terms need the 2-stage pipeline on an A100 (and the plan fits)."""
    B, N, d, k = 9, 300, 32, 8
    assert plan(B, N, d, k, terms)[3]
    q, keys, values, _ = data(B, N, d, 4, dtype, seed=terms)
    q = q * torch.logspace(-6, 6, B)[:, None]
    q[4] = 0.0  # every score 0: ties, rows 0..k-1
    _EMU.take_launch_log()
    got = reco.fused_retrieve_attend(q, keys, values, k)
    expect_tensor_core(launches(), dtype, terms, dtype, dtype, arch)
    check_outputs(got, B, 1, k, 4)
    want = reference.fused_retrieve_attend(d64(q), d64(keys), d64(values), k)
    scale = (q.double().abs() @ keys.double().abs().T).amax(1)
    for b in range(B):  # the tolerance of each row is relative to its magnitude
        assert_topk_match(
            q[b : b + 1], keys, got.indices[b : b + 1], got.scores[b : b + 1].double(),
            want.indices[b : b + 1], 1e-5 * float(scale[b]),
        )  # fmt: skip
    assert got.indices[4].tolist() == list(range(k))
    check_attention(got, q, keys, values)


def test_float32_query_in_terms_with_infinities_and_nan(arch):
    """A NaN element makes every score of its query NaN (rows 0..k-1 win, ties to the lower row);
    an infinite one makes the scores of the rows of positive key element +inf (the lowest k of
    them win); the other queries are unaffected."""
    B, N, d, k = 9, 100, 16, 8
    q, keys, values, aq = data(B, N, d, 4, F16, H=1, seed=81)
    q[2, 3] = float("nan")
    q[4, 1] = float("inf")
    _EMU.take_launch_log()
    got = reco.fused_retrieve_attend(q, keys, values, k, attn_query=aq)
    expect_tensor_core(launches(), F16, 2, F16, F16, arch)
    assert got.indices[2].tolist() == list(range(k)) and got.scores[2].isnan().all()
    positive = (keys[:, 1] > 0).nonzero().flatten()
    assert got.indices[4].tolist() == positive[:k].tolist()
    assert (got.scores[4] == float("inf")).all()
    finite = torch.tensor([b for b in range(B) if b not in (2, 4)])
    want = reference.search(d64(q[finite]), d64(keys), k)[0]
    assert_topk_match(q[finite], keys, got.indices[finite], got.scores[finite].double(), want, 1e-3)
    check_attention(got, q, keys, values, aq)


def test_tensor_core_search_when_every_row_beats_the_last(arch):
    q, keys, values = _rising(2100, 64, F16, seed=2)
    got, kernels = compare(q.repeat(3, 1), keys, values, 64)
    expect_tensor_core(kernels, F16, 1, F16, F16, arch)
    assert got.indices[:, :5].tolist() == [[2099, 2098, 2097, 2096, 2095]] * 3


def test_tensor_core_merge_of_many_splits(arch):
    """Five or more splits of 64 candidates: the merge takes them in rounds."""
    B, N, d, k = 1, 5200, 32, 64
    splits, pow2, _, mma = plan(B, N, d, k, 1)
    assert mma and splits * k > pow2
    q, keys, values, _ = data(B, N, d, 3, F16, query_dtype=F16, seed=9)
    _, kernels = compare(q, keys, values, k)
    expect_tensor_core(kernels, F16, 1, F16, F16, arch)


def test_tensor_core_split_merge(arch):
    """Rows split in two or more blocks of whole tiles (one partial), the lists merged."""
    B, N, d, k = 2, 2100, 32, 10
    splits, _, _, mma = plan(B, N, d, k, 1)
    assert mma and splits >= 2
    q, keys, values, _ = data(B, N, d, 4, F16, query_dtype=F16, seed=8)
    keys[N - 20 : N - 12] = q[1] * 2  # the top of query 1 lies in the last (partial) tile
    got, kernels = compare(q, keys, values, k)
    expect_tensor_core(kernels, F16, 1, F16, F16, arch)
    assert set(range(N - 20, N - 12)) <= set(got.indices[1].tolist())


# --- the int8 coarse search ---------------------------------------------------------------------


def _int8_case(B, N, d, keys_dtype, H, E, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=1)
    keys = torch.nn.functional.normalize(torch.randn(N, d, generator=g), dim=1).to(keys_dtype)
    values = torch.randn(N, 6, generator=g).to(keys_dtype)
    aq = None if H is None else torch.randn(B, H, 6, generator=g)
    exclude = None if E is None else torch.randint(-1, N, (B, E), generator=g)
    codes, scales = reco.quantize_keys(keys)
    return q, codes, scales, keys, values, aq, exclude


@pytest.mark.parametrize(
    "B, N, d, k, candidates, keys_dtype, H, E",
    [
        (3, 300, 32, 5, 40, F32, 2, 7),  # heads and exclude
        (1, 300, 48, 16, 64, BF16, None, None),  # d not a multiple of 32; candidates at the limit
        (2, 2100, 16, 4, 20, F16, None, 3),  # split rows
        (65, 300, 16, 3, 12, F32, None, 2),  # two query blocks, the second of one query
    ],
)
def test_int8_search(arch, B, N, d, k, candidates, keys_dtype, H, E):
    """The coarse int8 scores are the reference's bit for bit (float32(int dot) * scale) and the
    re-rank is float64 on both sides: the same rows exactly."""
    splits, _, _, mma = plan(B, N, d, candidates, 1)
    assert mma and (splits >= 2) == (N > 2000)
    q, codes, scales, keys, values, aq, exclude = _int8_case(B, N, d, keys_dtype, H, E, seed=N + d)
    _EMU.take_launch_log()
    got = reco.ops.fused_retrieve_attend_int8(
        q, codes, scales, keys, values, k, candidates=candidates, attn_query=aq, exclude=exclude
    )
    expect_tensor_core(launches(), torch.int8, 1, keys_dtype, keys_dtype)
    check_outputs(got, B, 1 if H is None else H, k, 6)
    want = reference.retrieve_attend_int8(
        q.double(), codes, scales, keys.double(), values.double(), k, candidates,
        attn_query=d64(aq), exclude=exclude,
    )  # fmt: skip
    assert torch.equal(got.indices, want.indices)
    check_attention(got, q, keys, values, aq)


def test_int8_falls_back_where_the_kernel_cannot_take_it(arch):
    """More than 64 candidates, or d not a multiple of 16: no kernel launched, the CPU kernel's
    (the reference's) results."""
    for d, candidates in ((32, 65), (24, 10)):
        q, codes, scales, keys, values, _, _ = _int8_case(2, 100, d, F32, None, None, seed=d)
        _EMU.take_launch_log()
        got = reco.ops.fused_retrieve_attend_int8(
            q, codes, scales, keys, values, 5, candidates=candidates
        )
        assert launches() == []
        want = reference.retrieve_attend_int8(
            q.double(), codes, scales, keys.double(), values.double(), 5, candidates
        )
        assert torch.equal(got.indices, want.indices)


# --- exclude, heads, temperature, mixed dtypes ---------------------------------------------------


@pytest.mark.parametrize(
    "B, path, keys_dtype, query_dtype, values_dtype, terms",
    [
        (3, "cuda core", F32, F32, BF16, 0),
        (65, "tensor core", F16, F16, F32, 1),  # two query blocks
        (9, "tensor core", BF16, F32, F16, 3),
    ],
)
def test_exclude_heads_temperature_and_values_dtype(
    arch, B, path, keys_dtype, query_dtype, values_dtype, terms
):
    """exclude with -1 padding and the true top rows in it, 3 heads of attn_query (bfloat16 in
    one case), temperature 0.37, values of another dtype than keys."""
    N, d, k, H = 300, 16, 6, 3
    q, keys, values, aq = data(B, N, d, 5, keys_dtype, query_dtype, values_dtype, H=H, seed=11)
    if terms == 3:
        aq = aq.bfloat16()
    g = torch.Generator().manual_seed(12)
    exclude = torch.randint(0, N, (B, 12), generator=g)
    exclude[:, 1::3] = -1  # padding
    top = reference.search(d64(q), d64(keys), 6)[0]
    exclude[:, :6] = top  # the true top 6 excluded
    exclude[1, 4] = -1  # but query 1's fifth best
    got, kernels = compare(q, keys, values, k, aq=aq, exclude=exclude, temperature=0.37)
    if path == "cuda core":
        expect_cuda_core(kernels, keys_dtype, values_dtype)
    else:
        expect_tensor_core(kernels, keys_dtype, terms, keys_dtype, values_dtype, arch)
    for b in range(B):
        assert not set(got.indices[b].tolist()) & (set(exclude[b].tolist()) - {-1})
    assert int(got.indices[1, 0]) == int(top[1, 4])


@pytest.mark.parametrize("path", ["cuda core", "tensor core"])
@pytest.mark.parametrize("half", [0, 1])
def test_exclude_a_whole_split(arch, path, half):
    """Every row of one split excluded: that split's list is all empty slots."""
    N, d, k = 2100, 16, 10
    dtype = F32 if path == "cuda core" else F16
    splits, _, _, mma = plan(1, N, d, k, 0 if dtype == F32 else 1)
    assert splits == 2 and mma == (path == "tensor core")
    q, keys, values, _ = data(1, N, d, 3, dtype, query_dtype=dtype, seed=91 + half)
    per = (N + 1) // 2
    exclude = torch.arange(half * per, min(N, (half + 1) * per))[None]
    got, kernels = compare(q, keys, values, k, exclude=exclude)
    assert kernels[0][0] == ("search_kernel" if path == "cuda core" else "search_mma_kernel")
    assert bool(((got.indices < half * per) | (got.indices >= (half + 1) * per)).all())


@pytest.mark.parametrize("path", ["cuda core", "tensor core", "int8"])
def test_empty_exclude(arch, path):
    """exclude [B, 0] (torch exports strides (1, 1) for it): the binding used to refuse it."""
    B, N, d, k = 2, 100, 16, 4
    dtype = F16 if path == "tensor core" else F32
    q, keys, values, _ = data(B, N, d, 3, dtype, query_dtype=dtype, seed=95)
    exclude = torch.empty(B, 0, dtype=torch.int64)
    if path == "int8":
        codes, scales = reco.quantize_keys(keys)
        got = reco.ops.fused_retrieve_attend_int8(
            q, codes, scales, keys, values, k, candidates=10, exclude=exclude
        )
        want = reference.retrieve_attend_int8(
            d64(q), codes, scales, d64(keys), d64(values), k, 10
        ).indices
    else:
        got = reco.fused_retrieve_attend(q, keys, values, k, exclude=exclude)
        want = reference.search(d64(q), d64(keys), k)[0]
    assert launches() != []
    assert torch.equal(got.indices, want)


# --- NaN, infinities, ties, views, B = 0 ---------------------------------------------------------


@pytest.mark.parametrize("dtype, N", [(F32, 300), (F16, 64)])  # CUDA cores (k=300), tensor cores
def test_nan_rows_rank_last_and_a_nan_query(arch, dtype, N):
    """k = N: every row selected, the -inf row after every finite one and the NaN row last; a NaN
    query scores NaN everywhere and takes rows 0..k-1 (ties to the lower row). The other queries
    are unaffected. attn_query keeps the weights finite."""
    B, d = 3, 16
    q, keys, values, aq = data(B, N, d, 4, dtype, query_dtype=dtype, H=2, seed=N)
    q[:, 0] = q[:, 0].abs() + 0.5
    keys[7, 0] = float("-inf")  # scores -inf for every query
    keys[5] = float("nan")
    q[1, 3] = float("nan")
    _EMU.take_launch_log()
    got = reco.fused_retrieve_attend(q, keys, values, N, attn_query=aq)
    kernels = launches()
    if dtype == F32:
        expect_cuda_core(kernels, F32, F32)
    else:
        expect_tensor_core(kernels, F16, 1, F16, F16, arch)
    check_outputs(got, B, 2, N, 4)
    assert got.indices[1].tolist() == list(range(N)) and got.scores[1].isnan().all()
    finite = torch.tensor([0, 2])
    assert (got.indices[finite, -2:] == torch.tensor([7, 5])).all()
    assert (got.scores[finite, -2] == float("-inf")).all() and got.scores[finite, -1].isnan().all()
    # the finite part: against the reference over the other rows
    rest = torch.tensor([r for r in range(N) if r not in (5, 7)])
    want = reference.search(d64(q[finite]), d64(keys[rest]), N - 2)[0]
    assert_topk_match(
        q[finite], keys[rest], torch.searchsorted(rest, got.indices[finite, :-2]),
        got.scores[finite, :-2].double(), want, 1e-4 * d**0.5,
    )  # fmt: skip
    check_attention(got, q, keys, values, aq)
    assert torch.isfinite(got.weights).all() and torch.isfinite(got.output).all()


@pytest.mark.parametrize("path", ["cuda core", "tensor core"])
def test_ties_go_to_the_lower_row(arch, path):
    """Small-integer keys and queries (exact arithmetic) with every row duplicated, the copies
    in the other split: the indices are exactly the reference's, and so are the scores."""
    N, d, k = 2100, 8, 40
    dtype = F32 if path == "cuda core" else F16
    B = 2
    splits, _, _, mma = plan(B, N, d, k, 0 if dtype == F32 else 1)
    assert splits >= 2 and mma == (path == "tensor core")
    g = torch.Generator().manual_seed(21)
    keys = torch.randint(-2, 3, (N, d), generator=g).to(dtype)
    keys[N // 2 :] = keys[: N // 2]
    values = torch.randn(N, 3, generator=g).to(dtype)
    q = torch.randint(-2, 3, (B, d), generator=g).to(dtype)
    _EMU.take_launch_log()
    got = reco.fused_retrieve_attend(q, keys, values, k)
    if path == "cuda core":
        expect_cuda_core(launches(), F32, F32)
    else:
        expect_tensor_core(launches(), F16, 1, F16, F16, arch)
    want = reference.fused_retrieve_attend(d64(q), d64(keys), d64(values), k)
    assert torch.equal(got.indices, want.indices)
    assert torch.equal(got.scores, want.scores.float())
    check_attention(got, q, keys, values)


@pytest.mark.parametrize("dtype", [F32, F16])
def test_batch_of_one_views(arch, dtype):
    """query = h[:, -1] of a [1, T, d] tensor (a size-1 dim with a large stride), keys and values
    column slices: the results of the same data made contiguous."""
    T, N, d = 5, 300, 32
    g = torch.Generator().manual_seed(31)
    h = torch.randn(1, T, d, generator=g).to(dtype)
    q = h[:, -1]
    assert q.shape == (1, d) and q.stride(0) == T * d
    keys = torch.randn(N, d, generator=g).to(dtype)
    values = _wide(torch.randn(N, 4, generator=g).to(dtype), 3)
    got, kernels = compare(q, keys, values, 6)
    if dtype == F32:
        expect_cuda_core(kernels, F32, F32)
    else:
        expect_tensor_core(kernels, F16, 1, F16, F16, arch)
    q1 = h[0, -1].clone().unsqueeze(0)
    assert q1.stride(0) == d
    again = reco.fused_retrieve_attend(q1, keys, values.contiguous(), 6)
    assert [n for n, _ in launches()] == [n for n, _ in kernels]
    for a, b in zip(got, again, strict=True):
        assert torch.equal(a, b)


def test_expanded_keys_tie_everywhere(arch):
    """Keys of row stride 0 (one row expanded N times): every score ties, rows 0..k-1 win."""
    q, keys, values, _ = data(2, 300, 16, 4, F16, query_dtype=F16, seed=41)
    keys = keys[:1].expand(300, 16)
    _EMU.take_launch_log()
    got = reco.fused_retrieve_attend(q, keys, values, 5)
    assert [n for n, _ in launches()][-1] == "merge_attend_kernel"
    assert got.indices.tolist() == [list(range(5))] * 2
    check_attention(got, q, keys, values)


@pytest.mark.parametrize("dtype, H", [(F32, None), (F16, 2)])
def test_empty_batch(arch, dtype, H):
    q, keys, values, aq = data(0, 50, 16, 3, dtype, query_dtype=dtype, H=H)
    _EMU.take_launch_log()
    got = reco.fused_retrieve_attend(q, keys, values, 4, attn_query=aq)
    assert launches() == []
    check_outputs(got, 0, 1 if H is None else H, 4, 3)


def test_calls_the_cuda_path_cannot_take_fall_back(arch):
    """float64 inputs, or k too large for the GPU's shared memory: the CPU kernel, nothing
    launched, the contract's results (float64 outputs for float64 inputs)."""
    q, keys, values, _ = data(2, 60, 8, 3, torch.float64, query_dtype=torch.float64, seed=51)
    _EMU.take_launch_log()
    got = reco.fused_retrieve_attend(q, keys, values, 5)
    assert launches() == [] and got.output.dtype == torch.float64
    assert torch.equal(got.indices, reference.search(q, keys, 5)[0])
    N = 5000
    assert not _EMU.cuda_plan(1, N, 8, N, 0, 0)[0]
    q, keys, values, _ = data(1, N, 8, 3, F32, seed=52)
    got = reco.fused_retrieve_attend(q, keys, values, N)
    assert launches() == []
    want = reference.search(d64(q), d64(keys), N)[0]
    assert_topk_match(q, keys, got.indices, got.scores.double(), want, 1e-5)


# --- data-dependent errors ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["cuda core", "tensor core", "int8"])
def test_data_dependent_errors_poison_only_that_query(arch, path):
    """An exclude row out of range (N, or below -1), or k above N minus a query's distinct
    excluded rows: that query gets index -1 and NaN scores, weights and output; the others (one
    that excludes the same row many times among them) are exact."""
    B, N, d, k, E = 5, 64, 16, 8, 58
    dtype = {"cuda core": F32, "tensor core": F16, "int8": F32}[path]
    q, keys, values, aq = data(B, N, d, 4, dtype, query_dtype=dtype, H=2, seed=61)
    exclude = torch.full((B, E), -1)
    exclude[0, :] = 3  # one row, 58 times: valid
    exclude[1, 5] = N  # out of range
    exclude[2, 0] = -2  # out of range
    exclude[3, : N - k + 1] = torch.arange(N - k + 1)  # leaves k - 1 rows
    exclude[4, : N - k] = torch.arange(N - k)  # leaves exactly k rows: valid
    _EMU.take_launch_log()
    if path == "int8":
        codes, scales = reco.quantize_keys(keys)
        got = reco.ops.fused_retrieve_attend_int8(
            q, codes, scales, keys, values, k, candidates=16, attn_query=aq, exclude=exclude
        )
        expect_tensor_core(launches(), torch.int8, 1, dtype, dtype)
    else:
        got = reco.fused_retrieve_attend(q, keys, values, k, attn_query=aq, exclude=exclude)
        if path == "cuda core":
            expect_cuda_core(launches(), F32, F32)
        else:
            expect_tensor_core(launches(), F16, 1, F16, F16, arch)
    check_outputs(got, B, 2, k, 4)
    bad = torch.tensor([1, 2, 3])
    assert (got.indices[bad] == -1).all()
    for t in (got.scores, got.weights, got.output):
        assert t[bad].isnan().all()
    good = torch.tensor([0, 4])
    if path == "int8":
        want = reference.retrieve_attend_int8(
            d64(q[good]), codes, scales, d64(keys), d64(values), k, 16, attn_query=d64(aq[good]),
            exclude=exclude[good],
        ).indices  # fmt: skip
    else:
        want = reference.search(d64(q[good]), d64(keys), k, exclude[good])[0]
    assert torch.equal(got.indices[good], want)
    assert set(got.indices[4].tolist()) == set(range(N - k, N))
    check_attention(got, q, keys, values, aq, rows=good)


# --- autograd -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, keys_dtype, query_dtype, H",
    [
        ("cuda core", F32, F32, None),
        ("cuda core", F32, F32, 2),
        ("tensor core", BF16, F32, 2),  # 3 terms
        ("tensor core", F16, F16, None),  # 16-bit gradients
        ("int8", F32, F32, 2),
    ],
)
def test_gradients_through_the_cuda_forward(arch, path, keys_dtype, query_dtype, H):
    """Gradients in query, keys, values and attn_query of a loss of all four outputs equal the
    reference's (float64) through the same rows."""
    B = 9 if keys_dtype == BF16 else 3
    N, d, dv, k, temp = 300, 16, 5, 6, 0.7
    values_dtype = F16 if query_dtype == F16 else F32
    q, keys, values, aq = data(B, N, d, dv, keys_dtype, query_dtype, values_dtype, H=H, seed=71)
    inputs = [t for t in (q, keys, values, aq) if t is not None]
    g = torch.Generator().manual_seed(72)
    w_out = torch.randn(B, H or 1, dv, generator=g)
    w_w = torch.randn(B, H or 1, k, generator=g)
    w_s = torch.randn(B, k, generator=g)

    def loss(r):
        return (r.output * w_out).sum() + (r.weights * w_w).sum() + (r.scores * w_s).sum()

    codes, scales = reco.quantize_keys(keys)

    def op(fn, q, keys, values, aq):
        if path == "int8":
            return fn(q, codes, scales, keys, values, k, candidates=20, attn_query=aq,
                      temperature=temp)  # fmt: skip
        return fn(q, keys, values, k, attn_query=aq, temperature=temp)

    leaves = [t.clone().requires_grad_() for t in inputs]
    _EMU.take_launch_log()
    fn = reco.ops.fused_retrieve_attend_int8 if path == "int8" else reco.fused_retrieve_attend
    got = op(fn, *leaves[:3], leaves[3] if H else None)
    kernels = launches()
    if path == "cuda core":
        expect_cuda_core(kernels, keys_dtype, F32)
    elif path == "int8":
        expect_tensor_core(kernels, torch.int8, 1, keys_dtype, F32)
    else:
        terms = 1 if query_dtype == keys_dtype else 3
        expect_tensor_core(kernels, keys_dtype, terms, keys_dtype, values_dtype, arch)
    grads = torch.autograd.grad(loss(got), leaves)
    ref_leaves = [t.double().requires_grad_() for t in inputs]
    fn = reference.retrieve_attend_int8 if path == "int8" else reference.fused_retrieve_attend
    want = op(fn, *ref_leaves[:3], ref_leaves[3] if H else None)
    assert torch.equal(got.indices, want.indices)
    want_grads = torch.autograd.grad(loss(want), ref_leaves)
    names = ("query", "keys", "values", "attn_query")[: len(inputs)]
    for name, a, b, t in zip(names, grads, want_grads, inputs, strict=True):
        assert a.dtype == t.dtype and a.shape == t.shape, name
        assert bool(b.abs().sum() > 0), name
        rtol = 1e-4 if t.dtype == F32 else 1e-2
        torch.testing.assert_close(
            a.double(), b, rtol=rtol, atol=rtol * float(b.abs().max()), msg=name
        )
