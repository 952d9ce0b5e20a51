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
    reco.ops._C.retrieve_attend(query, keys, values, None, None, 5, 1.0, out, w, idx, sc, 1)
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
