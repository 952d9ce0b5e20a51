"""`allow` masks: every op (search, fused_retrieve_attend, fused_retrieve_attend_int8), every CPU
SIMD level, every dtype, the reference and the emulated CUDA path, against a float64 brute force
over the allowed rows (numpy lexsort: score descending, ties to the lower row)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reco
import reco.ops
from reco import reference

FRACTIONS = [1.0, 0.6, 0.1, 0.01, 0.001]


def oracle(query, keys, k, allow=None, exclude=None):
    """(indices, scores) of the k best allowed, not excluded rows per query, in float64."""
    s = (query.double() @ keys.double().T).numpy()
    N = keys.shape[0]
    ok = np.ones(N, bool) if allow is None else allow.numpy().copy()
    rows, scores = [], []
    for b in range(query.shape[0]):
        mine = ok.copy()
        if exclude is not None:
            e = exclude[b].numpy()
            mine[e[e >= 0]] = False
        cand = np.nonzero(mine)[0]
        order = cand[np.lexsort((cand, -s[b, cand]))][:k]
        rows.append(order)
        scores.append(s[b, order])
    return torch.from_numpy(np.stack(rows)), torch.from_numpy(np.stack(scores))


def mask(N, frac, k, seed, extra=0):
    """A random allow mask with about frac * N rows allowed, at least k + extra."""
    g = torch.Generator().manual_seed(seed)
    allow = torch.rand(N, generator=g) < frac
    need = k + extra - int(allow.sum())
    if need > 0:
        allow[torch.randperm(N, generator=g)[:need]] = True
    return allow


def integer_data(B, N, d, seed, dtype):
    """Small integers: every product and sum is exact in every dtype, so results must match the
    oracle exactly (ties included)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-3, 4, (B, d), generator=g).float()
    keys = torch.randint(-3, 4, (N, d), generator=g).to(dtype)
    if dtype == torch.float64:
        q = q.double()
    return q, keys


def excluded(B, N, allow, E, seed):
    """exclude [B, E]: half the entries allowed rows, a quarter disallowed ones, the rest -1."""
    g = torch.Generator().manual_seed(seed)
    ok, bad = allow.nonzero().flatten(), (~allow).nonzero().flatten()
    ex = torch.full((B, E), -1, dtype=torch.int64)
    for b in range(B):
        for j in range(E):
            u = torch.rand(1, generator=g).item()
            pool = ok if u < 0.5 or bad.numel() == 0 else bad if u < 0.75 else None
            if pool is not None:
                ex[b, j] = pool[torch.randint(pool.numel(), (1,), generator=g)]
    return ex


# --- the CPU kernel: every level, dtype, fraction and both paths (mask test, gathered rows) ------


