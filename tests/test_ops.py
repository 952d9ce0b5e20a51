"""reco.fused_retrieve_attend on CPU against the pure-torch reference, at every SIMD level."""

from __future__ import annotations

import math
import os
import zlib

import pytest
import torch
from conftest import LEVELS
from hypothesis import given, settings
from hypothesis import strategies as st
from topk_check import assert_topk_match

import reco
from reco import reference

pytestmark = pytest.mark.skipif(reco.ops._C is None, reason="reco._C is not built")

# (B, N, d, dv, k): awkward sizes on purpose: d = 1, 3, 511; k = N; N < 2k; B = 1; k = 2048;
# N large enough for the key range to split over threads.
SHAPES = [
    (1, 1, 1, 1, 1),
    (1, 5, 3, 2, 5),
    (3, 7, 1, 4, 3),
    (4, 50, 3, 7, 30),
    (5, 1000, 511, 17, 10),
    (17, 3001, 64, 33, 16),
    (1, 70001, 16, 8, 16),
    (66, 40000, 128, 64, 64),
    (2, 5000, 24, 5, 2048),
    (9, 300, 40, 12, 300),
    (6, 2000, 32, 8, 12),
]
# (query, keys, values) dtypes.
DTYPES = [
    (torch.float32, torch.float32, torch.float32),
    (torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.float32, torch.float16, torch.bfloat16),
]


def _inputs(shape, dtypes, seed, heads=None, n_exclude=0):
    B, N, d, dv, _k = shape
    g = torch.Generator().manual_seed(seed)
    qd, kd, vd = dtypes
    query = torch.randn(B, d, generator=g).to(qd)
    keys = torch.randn(N, d, generator=g).to(kd)
    values = torch.randn(N, dv, generator=g).to(vd)
    attn_query = None if heads is None else torch.randn(B, heads, dv, generator=g)
    exclude = None
    if n_exclude:
        exclude = torch.randint(-1, N, (B, n_exclude), generator=g)
    return query, keys, values, attn_query, exclude


def _score_tol(query, keys) -> float:
    # A bound on float32 rounding of a d-term dot product, with margin.
    d = query.shape[1]
    bound = float(query.double().abs().sum(1).max()) * float(keys.double().abs().max())
    return 4 * d * 2.0**-24 * bound + 1e-12


def _assert_within_reference_error(got, query, keys, values, indices, attn_query, temperature):
    """Kernel error vs float64 must be <= 2x the float32 reference's error (flash-attn's rule)."""
    ref32 = reference.attend(query, keys, values, indices, attn_query, temperature)
    ref64 = reference.attend(
        query.double(),
        keys.double(),
        values.double(),
        indices,
        None if attn_query is None else attn_query.double(),
        temperature,
    )
    for name in ("output", "weights"):
        g, r32, r64 = getattr(got, name), getattr(ref32, name), getattr(ref64, name)
        assert g.dtype == torch.float32 and g.shape == r32.shape, name
        err = float((g.double() - r64).abs().max())
        ref_err = float((r32.double() - r64).abs().max())
        assert err <= 2 * ref_err + 1e-6, f"{name}: error {err:.3g} vs reference {ref_err:.3g}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-N{}-d{}-dv{}-k{}".format(*s))
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda t: "-".join(str(x)[6:] for x in t))
def test_matches_reference(cpu_level, shape, dtypes):
    B, N, _d, dv, k = shape
    seed = zlib.crc32(repr((shape, dtypes)).encode())
    heads = [None, 1, 4][seed % 3]
    n_exclude = min(3, N - k)
    temperature = [1.0, 0.07, 3.0][seed % 3]
    query, keys, values, attn_query, exclude = _inputs(shape, dtypes, seed, heads, n_exclude)
    got = reco.fused_retrieve_attend(
        query, keys, values, k, attn_query=attn_query, temperature=temperature, exclude=exclude
    )
    want_indices, _ = reference.search(query.double(), keys.double(), k, exclude)
    assert_topk_match(
        query, keys, got.indices, got.scores, want_indices, _score_tol(query, keys), exclude
    )
    assert got.output.shape == (B, heads or 1, dv)
    assert got.weights.shape == (B, heads or 1, k)
    _assert_within_reference_error(got, query, keys, values, got.indices, attn_query, temperature)


