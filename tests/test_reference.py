"""reco.reference against an independent numpy oracle written from the contract's words."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reco import reference


def oracle(query, keys, values, k, attn_query=None, temperature=1.0, exclude=None):
    """Float64, one query at a time: lexsort by (NaN last, -score, row), drop excluded rows."""
    q, K, V = (np.asarray(t, dtype=np.float64) for t in (query, keys, values))
    outs, ws, idxs, scs = [], [], [], []
    for b in range(q.shape[0]):
        s = K @ q[b]
        rows = np.arange(K.shape[0])
        if exclude is not None:
            keep = ~np.isin(rows, exclude[b])
            s, rows = s[keep], rows[keep]
        order = np.lexsort((rows, -np.nan_to_num(s, nan=0.0), np.isnan(s)))[:k]
        sel, sc = rows[order], s[order]
        logits = (
            sc[None] if attn_query is None else np.asarray(attn_query[b], np.float64) @ V[sel].T
        )
        logits = logits / temperature
        e = np.exp(logits - logits.max(-1, keepdims=True))
        w = e / e.sum(-1, keepdims=True)
        outs.append(w @ V[sel])
        ws.append(w)
        idxs.append(sel)
        scs.append(sc)
    return np.stack(outs), np.stack(ws), np.stack(idxs), np.stack(scs)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk", [7, 1 << 16])
def test_reference_matches_oracle(seed, chunk):
    g = torch.Generator().manual_seed(seed)
    B, N, d, dv = 1 + seed, 20 + 37 * seed, 1 + 3 * seed, 2 + seed
    k = 1 + (5 * seed) % N
    # Few distinct values: many exact ties.
    query = torch.randint(-2, 3, (B, d), generator=g).double()
    keys = torch.randint(-2, 3, (N, d), generator=g).double()
    values = torch.randn(N, dv, generator=g, dtype=torch.float64)
    heads = None if seed % 2 else torch.randn(B, 2, dv, generator=g, dtype=torch.float64)
    exclude = torch.randint(-1, N, (B, 3), generator=g) if seed % 3 else None
    if seed == 5:
        keys[3] = float("nan")
    indices, scores = reference.search(query, keys, k, exclude, chunk=chunk)
    got = reference.attend(query, keys, values, indices, heads, 0.5)
    want = oracle(
        query,
        keys,
        values,
        k,
        None if heads is None else heads.numpy(),
        0.5,
        None if exclude is None else exclude.numpy(),
    )
    np.testing.assert_array_equal(indices.numpy(), want[2])
    np.testing.assert_array_equal(scores.numpy(), want[3])
    np.testing.assert_allclose(got.weights.numpy(), want[1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.output.numpy(), want[0], rtol=1e-12, atol=1e-12)


def test_reference_rejects_too_large_k():
    keys = torch.randn(5, 2)
    with pytest.raises(ValueError, match="k=5 exceeds"):
        reference.search(torch.randn(1, 2), keys, 5, torch.tensor([[0, -1]]))
