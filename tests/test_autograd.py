"""Gradients, opcheck and torch.compile for reco::fused_retrieve_attend."""

from __future__ import annotations

import pytest
import torch

import reco
from reco import reference

pytestmark = pytest.mark.skipif(reco.ops._C is None, reason="reco._C is not built")


def _leaves(dtype, B=3, N=20, d=5, dv=4, heads=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    query, keys, values = mk(B, d), mk(N, d), mk(N, dv)
    attn_query = None if heads is None else mk(B, heads, dv)
    return query, keys, values, attn_query


@pytest.mark.parametrize("heads", [None, 1, 3])
@pytest.mark.parametrize("with_exclude", [False, True])
def test_gradcheck_float64(heads, with_exclude):
    query, keys, values, attn_query = _leaves(torch.float64, heads=heads, seed=1)
    exclude = torch.tensor([[0, -1], [4, 5], [-1, -1]]) if with_exclude else None

    def f(q, k, v, aq):
        r = reco.fused_retrieve_attend(q, k, v, 4, attn_query=aq, temperature=0.7, exclude=exclude)
        # Every differentiable output takes part.
        return r.output, r.weights, r.scores

    inputs = (query, keys, values, attn_query)
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("heads", [None, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_reference_autograd(heads, dtype):
    """The hand-written backward against torch autograd through the reference: its error vs the
    float64 reference is at most 2x that of the reference run at the same precision."""
    g = torch.Generator().manual_seed(2)
    query = torch.randn(6, 16, generator=g)
    keys = torch.randn(300, 16, generator=g).to(dtype)
    values = torch.randn(300, 8, generator=g).to(dtype)
    attn_query = None if heads is None else torch.randn(6, heads, 8, generator=g)
    w_out = torch.randn(6, heads or 1, 8, generator=g, dtype=torch.float64)
    w_w = torch.randn(6, heads or 1, 5, generator=g, dtype=torch.float64)
    w_s = torch.randn(6, 5, generator=g, dtype=torch.float64)

    def grads(fn, cast):
        leaves = [
            cast(t).detach().requires_grad_()
            for t in (query, keys, values, attn_query)
            if t is not None
        ]
        aq = leaves[3] if heads else None
        r = fn(*leaves[:3], aq)
        loss = (r.output * w_out).sum() + (r.weights * w_w).sum() + (r.scores * w_s).sum()
        return [x.double() for x in torch.autograd.grad(loss, leaves)]

    indices = reco.fused_retrieve_attend(query, keys, values, 5, attn_query=attn_query).indices
    got = grads(
        lambda q, k, v, aq: reco.fused_retrieve_attend(q, k, v, 5, attn_query=aq, temperature=0.3),
        lambda t: t,
    )
    low = grads(lambda q, k, v, aq: reference.attend(q, k, v, indices, aq, 0.3), lambda t: t)
    exact = grads(
        lambda q, k, v, aq: reference.attend(q, k, v, indices, aq, 0.3), torch.Tensor.double
    )
    for a, b, e in zip(got, low, exact):
        assert a.shape == e.shape
        err, ref_err = float((a - e).abs().max()), float((b - e).abs().max())
        assert err <= 2 * ref_err + 1e-5, f"error {err:.3g} vs reference {ref_err:.3g}"


def _opcheck_samples():
    out = []
    for dtype in (torch.float32, torch.float64):
        query, keys, values, attn_query = _leaves(dtype, B=4, N=50, d=6, dv=3, heads=2, seed=3)
        out.append((query, keys, values, 5, None, 1.0, None))
        exclude = torch.tensor([[1, -1], [2, 3], [-1, -1], [0, 49]])
        out.append((query, keys, values, 7, attn_query, 0.5, exclude))
    g = torch.Generator().manual_seed(4)
    out.append(
        (
            torch.randn(2, 8, generator=g),
            torch.randn(40, 8, generator=g).bfloat16(),
            torch.randn(40, 5, generator=g).half(),
            3,
            None,
            2.0,
            None,
        )
    )
    return out


@pytest.mark.parametrize("args", _opcheck_samples())
def test_opcheck(args):
    torch.library.opcheck(torch.ops.reco.fused_retrieve_attend.default, args)


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    keys = torch.nn.functional.normalize(torch.randn(2000, 32, generator=g), dim=1)
    values = torch.randn(2000, 16, generator=g)
    proj = torch.randn(32, 16, generator=g, requires_grad=True)

    def model(x):
        q = torch.nn.functional.normalize(x, dim=1)
        aq = (x @ proj).unsqueeze(1)
        r = reco.fused_retrieve_attend(q, keys, values, 8, attn_query=aq, temperature=0.1)
        return r.output.squeeze(1).relu().sum(1), r.indices

    x = torch.randn(12, 32, generator=g)
    compiled = torch.compile(model, fullgraph=True)
    y_c, idx_c = compiled(x)
    (grad_c,) = torch.autograd.grad(y_c.sum(), proj)
    y_e, idx_e = model(x)
    (grad_e,) = torch.autograd.grad(y_e.sum(), proj)
    assert torch.equal(idx_c, idx_e)
    torch.testing.assert_close(y_c, y_e)
    torch.testing.assert_close(grad_c, grad_e)


def test_compile_dynamic_batch():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(6)
    keys = torch.randn(500, 8, generator=g)
    f = torch.compile(lambda q: reco.fused_retrieve_attend(q, keys, keys, 4).output, dynamic=True)
    for B in (1, 3, 9):
        q = torch.randn(B, 8, generator=g)
        torch.testing.assert_close(f(q), reference.fused_retrieve_attend(q, keys, keys, 4).output)


def test_indices_are_not_differentiable():
    query, keys, values, _ = _leaves(torch.float32)
    r = reco.fused_retrieve_attend(query, keys, values, 3)
    assert not r.indices.requires_grad
    assert r.output.requires_grad and r.scores.requires_grad


class _Retriever(torch.nn.Module):
    """Holds its memory and its temperature as attributes, as a model would."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, temperature, int8: bool):
        super().__init__()
        self.keys, self.values, self.temperature, self.int8 = keys, values, temperature, int8
        self.codes, self.scales = reco.quantize_keys(keys)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if self.int8:
            r = reco.fused_retrieve_attend_int8(
                q, self.codes, self.scales, self.keys, self.values, 4, temperature=self.temperature
            )
        else:
            r = reco.fused_retrieve_attend(
                q, self.keys, self.values, 4, temperature=self.temperature
            )
        return r.output


def _retriever(temperature, int8: bool) -> _Retriever:
    g = torch.Generator().manual_seed(7)
    return _Retriever(
        torch.randn(300, 8, generator=g), torch.randn(300, 5, generator=g), temperature, int8
    )


@pytest.mark.parametrize("int8", [False, True], ids=["exact", "int8"])
def test_compile_dynamic_with_a_module_temperature(int8):
    """A temperature held by the module (not a literal) traces under fullgraph=True, dynamic=True,
    and is not baked into the graph."""
    torch._dynamo.reset()
    model = _retriever(0.3, int8)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(8)
    for B, temperature in ((3, 0.3), (7, 0.3), (5, 0.05), (2, 2)):
        model.temperature = temperature
        q = torch.randn(B, 8, generator=g)
        want = model(q)
        torch.testing.assert_close(compiled(q), want, rtol=1e-6, atol=1e-6)
        # The temperature matters here: a stale one would not match.
        assert not torch.allclose(want, _retriever(1.0, int8)(q))


@pytest.mark.parametrize("int8", [False, True], ids=["exact", "int8"])
@pytest.mark.parametrize("bad", [float("nan"), 0.0, -1.0, float("inf")])
def test_invalid_module_temperature_raises_eager_and_compiled(int8, bad):
    torch._dynamo.reset()
    model = _retriever(0.5, int8)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    q = torch.randn(3, 8)
    compiled(q)  # traced once with a valid temperature
    model.temperature = bad
    match = r"temperature must be finite and > 0, got "
    with pytest.raises(ValueError, match=match):
        model(q)
    with pytest.raises(ValueError, match=match):
        compiled(q)
    torch._dynamo.reset()  # traced first with the bad temperature
    with pytest.raises(ValueError, match=match):
        torch.compile(model, fullgraph=True, dynamic=True)(q)


@pytest.mark.parametrize("int8", [False, True], ids=["exact", "int8"])
def test_tensor_temperature_is_refused(int8):
    """The schema takes temperature as a float: a 0-dim tensor is refused by name."""
    model = _retriever(torch.tensor(0.3), int8)
    with pytest.raises(TypeError, match=r"temperature must be a float, got Tensor"):
        model(torch.randn(3, 8))