@given(
    B=st.integers(1, 6),
    N=st.integers(1, 120),
    d=st.integers(1, 40),
    dv=st.integers(1, 9),
    k_frac=st.floats(0.0, 1.0),
    heads=st.sampled_from([None, 1, 3]),
    n_exclude=st.integers(0, 4),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=60, deadline=None)
@pytest.mark.parametrize("level", LEVELS)
def test_exact_on_small_integers(level, B, N, d, dv, k_frac, heads, n_exclude, dtype, seed):
    """Small integers make every sum exact, so the kernel must equal the reference bit for bit,
    ties included (many rows share a score)."""
    os.environ["RECO_CPU_LEVEL"] = level
    try:
        _check_exact_on_small_integers(B, N, d, dv, k_frac, heads, n_exclude, dtype, seed)
    finally:
        del os.environ["RECO_CPU_LEVEL"]


def _check_exact_on_small_integers(B, N, d, dv, k_frac, heads, n_exclude, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    query = torch.randint(-2, 3, (B, d), generator=g).float()
    keys = torch.randint(-2, 3, (N, d), generator=g).to(dtype)
    values = torch.randint(-3, 4, (N, dv), generator=g).to(dtype)
    exclude = torch.randint(-1, N, (B, n_exclude), generator=g) if n_exclude else None
    selectable = N - (max(len(set(r.tolist()) - {-1}) for r in exclude) if n_exclude else 0)
    if selectable < 1:
        return
    k = max(1, min(selectable, round(k_frac * selectable)))
    attn_query = (
        None if heads is None else torch.randint(-2, 3, (B, heads, dv), generator=g).float()
    )
    got = reco.fused_retrieve_attend(
        query, keys, values, k, attn_query=attn_query, temperature=2.0, exclude=exclude
    )
    want = reference.fused_retrieve_attend(
        query, keys, values, k, attn_query=attn_query, temperature=2.0, exclude=exclude
    )
    assert torch.equal(got.indices, want.indices)
    assert torch.equal(got.scores, want.scores)
    torch.testing.assert_close(got.weights, want.weights, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.output, want.output, atol=1e-5, rtol=1e-5)


def test_duplicate_rows_tie_to_lower_index(cpu_level):
    g = torch.Generator().manual_seed(3)
    distinct = torch.randn(5, 37, generator=g)
    keys = distinct[torch.randint(0, 5, (4003,), generator=g)]
    query = torch.randn(7, 37, generator=g)
    got = reco.fused_retrieve_attend(query, keys, keys, 100)
    # Duplicates score bitwise equal in the kernel; the stable sort of exact float64 scores is
    # the contract's order.
    exact = query.double() @ keys.double().T
    want = torch.sort(exact, dim=1, descending=True, stable=True)[1][:, :100]
    assert torch.equal(got.indices, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_results_do_not_depend_on_the_batch(cpu_level, dtype):
    """A query's result is bitwise the same alone or in batches of any size (which change the
    tile shapes and switch between streaming keys in place and copying them to scratch)."""
    g = torch.Generator().manual_seed(13)
    keys = torch.randn(30_000, 64, generator=g).to(dtype)
    values = torch.randn(30_000, 8, generator=g).to(dtype)
    batch = torch.randn(37, 64, generator=g)
    # Every other query exact in bfloat16: with bfloat16 keys those take the vdpbf16ps tiles
    # (avx512bf16 level) while their neighbours take float32 tiles.
    batch[::2] = batch[::2].bfloat16().float()
    full = reco.fused_retrieve_attend(batch, keys, values, 10)
    for B in (1, 2, 3, 5, 8, 9, 37):
        part = reco.fused_retrieve_attend(batch[-B:], keys, values, 10)
        for name in ("indices", "scores", "weights", "output"):
            assert torch.equal(getattr(part, name), getattr(full, name)[-B:]), (B, name)


def test_exclude_removes_rows_and_padding_is_ignored(cpu_level):
    g = torch.Generator().manual_seed(4)
    query = torch.randn(3, 8, generator=g)
    keys = torch.randn(500, 8, generator=g)
    best = reco.fused_retrieve_attend(query, keys, keys, 5).indices
    exclude = torch.full((3, 4), -1, dtype=torch.int64)
    exclude[:, 0] = best[:, 0]  # each query's own best match (a training item finding itself)
    exclude[1, 1] = best[1, 1]
    got = reco.fused_retrieve_attend(query, keys, keys, 5, exclude=exclude).indices
    torch.testing.assert_close(got[0], torch.cat([best[0, 1:], got[0, -1:]]))
    torch.testing.assert_close(got[1, :3], best[1, 2:])
    assert not bool((got == exclude[:, :1]).any())


def test_k_up_to_n_minus_excluded(cpu_level):
    g = torch.Generator().manual_seed(5)
    query, keys = torch.randn(2, 4, generator=g), torch.randn(10, 4, generator=g)
    exclude = torch.tensor([[1, 1, 3], [-1, -1, -1]])  # query 0 loses 2 distinct rows
    got = reco.fused_retrieve_attend(query, keys, keys, 8, exclude=exclude)
    assert set(got.indices[0].tolist()) == set(range(10)) - {1, 3}
    with pytest.raises(ValueError, match=r"k=9 exceeds the 8 selectable rows of query 0"):
        reco.fused_retrieve_attend(query, keys, keys, 9, exclude=exclude)


def test_weights_are_softmax_of_scores(cpu_level):
    g = torch.Generator().manual_seed(6)
    query, keys = torch.randn(4, 16, generator=g), torch.randn(300, 16, generator=g)
    values = torch.randn(300, 3, generator=g)
    got = reco.fused_retrieve_attend(query, keys, values, 7, temperature=0.5)
    w = torch.softmax(got.scores.double() / 0.5, -1)
    torch.testing.assert_close(got.weights[:, 0].double(), w, atol=1e-6, rtol=1e-5)
    out = torch.einsum("bk,bkd->bd", w, values.double()[got.indices])
    torch.testing.assert_close(got.output[:, 0].double(), out, atol=1e-5, rtol=1e-5)


def test_strided_and_expanded_inputs(cpu_level):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(400, 20, generator=g)
    keys = base[::2, :12]  # row stride 40, inner stride 1
    values = torch.randn(30, 200, generator=g).T  # inner stride != 1: copied by the op
    query = torch.randn(12, 3, generator=g).T
    got = reco.fused_retrieve_attend(query, keys, values, 9)
    want = reference.fused_retrieve_attend(query, keys, values, 9)
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.output, want.output)
    # A zero row stride (one row repeated N times): every score ties, rows 0..k-1 win.
    same = torch.randn(1, 5, generator=g).expand(1000, 5)
    got = reco.fused_retrieve_attend(torch.randn(2, 5, generator=g), same, same, 4)
    assert torch.equal(got.indices, torch.arange(4).expand(2, 4))


def test_nan_ranks_last_and_propagates(cpu_level):
    g = torch.Generator().manual_seed(8)
    query = torch.randn(3, 6, generator=g)
    keys = torch.randn(40, 6, generator=g)
    values = torch.randn(40, 2, generator=g)
    keys[[5, 17, 30]] = float("nan")
    values[9] = float("nan")
    query[2] = float("nan")
    # k = 38 forces one NaN row in for queries 0 and 1: the lowest such row, ranked last.
    got = reco.fused_retrieve_attend(query, keys, values, 38)
    want = reference.fused_retrieve_attend(query, keys, values, 38)
    assert torch.equal(got.indices, want.indices)
    assert got.indices[0, -1] == 5 and got.indices[1, -1] == 5
    assert not bool(torch.isin(got.indices[:2, :-1], torch.tensor([5, 17, 30])).any())
    # A NaN query scores NaN everywhere: rows in ascending order, NaN weights and output.
    assert torch.equal(got.indices[2], torch.arange(38))
    assert bool(got.weights[2].isnan().all()) and bool(got.output[2].isnan().all())
    # Any NaN score in the selection makes that query's weights NaN, as torch.softmax does.
    assert bool(got.weights[:2].isnan().all())
    # With k small enough, NaN keys are never chosen; a NaN value poisons only its users.
    got = reco.fused_retrieve_attend(query[:2], keys, values, 10)
    assert not bool(torch.isin(got.indices, torch.tensor([5, 17, 30])).any())
    uses_9 = (got.indices == 9).any(1)
    assert torch.equal(got.output[:, 0].isnan().any(1), uses_9)
    assert bool(got.weights.isfinite().all())


def test_numpy_arrays_through_dlpack():
    """The compiled core is framework-free: numpy arrays go in and out through DLPack."""
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(9)
    query = rng.standard_normal((3, 10), dtype=np.float32)
    keys = rng.standard_normal((200, 10)).astype(np.float16)
    values = rng.standard_normal((200, 4), dtype=np.float32)
    out = np.empty((3, 1, 4), np.float32)
    w = np.empty((3, 1, 5), np.float32)
    idx = np.empty((3, 5), np.int64)
    sc = np.empty((3, 5), np.float32)
    reco.ops._C.retrieve_attend(query, keys, values, None, None, None, 5, 1.0, out, w, idx, sc, 1)
    want = reference.fused_retrieve_attend(
        torch.from_numpy(query), torch.from_numpy(keys), torch.from_numpy(values), 5
    )
    np.testing.assert_array_equal(idx, want.indices.numpy())
    np.testing.assert_allclose(out, want.output.numpy(), rtol=1e-5, atol=1e-6)


def test_thread_count_does_not_change_results(cpu_level):
    g = torch.Generator().manual_seed(10)
    query, keys = torch.randn(5, 32, generator=g), torch.randn(100_000, 32, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = reco.fused_retrieve_attend(query, keys, keys, 20)
        torch.set_num_threads(max(2, before))
        many = reco.fused_retrieve_attend(query, keys, keys, 20)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one.indices, many.indices)
    assert torch.equal(one.scores, many.scores)
    assert torch.equal(one.output, many.output)


def test_empty_batch():
    keys = torch.randn(10, 4)
    got = reco.fused_retrieve_attend(torch.empty(0, 4), keys, keys, 3)
    assert got.output.shape == (0, 1, 4) and got.indices.shape == (0, 3)


def test_float64_is_exact():
    g = torch.Generator().manual_seed(11)
    query = torch.randn(4, 9, dtype=torch.float64, generator=g)
    keys = torch.randn(500, 9, dtype=torch.float64, generator=g)
    values = torch.randn(500, 3, dtype=torch.float64, generator=g)
    got = reco.fused_retrieve_attend(query, keys, values, 6)
    want = reference.fused_retrieve_attend(query, keys, values, 6)
    assert got.output.dtype == torch.float64
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.output, want.output, atol=1e-12, rtol=1e-12)


