"""Bad input gets a ValueError/TypeError naming the argument, never a crash or a wrong answer."""

from __future__ import annotations

import pytest
import torch

import reco

Q, K, V = torch.randn(2, 4), torch.randn(10, 4), torch.randn(10, 3)


def call(query=Q, keys=K, values=V, k=3, **kw):
    return reco.fused_retrieve_attend(query, keys, values, k, **kw)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"query": Q.numpy()}, TypeError, r"query must be a torch.Tensor \[B, d\], got ndarray"),
        ({"query": Q.long()}, TypeError, r"query must be float32.*got torch.int64"),
        ({"keys": K.int()}, TypeError, r"keys must be float32.*got torch.int32"),
        ({"values": V.bool()}, TypeError, r"values must be float32.*torch.bool"),
        ({"query": torch.tensor(1.0)}, ValueError, r"query must be \[B, d\], got shape \(\)"),
        ({"query": torch.randn(4)}, ValueError, r"query must be \[B, d\], got shape \(4,\)"),
        (
            {"keys": torch.randn(10, 4, 1)},
            ValueError,
            r"keys must be \[N, d\], got shape \(10, 4, 1\)",
        ),
        (
            {"keys": torch.randn(10, 5)},
            ValueError,
            r"keys shape \(10, 5\) and query shape \(2, 4\)",
        ),
        (
            {"values": torch.randn(9, 3)},
            ValueError,
            r"values shape \(9, 3\) and keys shape \(10, 4\)",
        ),
        (
            {"keys": torch.randn(0, 4), "values": torch.randn(0, 3)},
            ValueError,
            r"keys must have at least one row",
        ),
        ({"values": torch.randn(10, 0)}, ValueError, r"d and dv must be >= 1"),
        ({"k": 0}, ValueError, r"k=0 must be in \[1, N\] where N=10"),
        ({"k": 11}, ValueError, r"k=11 must be in \[1, N\] where N=10"),
        ({"k": -1}, ValueError, r"k=-1"),
        ({"k": 2.0}, TypeError, r"k must be an int, got float"),
        ({"k": True}, TypeError, r"k must be an int, got bool"),
        ({"temperature": 0.0}, ValueError, r"temperature must be finite and > 0, got 0.0"),
        ({"temperature": -1.0}, ValueError, r"temperature must be finite and > 0"),
        ({"temperature": float("nan")}, ValueError, r"temperature must be finite and > 0, got nan"),
        ({"temperature": float("inf")}, ValueError, r"temperature must be finite and > 0, got inf"),
        ({"temperature": "hot"}, TypeError, r"temperature must be a float, got str"),
        ({"attn_query": torch.randn(2, 3)}, ValueError, r"attn_query must be \[B, H, dv\]"),
        (
            {"attn_query": torch.randn(2, 1, 4)},
            ValueError,
            r"attn_query must be \[B, H, dv\] = \[2, H>=1, 3\]",
        ),
        ({"attn_query": torch.randn(3, 1, 3)}, ValueError, r"got shape \(3, 1, 3\)"),
        ({"attn_query": torch.randn(2, 0, 3)}, ValueError, r"attn_query must be \[B, H, dv\]"),
        (
            {"attn_query": torch.ones(2, 1, 3, dtype=torch.long)},
            TypeError,
            r"attn_query must be float32",
        ),
        (
            {"exclude": torch.zeros(2, 1, dtype=torch.int32)},
            TypeError,
            r"exclude must be int64, got torch.int32",
        ),
        ({"exclude": [[0], [1]]}, TypeError, r"exclude must be an int64 torch.Tensor"),
        (
            {"exclude": torch.zeros(3, 1, dtype=torch.long)},
            ValueError,
            r"exclude must be \[B, E\] with B=2",
        ),
        ({"exclude": torch.zeros(2, dtype=torch.long)}, ValueError, r"exclude must be \[B, E\]"),
        (
            {"exclude": torch.tensor([[0], [10]])},
            ValueError,
            r"exclude\[1, 0\] = 10 is not a row of keys \(N=10\)",
        ),
        ({"exclude": torch.tensor([[-2], [0]])}, ValueError, r"exclude\[0, 0\] = -2"),
        (
            {"exclude": torch.arange(16).reshape(2, 8) % 10, "k": 3},
            ValueError,
            r"k=3 exceeds the 2 selectable rows of query 0",
        ),
        (
            {"keys": torch.randn(10, 4, device="meta")},
            ValueError,
            r"keys is on meta but query is on cpu",
        ),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        call(**kwargs)


def test_raw_op_checks_too():
    """Calling torch.ops.reco.fused_retrieve_attend directly is checked the same way."""
    with pytest.raises(ValueError, match=r"k=20 must be in \[1, N\]"):
        torch.ops.reco.fused_retrieve_attend(Q, K, V, 20, None, 1.0, None)


def test_errors_leave_the_op_usable():
    with pytest.raises(ValueError):
        call(exclude=torch.tensor([[0], [99]]))
    r = call()
    assert r.indices.shape == (2, 3)


@pytest.mark.skipif(reco.ops._C is None, reason="reco._C is not built")
def test_compiled_core_rejects_bad_arrays():
    """The C++ boundary checks its arguments too (for numpy/cupy callers of reco._C)."""
    import numpy as np

    out = np.empty((2, 1, 3), np.float32)
    w, idx, sc = (
        np.empty((2, 1, 3), np.float32),
        np.empty((2, 3), np.int64),
        np.empty((2, 3), np.float32),
    )
    args = [Q.numpy(), K.numpy(), V.numpy(), None, None, None, 3, 1.0, out, w, idx, sc, 1]
    bad = list(args)
    bad[1] = K.numpy()[:, :3]
    with pytest.raises(ValueError, match="differ in d"):
        reco.ops._C.retrieve_attend(*bad)
    bad = list(args)
    bad[10] = np.empty((2, 3), np.int32)
    with pytest.raises(TypeError, match="indices has an unsupported dtype"):
        reco.ops._C.retrieve_attend(*bad)
    bad = list(args)
    bad[0] = [[1.0]]
    with pytest.raises(TypeError, match="query must be an array supporting DLPack"):
        reco.ops._C.retrieve_attend(*bad)
    with pytest.raises(ValueError, match="level 'avx1024' is not available"):
        reco.ops._C.retrieve_attend(*args, level="avx1024")
