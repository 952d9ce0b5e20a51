"""The int8 variant: coarse int8 search, exact re-rank (reco.fused_retrieve_attend_int8), against
independent computations: numpy integer dot products, plain sorts and the exact op."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reco
from reco import reference


def _data(B, N, d, seed, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=1)
    keys = torch.nn.functional.normalize(torch.randn(N, d, generator=g), dim=1).to(dtype)
    values = torch.randn(N, 24, generator=g)
    return q, keys, values


def test_quantize_keys_rounds_each_row_to_its_own_scale():
    _, keys, _ = _data(1, 500, 40, seed=1, dtype=torch.float32)
    keys[7] = 0.0
    codes, scales = reco.quantize_keys(keys)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32
    assert codes.shape == keys.shape and scales.shape == (500,)
    k = keys.numpy().astype(np.float64)
    want_scale = np.abs(k).max(1) / 127
    want_scale[7] = 1.0
    np.testing.assert_allclose(scales.numpy(), want_scale, rtol=1e-6)
    assert int(codes.abs().max()) == 127  # every nonzero row uses the full range
    err = np.abs(codes.numpy() * scales.numpy()[:, None] - k)
    assert (err <= scales.numpy()[:, None] * 0.5 * (1 + 1e-5)).all()  # round to nearest
    assert (codes[7] == 0).all()


def test_coarse_scores_are_the_exact_integer_dot_times_the_scale():
    q, keys, _ = _data(6, 300, 64, seed=2)
    codes, scales = reco.quantize_keys(keys)
    q_codes, _ = reference.quantize_rows(q)
    dots = q_codes.numpy().astype(np.int64) @ codes.numpy().astype(np.int64).T
    want = dots.astype(np.float32) * scales.numpy()  # float32 product, as the kernel rounds it
    got = reference.coarse_scores(q_codes, codes, scales)
    assert np.array_equal(got.numpy(), want)


def test_all_rows_as_candidates_is_the_exact_op():
    q, keys, values = _data(7, 2000, 48, seed=3)
    codes, scales = reco.quantize_keys(keys)
    got = reco.fused_retrieve_attend_int8(q, codes, scales, keys, values, 9, candidates=2000)
    want = reco.fused_retrieve_attend(q, keys, values, 9)
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.output, want.output)
    torch.testing.assert_close(got.weights, want.weights)
    torch.testing.assert_close(got.scores, want.scores)


@pytest.mark.parametrize("candidates", [10, 25, 64])
def test_selects_the_exact_best_among_the_coarse_best(candidates):
    B, N, d, k = 9, 3000, 64, 10
    q, keys, values = _data(B, N, d, seed=candidates)
    codes, scales = reco.quantize_keys(keys)
    got = reco.fused_retrieve_attend_int8(q, codes, scales, keys, values, k, candidates=candidates)
    q_codes, _ = reference.quantize_rows(q)
    coarse = (q_codes.numpy().astype(np.int64) @ codes.numpy().astype(np.int64).T).astype(
        np.float32
    ) * scales.numpy()
    exact = q.double().numpy() @ keys.double().numpy().T
    for b in range(B):
        # Coarse order: score descending, ties to the lower row (a stable sort of -score).
        cand = np.argsort(-coarse[b], kind="stable")[:candidates]
        best = cand[np.argsort(-exact[b, cand], kind="stable")][:k]
        # Equal exact scores aside, the same rows in the same order.
        assert np.allclose(exact[b, got.indices[b].numpy()], exact[b, best], rtol=0, atol=1e-6)
        assert set(got.indices[b].tolist()) <= set(cand.tolist())


def test_exclude_and_errors_name_the_argument():
    q, keys, values = _data(3, 200, 32, seed=5)
    codes, scales = reco.quantize_keys(keys)
    exact = reco.fused_retrieve_attend(q, keys, values, 5)
    exclude = exact.indices.clone()  # every query's true top 5
    got = reco.fused_retrieve_attend_int8(q, codes, scales, keys, values, 5, exclude=exclude)
    for b in range(3):
        assert not set(got.indices[b].tolist()) & set(exclude[b].tolist())
    with pytest.raises(TypeError, match="codes"):
        reco.fused_retrieve_attend_int8(q, codes.float(), scales, keys, values, 5)
    with pytest.raises(ValueError, match="codes"):
        reco.fused_retrieve_attend_int8(q, codes[:10], scales, keys, values, 5)
    with pytest.raises(TypeError, match="scales"):
        reco.fused_retrieve_attend_int8(q, codes, scales.double(), keys, values, 5)
    with pytest.raises(ValueError, match="scales"):
        reco.fused_retrieve_attend_int8(q, codes, scales[:-1], keys, values, 5)
    with pytest.raises(ValueError, match="candidates"):
        reco.fused_retrieve_attend_int8(q, codes, scales, keys, values, 5, candidates=4)
    with pytest.raises(ValueError, match="k="):
        reco.fused_retrieve_attend_int8(
            q, codes, scales, keys, values, 5, exclude=torch.arange(196).expand(3, -1)
        )


def test_gradients_match_autograd_through_the_reference():
    # float64: the two computations sum in different orders, which float32 would show.
    q, keys, values = _data(4, 400, 16, seed=6, dtype=torch.float64)
    q, values = q.double(), values.double()
    codes, scales = reco.quantize_keys(keys)
    aq = torch.randn(4, 2, 24, dtype=torch.float64)
    grads = []
    for fn in (
        lambda *a: reco.fused_retrieve_attend_int8(
            a[0], codes, scales, a[1], a[2], 6, candidates=400, attn_query=a[3]
        ),
        # torch autograd through the reference's plain ops: independent of the registered backward
        lambda *a: reference.fused_retrieve_attend(a[0], a[1], a[2], 6, attn_query=a[3]),
    ):
        inputs = [t.clone().requires_grad_(True) for t in (q, keys, values, aq)]
        out = fn(*inputs)
        (out.output.square().sum() + out.scores.sum()).backward()
        grads.append([t.grad for t in inputs])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_compiles_with_torch_compile():
    q, keys, values = _data(3, 500, 32, seed=7)
    codes, scales = reco.quantize_keys(keys)

    def fn(q):
        return reco.fused_retrieve_attend_int8(q, codes, scales, keys, values, 4).output

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q), fn(q))


@pytest.mark.parametrize("level", ["default", "avx2", "generic"])
@pytest.mark.parametrize("B", [6, 30])
def test_cpu_coarse_search_equals_the_reference_bit_for_bit(monkeypatch, level, B):
    """reco._C.coarse_int8 against the reference's coarse selection: the same rows with the same
    float32 scores, over thread splits, a d that is not a multiple of 64, ties and excluded rows.
    By default on a CPU with AVX512-VNNI: row by row for B = 6, blocks laid out for many queries
    for B = 30 (24 or more: 4-query passes and a remainder of 2); at the avx2 level, int16
    vpmaddwd; at the generic level, the integer loop."""
    from reco.ops import _C

    if _C is None:
        pytest.skip("no compiled core")
    if level != "default":
        if level not in _C.cpu_levels():
            pytest.skip(f"this CPU or build has no {level} level")
        monkeypatch.setenv("RECO_CPU_LEVEL", level)
        assert not _C.coarse_int8_uses_vnni()
    N, d, c = 40000, 100, 33
    q, keys, _ = _data(B, N, d, seed=11)
    keys[1000:2000] = keys[:1000]  # duplicate rows: equal coarse scores, ties to the lower row
    codes, scales = reco.quantize_keys(keys)
    q_codes, _ = reference.quantize_rows(q)
    exclude = torch.randint(-1, N, (B, 20), generator=torch.Generator().manual_seed(3))
    rows = torch.empty(B, c, dtype=torch.int64)
    got = torch.empty(B, c)
    _C.coarse_int8(q_codes, codes, scales, exclude, None, c, rows, got, 2)
    coarse = reference.coarse_scores(q_codes, codes, scales)
    for b in range(B):
        coarse[b, exclude[b][exclude[b] >= 0]] = float("-inf")  # never selectable
    order = torch.sort(-coarse, dim=1, stable=True).indices[:, :c]  # ties: lower row first
    assert torch.equal(rows, order)
    assert torch.equal(got, coarse.gather(1, order))