def test_unknown_simd_level_is_refused(monkeypatch):
    monkeypatch.setenv("RECO_CPU_LEVEL", "sse9")
    with pytest.raises(ValueError, match="RECO_CPU_LEVEL=sse9"):
        reco.fused_retrieve_attend(torch.randn(1, 2), torch.randn(3, 2), torch.randn(3, 2), 1)


@pytest.mark.slow
def test_more_than_2_pow_31_rows():
    """Row ids past 2^31 survive search, exclusion and the final merge (int64 throughout)."""
    n = 2**31 + 64
    try:
        keys = torch.full((n, 1), 0.5, dtype=torch.float16)
    except RuntimeError:
        pytest.skip("not enough memory for 2^31 rows")
    top, second = 2**31 + 7, n - 1
    keys[top], keys[second], keys[5] = 2.0, 1.5, 1.0
    query = torch.ones(1, 1)
    got = reco.fused_retrieve_attend(query, keys, keys, 5, exclude=torch.tensor([[0, 2**31 + 3]]))
    # Remaining rows all score 0.5: the ties go to the lowest rows not excluded.
    assert got.indices.tolist() == [[top, second, 5, 1, 2]]
    s = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.5])
    torch.testing.assert_close(got.scores[0], s)
    torch.testing.assert_close(got.output[0, 0], (torch.softmax(s, 0) * s).sum().reshape(1))