@pytest.mark.parametrize("frac", FRACTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("B, d", [(3, 32), (13, 24)])  # rows read in place / blocks copied
def test_search_is_exact_at_every_level(cpu_level, frac, dtype, B, d):
    N, k = 40_000, 16  # above 2 x 16K rows: two threads split the rows when allowed
    q, keys = integer_data(B, N, d, seed=B + d, dtype=dtype)
    allow = mask(N, frac, k, seed=int(frac * 1000))
    want_i, want_s = oracle(q, keys, k, allow)
    got = reco.search(q, keys, k, allow=allow)
    assert torch.equal(got.indices, want_i)
    torch.testing.assert_close(got.scores.double(), want_s, rtol=0, atol=0)
    assert bool(allow[got.indices].all())


@pytest.mark.parametrize("path", ["0", "1"])  # every row scanned, mask tested / rows gathered
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("B, d", [(3, 32), (13, 24)])
def test_both_kernel_paths_are_exact(cpu_level, monkeypatch, path, dtype, B, d):
    monkeypatch.setenv("RECO_GATHER_BELOW", path)
    N, k, E = 40_000, 16, 5
    q, keys = integer_data(B, N, d, seed=B * d, dtype=dtype)
    allow = mask(N, 0.4, k, seed=12)
    ex = excluded(B, N, allow, E, seed=13)
    want_i, want_s = oracle(q, keys, k, allow, ex)
    got = reco.search(q, keys, k, allow=allow, exclude=ex)
    assert torch.equal(got.indices, want_i)
    torch.testing.assert_close(got.scores.double(), want_s, rtol=0, atol=0)


def test_a_bad_gather_fraction_is_refused(monkeypatch):
    monkeypatch.setenv("RECO_GATHER_BELOW", "half")
    q, keys = torch.randn(2, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"RECO_GATHER_BELOW=half must be a fraction in \[0, 1\]"):
        reco.search(q, keys, 3, allow=torch.arange(10) % 2 == 0)


@pytest.mark.parametrize("frac", [0.6, 0.05, 0.002])
def test_allow_combines_with_exclude(cpu_level, frac):
    B, N, d, k, E = 6, 20_000, 16, 8, 12
    q, keys = integer_data(B, N, d, seed=7, dtype=torch.bfloat16)
    allow = mask(N, frac, k, seed=3, extra=E)
    ex = excluded(B, N, allow, E, seed=5)
    want_i, want_s = oracle(q, keys, k, allow, ex)
    got = reco.search(q, keys, k, allow=allow, exclude=ex)
    assert torch.equal(got.indices, want_i)
    torch.testing.assert_close(got.scores.double(), want_s, rtol=0, atol=0)


@pytest.mark.parametrize("frac", [1.0, 0.3, 0.01])
def test_fused_attends_over_the_allowed_rows(cpu_level, frac):
    B, N, d, dv, k = 5, 6000, 20, 12, 10
    g = torch.Generator().manual_seed(11)
    q = torch.randn(B, d, generator=g)
    keys = torch.randn(N, d, generator=g).to(torch.float16)
    values = torch.randn(N, dv, generator=g)
    aq = torch.randn(B, 2, dv, generator=g)
    allow = mask(N, frac, k, seed=2)
    got = reco.fused_retrieve_attend(q, keys, values, k, attn_query=aq, allow=allow)
    want_i, _ = oracle(q, keys, k, allow)
    assert torch.equal(got.indices, want_i)
    att = reference.attend(q.double(), keys.double(), values.double(), got.indices, aq.double())
    torch.testing.assert_close(got.weights.double(), att.weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.output.double(), att.output, rtol=1e-5, atol=1e-6)


def test_random_floats_match_a_tie_aware_oracle(cpu_level):
    from topk_check import assert_topk_match

    B, N, d, k = 20, 50_000, 64, 16
    g = torch.Generator().manual_seed(4)
    q, keys = torch.randn(B, d, generator=g), torch.randn(N, d, generator=g).to(torch.bfloat16)
    for frac in (0.7, 0.04):
        allow = mask(N, frac, k, seed=9)
        got = reco.search(q, keys, k, allow=allow)
        want_i, _ = oracle(q, keys, k, allow)
        assert bool(allow[got.indices].all())
        assert_topk_match(q, keys, got.indices, got.scores.double(), want_i, 1e-4 * d**0.5)


@pytest.mark.parametrize("frac", [1.0, 0.2, 0.01])
def test_int8_op_selects_only_allowed_rows(cpu_level, frac):
    B, N, d, k = 4, 3000, 32, 6
    g = torch.Generator().manual_seed(8)
    q, keys = torch.randn(B, d, generator=g), torch.randn(N, d, generator=g)
    values = torch.randn(N, 4, generator=g)
    codes, scales = reco.quantize_keys(keys)
    allow = mask(N, frac, k, seed=1, extra=3)
    ex = excluded(B, N, allow, 3, seed=2)
    # candidates = N: every selectable row is re-ranked, so the result is the exact top-k
    got = reco.ops.fused_retrieve_attend_int8(
        q, codes, scales, keys, values, k, candidates=N, allow=allow, exclude=ex
    )
    want_i, _ = oracle(q, keys, k, allow, ex)
    assert torch.equal(got.indices, want_i)
    few = reco.ops.fused_retrieve_attend_int8(q, codes, scales, keys, values, k, allow=allow)
    assert bool(allow[few.indices].all())


def test_reference_matches_the_oracle():
    B, N, d, k = 4, 5000, 16, 7
    q, keys = integer_data(B, N, d, seed=1, dtype=torch.float32)
    for frac in FRACTIONS:
        allow = mask(N, frac, k, seed=4, extra=5)
        ex = excluded(B, N, allow, 5, seed=6)
        want_i, want_s = oracle(q, keys, k, allow, ex)
        got_i, got_s = reference.search(q, keys, k, ex, chunk=777, allow=allow)
        assert torch.equal(got_i, want_i)
        torch.testing.assert_close(got_s.double(), want_s, rtol=0, atol=0)


# --- errors ---------------------------------------------------------------------------------------


def test_k_above_the_allowed_rows_names_k_and_the_count(cpu_level):
    q, keys = integer_data(2, 1000, 8, seed=0, dtype=torch.float32)
    allow = torch.zeros(1000, dtype=torch.bool)
    allow[[3, 40, 41, 900]] = True
    with pytest.raises(ValueError, match=r"k=5 exceeds the 4 selectable rows"):
        reco.search(q, keys, 5, allow=allow)
    ex = torch.tensor([[3, -1], [40, 2]])  # query 1 loses row 40 (row 2 is not allowed anyway)
    with pytest.raises(ValueError, match=r"k=4 exceeds the 3 selectable rows of query 0"):
        reco.search(q, keys, 4, allow=allow, exclude=ex)
    with pytest.raises(ValueError, match=r"k=4 exceeds the 3 selectable rows of query 0"):
        reco.fused_retrieve_attend(q, keys, keys, 4, allow=allow, exclude=ex)
    got = reco.search(q, keys, 3, allow=allow, exclude=ex)
    assert [sorted(r) for r in got.indices.tolist()] == [[40, 41, 900], [3, 41, 900]]
    assert torch.equal(got.indices, oracle(q, keys, 3, allow, ex)[0])


def test_reference_names_k_and_the_count():
    q, keys = integer_data(3, 50, 4, seed=0, dtype=torch.float32)
    allow = torch.arange(50) % 10 == 0  # 5 rows
    with pytest.raises(ValueError, match=r"k=6 exceeds the 5 selectable rows"):
        reference.search(q, keys, 6, allow=allow)


@pytest.mark.parametrize(
    "allow, error, message",
    [
        (torch.ones(10, dtype=torch.uint8), TypeError, "allow must be bool"),
        (torch.ones(9, dtype=torch.bool), ValueError, r"allow must be \[N\] with N=10"),
        (torch.ones(1, 10, dtype=torch.bool), ValueError, r"allow must be \[N\]"),
        ([True] * 10, TypeError, "allow must be a bool torch.Tensor"),
        (torch.ones(10, dtype=torch.bool, device="meta"), ValueError, "allow is on meta"),
    ],
)
def test_bad_allow_is_refused(allow, error, message):
    q, keys = torch.randn(2, 4), torch.randn(10, 4)
    with pytest.raises(error, match=message):
        reco.search(q, keys, 3, allow=allow)
    with pytest.raises(error, match=message):
        reco.fused_retrieve_attend(q, keys, keys, 3, allow=allow)


def test_the_kernel_refuses_a_bad_mask_itself():
    """reco._C checks allow too (a caller bypassing the op's checks gets an error, no crash)."""
    _C = reco.ops._C
    q, keys = torch.randn(2, 4), torch.randn(10, 4)
    idx, sc = torch.empty(2, 3, dtype=torch.int64), torch.empty(2, 3)
    args = (q, keys, None, None, None)
    with pytest.raises(ValueError, match=r"allow \[9\] must be \[N\] with N=10"):
        _C.retrieve_attend(*args, torch.ones(9, dtype=torch.uint8), 3, 1.0, None, None, idx, sc, 1)
    with pytest.raises(ValueError, match="allow must be a bool"):
        _C.retrieve_attend(*args, torch.ones(10, dtype=torch.int64), 3, 1.0, None, None, idx, sc, 1)


# --- torch.compile and autograd -------------------------------------------------------------------


def test_allow_under_torch_compile():
    q, keys = torch.randn(4, 16), torch.randn(3000, 16)
    allow = mask(3000, 0.05, 8, seed=3)

    def f(q, keys, allow):
        r = reco.search(q, keys, 8, allow=allow)
        return r.indices, r.scores

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(q, keys, allow)
    want = f(q, keys, allow)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_gradients_flow_through_the_allowed_rows():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    keys = torch.randn(40, 5, dtype=torch.float64, generator=g, requires_grad=True)
    values = torch.randn(40, 3, dtype=torch.float64, generator=g, requires_grad=True)
    allow = torch.arange(40) % 3 == 0

    def f(q, keys, values):
        return reco.fused_retrieve_attend(q, keys, values, 4, allow=allow).output

    assert torch.autograd.gradcheck(f, (q, keys, values))
    out = f(q, keys, values)
    out.sum().backward()
    assert bool((keys.grad[~allow] == 0).all()) and bool((keys.grad[allow] != 0).any())


# --- the emulated CUDA path -----------------------------------------------------------------------

_EMU = reco.ops._C_emu


@pytest.mark.emulated
@pytest.mark.skipif(_EMU is None, reason="this build of reco has no CUDA emulation (reco._C_emu)")
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize(
    "B, keys_dtype, kernel",
    [(2, torch.float32, "search_kernel"), (12, torch.float16, "search_mma_kernel")],
)
def test_emulated_cuda_honours_allow(monkeypatch, arch, B, keys_dtype, kernel):
    monkeypatch.setenv("RECO_EMULATE_CUDA", arch)
    N, d, k = 300, 16, 5
    q, keys = integer_data(B, N, d, seed=B, dtype=keys_dtype)
    values = torch.randn(N, 3)
    for frac in (1.0, 0.3, 0.05):
        allow = mask(N, frac, k, seed=int(frac * 100), extra=2)
        ex = excluded(B, N, allow, 2, seed=1)
        _EMU.take_launch_log()
        got = reco.fused_retrieve_attend(q, keys, values, k, allow=allow, exclude=ex)
        assert kernel in _EMU.take_launch_log()
        want_i, want_s = oracle(q, keys, k, allow, ex)
        assert torch.equal(got.indices, want_i)
        torch.testing.assert_close(got.scores.double(), want_s, rtol=0, atol=0)


@pytest.mark.emulated
@pytest.mark.skipif(_EMU is None, reason="this build of reco has no CUDA emulation (reco._C_emu)")
def test_emulated_cuda_int8_and_short_queries(monkeypatch):
    monkeypatch.setenv("RECO_EMULATE_CUDA", "sm_90")
    B, N, d, k = 3, 256, 32, 4
    q, keys = integer_data(B, N, d, seed=2, dtype=torch.float32)
    values = torch.randn(N, 2)
    codes, scales = reco.quantize_keys(keys)
    allow = mask(N, 0.1, k, seed=5)
    _EMU.take_launch_log()
    got = reco.ops.fused_retrieve_attend_int8(
        q, codes, scales, keys, values, k, candidates=32, allow=allow
    )
    assert "search_mma_kernel" in _EMU.take_launch_log()
    assert bool(allow[got.indices].all())
    # fewer allowed rows than k: on the CUDA path the query's indices are -1 (no host sync)
    few = torch.zeros(N, dtype=torch.bool)
    few[[1, 2]] = True
    r = reco.search(q, keys, 3, allow=few)
    assert bool((r.indices == -1).all()) and bool(r.scores.isnan().all())