def test_matches_reference_scale():
    """One larger case at the benchmark's width, float32 and bfloat16 keys."""
    g = torch.Generator().manual_seed(12)
    query = torch.nn.functional.normalize(torch.randn(37, 512, generator=g), dim=1)
    keys = torch.nn.functional.normalize(torch.randn(60_000, 512, generator=g), dim=1)
    for kd in (torch.float32, torch.bfloat16):
        kk = keys.to(kd)
        got = reco.fused_retrieve_attend(query, kk, kk, 16, temperature=0.05)
        want, _ = reference.search(query.double(), kk.double(), 16)
        assert_topk_match(query, kk, got.indices, got.scores, want, _score_tol(query, kk))
        assert math.isclose(float(got.weights.sum()), 37.0, rel_tol=1e-5)


# ---- subnormals: honoured at every SIMD level, as float32 arithmetic does ------------------------

# Key elements are integers times 2^-133: |m| < 128 gives bfloat16 subnormals, 128 <= |m| < 256
# the smallest normal binade [2^-126, 2^-125). Query elements in [2^-9, 2^-7) with 8 significant
# bits are exact in bfloat16. Every product is then subnormal (below 2^-132) and a multiple of
# 2^-149, so exact in float32; while the sum of |products| stays below 2^-125 every partial sum is
# exact too, in any order: each level, and the reference, must give the very same scores.
_KEY_ULP, _QUERY_ULP = 2.0**-133, 2.0**-16


def _subnormal_keys(N: int, d: int, g: torch.Generator) -> torch.Tensor:
    """float64 [N, d]: about 60% bfloat16 subnormals, 25% smallest normals, 15% zeros, random
    signs."""
    u = torch.rand(N, d, generator=g, dtype=torch.float64)
    m = torch.where(
        u < 0.6,
        torch.randint(1, 128, (N, d), generator=g),
        torch.where(u < 0.85, torch.randint(128, 256, (N, d), generator=g), 0),
    )
    sign = torch.randint(0, 2, (N, d), generator=g) * 2 - 1
    return (m * sign).double() * _KEY_ULP


def _small_queries(B: int, d: int, g: torch.Generator, positive: bool = False) -> torch.Tensor:
    """float64 [B, d] in [2^-9, 2^-7), 8 significant bits (exact in bfloat16); signs random."""
    m = torch.randint(128, 256, (B, d), generator=g) * (
        1 + torch.randint(0, 2, (B, d), generator=g)
    )
    sign = 1 if positive else torch.randint(0, 2, (B, d), generator=g) * 2 - 1
    return (m * sign).double() * _QUERY_ULP


def _assert_exact_in_float32(query: torch.Tensor, keys: torch.Tensor) -> None:
    """The premise of the subnormal tests: every partial sum below 2^-125 (so exact)."""
    bound = query.double().abs() @ keys.double().abs().T
    assert float(bound.max()) < 2.0**-125


def _assert_same_as_reference(query, keys, k, exclude=None):
    got = reco.fused_retrieve_attend(query, keys, keys, k, exclude=exclude)
    want, want_scores = reference.search(query.double(), keys.double(), k, exclude)
    want32, _ = reference.search(query, keys, k, exclude)  # float32 scoring, as the oracle's own
    assert torch.equal(want32, want)
    assert torch.equal(got.indices, want)
    assert torch.equal(got.scores, want_scores.float())
    return got


# (B, N, d, k, excluded per query): the streaming (B <= 8, d a multiple of 32) and scratch paths,
# d = 1 and d not a multiple of any vector width, N split over threads.
SUBNORMAL_SHAPES = [
    (1, 50, 1, 5, 0),
    (3, 700, 7, 10, 4),
    (5, 3000, 33, 16, 0),
    (4, 40_000, 64, 32, 6),
    (13, 5000, 100, 20, 3),
    (20, 40_000, 127, 64, 0),
]


@pytest.mark.parametrize("shape", SUBNORMAL_SHAPES, ids=lambda s: "B{}-N{}-d{}-k{}-E{}".format(*s))
@pytest.mark.parametrize("key_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("query_dtype", [torch.bfloat16, torch.float32], ids=["q-bf16", "q-fp32"])
def test_subnormals_do_not_depend_on_the_level(cpu_level, shape, key_dtype, query_dtype):
    """Mostly subnormal keys, and queries that make every product subnormal: every SIMD level
    returns the reference's rows and scores exactly (avx512bf16's vdpbf16ps would read them as
    zeros and select rows 0..k-1)."""
    B, N, d, k, n_exclude = shape
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, key_dtype, query_dtype)).encode()))
    keys = _subnormal_keys(N, d, g).to(key_dtype)
    query = _small_queries(B, d, g).to(query_dtype)
    _assert_exact_in_float32(query, keys)
    exclude = torch.randint(-1, N, (B, n_exclude), generator=g) if n_exclude else None
    got = _assert_same_as_reference(query, keys, k, exclude)
    assert bool((got.scores != 0).all()) and len(set(got.scores.flatten().tolist())) > 1


def test_subnormal_and_normal_key_blocks(cpu_level):
    """Blocks of normal keys (fast bfloat16 path at avx512bf16) between blocks of subnormal ones
    (float32 path), for one pass of queries: queries of positive elements select subnormal rows
    (the normal rows score below zero for them), queries of negative elements normal rows; one
    query has a subnormal element (never scored with vdpbf16ps)."""
    g = torch.Generator().manual_seed(21)
    N, d = 40_000, 64
    keys = _subnormal_keys(N, d, g)
    normal = torch.zeros(N, dtype=torch.bool)
    for r0 in (0, 9000, 20_000, 33_000):  # each spans several blocks
        normal[r0 : r0 + 4000] = True
    # Normal rows: integers in [-3, 0] times 2^-100, so exact products and sums as well.
    keys[normal] = -torch.randint(0, 4, (int(normal.sum()), d), generator=g).double() * 2.0**-100
    keys = keys.bfloat16()
    for B in (3, 12):  # the streaming and the scratch paths
        query = _small_queries(B, d, g, positive=True)
        query[1::2] *= -1
        query[0, 5] = 3 * 2.0**-133  # a bfloat16 subnormal (its products round to 0)
        query = query.bfloat16()
        _assert_exact_in_float32(query, keys[~normal])
        got = _assert_same_as_reference(query, keys, 24)
        assert not bool(normal[got.indices[0::2]].any()) and bool(normal[got.indices[1::2]].all())


@pytest.mark.parametrize("threads", [1, 2])
def test_caller_flush_to_zero_mode_is_ignored(cpu_level, threads):
    """torch.set_flush_denormal(True) sets flush-to-zero on the calling thread only; the kernel
    honours subnormals whatever that mode (else results would depend on the thread split)."""
    g = torch.Generator().manual_seed(22)
    keys = _subnormal_keys(40_000, 32, g).bfloat16()
    query = _small_queries(5, 32, g).float()
    want = reco.fused_retrieve_attend(query, keys, keys, 16)
    before = torch.get_num_threads()
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode")
    try:
        torch.set_num_threads(threads)
        got = reco.fused_retrieve_attend(query, keys, keys, 16)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(before)
    for name in ("indices", "scores", "weights", "output"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert torch.equal(want.indices, reference.search(query.double(), keys.double(), 16)[0])


def test_int8_caller_flush_to_zero_mode_is_ignored(cpu_level):
    """The int8 coarse score float32(dot) * scale honours a subnormal scale (rows whose largest
    element is below 127 * 2^-126) whatever the caller's flush-to-zero mode."""
    g = torch.Generator().manual_seed(23)
    keys = torch.randn(3000, 48, generator=g) * 2.0**-124
    query_codes = reference.quantize_rows(torch.randn(4, 48, generator=g))[0]
    codes, scales = reco.quantize_keys(keys)
    assert bool((scales < 2.0**-126).all())

    def coarse() -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.empty(4, 32, dtype=torch.int64)
        scores = torch.empty(4, 32)
        reco.ops._C.coarse_int8(query_codes, codes, scales, None, None, 32, rows, scores, 1)
        return rows, scores

    want_rows, want_scores = coarse()
    # The reference's coarse scores, and no score flushed to zero.
    torch.testing.assert_close(
        want_scores, reference.coarse_scores(query_codes, codes, scales).gather(1, want_rows)
    )
    assert bool((want_scores != 0).all())
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode")
    try:
        got_rows, got_scores = coarse()
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(got_rows, want_rows) and torch.equal(got_scores, want_scores)


def test_subnormal_rows_do_not_make_results_depend_on_the_batch(cpu_level):
    """Rows re-scored in float32 at avx512bf16 (subnormal elements, or too small for the query)
    among ordinary ones: a query's result is bitwise the same alone or in any batch."""
    g = torch.Generator().manual_seed(24)
    keys = torch.randn(30_000, 64, generator=g)
    tiny = torch.rand(30_000, generator=g) < 0.02
    keys[tiny] *= 2.0**-128  # mostly bfloat16 subnormals
    keys = keys.bfloat16()
    values = torch.randn(30_000, 8, generator=g)
    batch = torch.randn(37, 64, generator=g).bfloat16()
    batch[::3, ::5] *= 2.0**-100  # exponents too small for vdpbf16ps against ordinary rows too
    full = reco.fused_retrieve_attend(batch, keys, values, 10)
    for B in (1, 2, 5, 8, 9, 37):
        part = reco.fused_retrieve_attend(batch[-B:], keys, values, 10)
        for name in ("indices", "scores", "weights", "output"):
            assert torch.equal(getattr(part, name), getattr(full, name)[-B:]), (B, name)
    want, _ = reference.search(batch.double(), keys.double(), 10)
    assert_topk_match(batch, keys, full.indices, full.scores, want, _score_tol(batch, keys))
