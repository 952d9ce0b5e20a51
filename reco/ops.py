"""reco's torch ops: their schemas, argument checks, fake (meta) kernels and autograd formulas.

`reco::fused_retrieve_attend`, `reco::fused_retrieve_attend_int8` (int8 keys scored coarsely,
re-ranked exactly) and `reco::search` (the selection alone) are `torch.library.custom_op`s. Their
default bodies are the pure-torch reference (any device without a compiled kernel, with a
one-time warning); the kernels of each device live in reco.backends, registered here after the
arguments are checked.
"""

import functools
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import backends, reference
from .backends._common import (
    empty_outputs,
    empty_search_outputs,
    reference_int8,
    reference_retrieve_attend,
    reference_search,
)
from .backends._compiled import _C, _C_emu
from .backends.cuda import cuda_kernel_enabled, query_terms
from .backends.emulated import arch as emulated_cuda
from .reference import RetrieveAttend, compute_dtype

__all__ = [
    "RetrieveAttend",
    "SearchResult",
    "cuda_kernel_enabled",
    "emulated_cuda",
    "fused_retrieve_attend",
    "fused_retrieve_attend_int8",
    "quantize_keys",
    "query_terms",
    "search",
]
# For callers of the earlier single-module layout: reco.ops._C, reco.ops._C_emu.
_ = (_C, _C_emu)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _shape(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}"


def _check_tensor(name: str, t: object, dims: str, ndim: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {dims}, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype} ({_shape(t)})"
        )
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {dims}, got {_shape(t)}")
    return t


_SYMBOLIC = (torch.SymInt, torch.SymFloat)


def _as_float(temperature):
    """The temperature for the op's float argument: torch.sym_float of a SymInt/SymFloat (under
    torch.compile), a Python number as it is (dynamo in torch 2.4 cannot trace torch.sym_float
    of a number: "torch.* op returned non-Tensor float")."""
    return torch.sym_float(temperature) if isinstance(temperature, _SYMBOLIC) else temperature


def check_temperature(temperature: object, *, value: bool = True) -> None:
    """TypeError unless temperature is a real number; ValueError unless it is finite and > 0.

    Under torch.compile a temperature that is not a literal (a module attribute, with
    dynamic=True) is a SymFloat whose value is unknown while tracing, and a literal one is
    traced into the graph; neither may raise there. So the public functions test the value
    only in eager mode (value=True, not compiling), the fake kernels never, and every real
    kernel always, with the same message: a bad temperature raises ValueError when the op runs,
    compiled or not.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, *_SYMBOLIC)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not value or isinstance(temperature, _SYMBOLIC) or torch.compiler.is_compiling():
        return
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


def check_allow(allow: object, N: int, query: Optional[Tensor] = None) -> None:
    """TypeError/ValueError unless allow is None or a bool tensor [N] (on the query's device,
    where a query is given)."""
    if allow is None:
        return
    if not isinstance(allow, Tensor):
        raise TypeError(f"allow must be a bool torch.Tensor [N], got {type(allow).__name__}")
    if allow.dtype != torch.bool:
        raise TypeError(f"allow must be bool, got {allow.dtype} ({_shape(allow)})")
    if allow.dim() != 1 or allow.shape[0] != N:
        raise ValueError(
            f"allow must be [N] with N={N} (one flag per row of keys), got {_shape(allow)}"
        )
    if query is not None and allow.device != query.device:
        raise ValueError(f"allow is on {allow.device} but query is on {query.device}")


def check_search_args(
    query: Tensor,
    keys: Tensor,
    k: int,
    exclude: Optional[Tensor],
    values: Optional[Tensor] = None,
    allow: Optional[Tensor] = None,
) -> None:
    """Raises TypeError/ValueError naming the bad argument of `search` (and the common arguments
    of the fused ops, with their values [N, dv]); checks shapes, dtypes and devices only."""
    _check_tensor("query", query, "[B, d]", 2)
    _check_tensor("keys", keys, "[N, d]", 2)
    if values is not None:
        _check_tensor("values", values, "[N, dv]", 2)
    B, d = query.shape
    N = keys.shape[0]
    if keys.shape[1] != d:
        raise ValueError(f"keys {_shape(keys)} and query {_shape(query)} must have the same d")
    if values is not None and values.shape[0] != N:
        raise ValueError(f"values {_shape(values)} and keys {_shape(keys)} must have the same N")
    if N == 0:
        raise ValueError(f"keys must have at least one row, got {_shape(keys)}")
    if d == 0 or (values is not None and values.shape[1] == 0):
        shapes = f"query {_shape(query)}" + ("" if values is None else f", values {_shape(values)}")
        raise ValueError(f"d and dv must be >= 1, got {shapes}")
    if isinstance(k, bool) or not isinstance(k, (int, torch.SymInt)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= N:
        raise ValueError(f"k={k} must be in [1, N] where N={N} is the number of keys")
    for name, t in (("keys", keys), ("values", values)):
        if t is not None and t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
    if exclude is not None:
        if not isinstance(exclude, Tensor):
            raise TypeError(
                f"exclude must be an int64 torch.Tensor [B, E], got {type(exclude).__name__}"
            )
        if exclude.dtype != torch.int64:
            raise TypeError(f"exclude must be int64, got {exclude.dtype} ({_shape(exclude)})")
        if exclude.dim() != 2 or exclude.shape[0] != B:
            raise ValueError(f"exclude must be [B, E] with B={B}, got {_shape(exclude)}")
        if exclude.device != query.device:
            raise ValueError(f"exclude is on {exclude.device} but query is on {query.device}")
    check_allow(allow, N, query)


def check_retrieve_attend_args(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    k: int,
    attn_query: Optional[Tensor],
    temperature: float,
    exclude: Optional[Tensor],
    allow: Optional[Tensor] = None,
    *,
    check_value: bool = True,
) -> None:
    """Raises TypeError/ValueError naming the bad argument; checks shapes, dtypes and devices only.

    Checks that need the data (exclude rows in range, k <= a query's allowed, not excluded rows)
    run in the kernels. check_value=False leaves the temperature's value to the op's kernels (see
    check_temperature).
    """
    if values is None:
        raise TypeError("values must be a torch.Tensor [N, dv], got NoneType")
    check_search_args(query, keys, k, exclude, values, allow)
    check_temperature(temperature, value=check_value)
    if attn_query is not None:
        B = query.shape[0]
        _check_tensor("attn_query", attn_query, "[B, H, dv]", 3)
        if (
            attn_query.shape[0] != B
            or attn_query.shape[2] != values.shape[1]
            or attn_query.shape[1] < 1
        ):
            raise ValueError(
                f"attn_query must be [B, H, dv] = [{B}, H>=1, {values.shape[1]}], "
                f"got {_shape(attn_query)}"
            )
        if attn_query.device != query.device:
            raise ValueError(f"attn_query is on {attn_query.device} but query is on {query.device}")


def _out_dtype(
    query: Tensor, keys: Tensor, values: Tensor, attn_query: Optional[Tensor]
) -> torch.dtype:
    return compute_dtype(query, keys, values, attn_query)


@torch.library.custom_op("reco::fused_retrieve_attend", mutates_args=())
def _fused_retrieve_attend(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    k: int,
    attn_query: Optional[Tensor],
    temperature: float,
    exclude: Optional[Tensor],
    allow: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # Default body: devices without a compiled kernel run the reference.
    args = (query, keys, values, k, attn_query, temperature, exclude, allow)
    check_retrieve_attend_args(*args)
    return reference_retrieve_attend(*args)


@_fused_retrieve_attend.register_fake
def _fused_retrieve_attend_fake(
    query, keys, values, k, attn_query, temperature, exclude, allow=None
):
    check_retrieve_attend_args(
        query, keys, values, k, attn_query, temperature, exclude, allow, check_value=False
    )
    return empty_outputs(query, keys, values, k, attn_query)


def _setup_context(ctx, inputs, output):
    query, keys, values, _k, attn_query, temperature = inputs[:6]  # exclude, allow: no grads
    _out, weights, indices, _scores = output
    ctx.save_for_backward(query, keys, values, attn_query, indices, weights)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(indices)


def _backward(ctx, g_output, g_weights, _g_indices, g_scores):
    need_q, need_k, need_v, _, need_aq = ctx.needs_input_grad[:5]
    g_q, g_k, g_v, g_aq = _selected_rows_grads(
        ctx, (need_q, need_k, need_v, need_aq), g_output, g_weights, g_scores
    )
    # one gradient per input the op was given (allow may be left out)
    return (g_q, g_k, g_v, None, g_aq) + (None,) * (len(ctx.needs_input_grad) - 5)


def _selected_rows_grads(ctx, needs, g_output, g_weights, g_scores):
    """Gradients (query, keys, values, attn_query) through the selected rows; the selection itself
    is piecewise constant. ctx holds (query, keys, values, attn_query, indices, weights) and the
    temperature."""
    query, keys, values, attn_query, indices, weights = ctx.saved_tensors
    need_q, need_k, need_v, need_aq = needs
    ct = weights.dtype
    inv_t = 1.0 / ctx.temperature
    B, k = indices.shape
    v_sel = values[indices].to(ct)  # [B, k, dv]
    if g_output is None:
        g_output = weights.new_zeros(weights.shape[0], weights.shape[1], v_sel.shape[2])
    g_w = torch.einsum("bhd,bkd->bhk", g_output, v_sel)
    if g_weights is not None:
        g_w = g_w + g_weights
    g_logits = weights * (g_w - (weights * g_w).sum(-1, keepdim=True))  # softmax backward
    g_v_sel = torch.einsum("bhk,bhd->bkd", weights, g_output)
    g_s = torch.zeros_like(weights[:, 0]) if g_scores is None else g_scores.to(ct)
    g_aq = None
    if attn_query is None:
        g_s = g_s + g_logits[:, 0] * inv_t
    else:
        g_v_sel = g_v_sel + torch.einsum("bhk,bhd->bkd", g_logits, attn_query.to(ct)) * inv_t
        if need_aq:
            g_aq = (torch.einsum("bhk,bkd->bhd", g_logits, v_sel) * inv_t).to(attn_query.dtype)
    g_q = g_k = g_v = None
    flat = indices.reshape(-1)
    if need_q:
        g_q = torch.einsum("bk,bkd->bd", g_s, keys[indices].to(ct)).to(query.dtype)
    if need_k:
        g_k_sel = g_s.unsqueeze(-1) * query.to(ct).unsqueeze(1)  # [B, k, d]
        g_k = keys.new_zeros(keys.shape, dtype=ct).index_add_(0, flat, g_k_sel.reshape(B * k, -1))
        g_k = g_k.to(keys.dtype)
    if need_v:
        g_v = values.new_zeros(values.shape, dtype=ct).index_add_(
            0, flat, g_v_sel.reshape(B * k, -1)
        )
        g_v = g_v.to(values.dtype)
    return g_q, g_k, g_v, g_aq


_fused_retrieve_attend.register_autograd(_backward, setup_context=_setup_context)


def fused_retrieve_attend(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    k: int,
    *,
    attn_query: Optional[Tensor] = None,
    temperature: float = 1.0,
    exclude: Optional[Tensor] = None,
    allow: Optional[Tensor] = None,
) -> RetrieveAttend:
    """Exact top-k retrieval by inner product, fused with attention over the retrieved values.

    query [B, d], keys [N, d], values [N, dv]: float32, float16, bfloat16 (float64 for gradcheck);
    keys and values may differ in dtype. exclude [B, E] int64 lists rows query b must not select
    (-1 = padding); allow [N] bool, rows any query may select (False: never). A k above a query's
    allowed, not excluded rows is a ValueError (on CUDA, that query's indices are -1).
    attn_query [B, H, dv] switches the attention logits from the scores to
    attn_query . values. Returns RetrieveAttend(output [B, H, dv], weights [B, H, k],
    indices [B, k] int64, scores [B, k]), float32 (float64 if any input is float64).
    Ties go to the lower row; NaN scores rank below every number. Scores are float32 arithmetic
    with subnormals honoured (never flushed to zero) at every CPU SIMD level, whatever the
    caller's flush-to-zero mode (torch.set_flush_denormal). Differentiable in query, keys, values
    and attn_query through the selected rows. See DESIGN.md for the full contract.
    """
    check_retrieve_attend_args(query, keys, values, k, attn_query, temperature, exclude, allow)
    return RetrieveAttend(
        *torch.ops.reco.fused_retrieve_attend(
            query, keys, values, k, attn_query, _as_float(temperature), exclude, allow
        )
    )


def quantize_keys(keys: Tensor) -> tuple[Tensor, Tensor]:
    """int8 codes [N, d] and float32 scales [N] of keys for `fused_retrieve_attend_int8`
    (symmetric per row: keys ~= codes * scales[:, None]); on the keys' device."""
    _check_tensor("keys", keys, "[N, d]", 2)
    return reference.quantize_rows(keys)


def check_int8_args(
    query: Tensor, codes: Tensor, scales: Tensor, keys: Tensor, k: int, candidates: int
) -> None:
    """Raises TypeError/ValueError naming the bad argument of the int8 op's extra inputs."""
    if not isinstance(codes, Tensor) or codes.dtype != torch.int8:
        raise TypeError(
            f"codes must be an int8 torch.Tensor [N, d] (see quantize_keys), got "
            f"{getattr(codes, 'dtype', type(codes).__name__)}"
        )
    if codes.shape != keys.shape:
        raise ValueError(f"codes {_shape(codes)} must have the shape of keys {_shape(keys)}")
    if not isinstance(scales, Tensor) or scales.dtype != torch.float32:
        raise TypeError(
            f"scales must be a float32 torch.Tensor [N], got "
            f"{getattr(scales, 'dtype', type(scales).__name__)}"
        )
    if scales.shape != (keys.shape[0],):
        raise ValueError(f"scales must be [N] = [{keys.shape[0]}], got {_shape(scales)}")
    for name, t in (("codes", codes), ("scales", scales)):
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
    if isinstance(candidates, bool) or not isinstance(candidates, (int, torch.SymInt)):
        raise TypeError(f"candidates must be an int, got {type(candidates).__name__}")
    if not k <= candidates <= keys.shape[0]:
        raise ValueError(f"candidates={candidates} must be in [k, N] = [{k}, {keys.shape[0]}]")


@torch.library.custom_op("reco::fused_retrieve_attend_int8", mutates_args=())
def _fused_retrieve_attend_int8(
    query: Tensor,
    codes: Tensor,
    scales: Tensor,
    keys: Tensor,
    values: Tensor,
    k: int,
    candidates: int,
    attn_query: Optional[Tensor],
    temperature: float,
    exclude: Optional[Tensor],
    allow: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # Default body (devices without a compiled kernel): the reference.
    check_retrieve_attend_args(query, keys, values, k, attn_query, temperature, exclude, allow)
    check_int8_args(query, codes, scales, keys, k, candidates)
    return reference_int8(
        query, codes, scales, keys, values, k, candidates, attn_query, temperature, exclude, allow
    )


@_fused_retrieve_attend_int8.register_fake
def _fused_retrieve_attend_int8_fake(
    query, codes, scales, keys, values, k, candidates, attn_query, temperature, exclude, allow=None
):
    check_retrieve_attend_args(
        query, keys, values, k, attn_query, temperature, exclude, allow, check_value=False
    )
    check_int8_args(query, codes, scales, keys, k, candidates)
    return empty_outputs(query, keys, values, k, attn_query)


def _setup_context_int8(ctx, inputs, output):
    query, _codes, _scales, keys, values, _k, _c, attn_query, temperature = inputs[:9]
    _out, weights, indices, _scores = output
    ctx.save_for_backward(query, keys, values, attn_query, indices, weights)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(indices)


def _backward_int8(ctx, g_output, g_weights, _g_indices, g_scores):
    need_q, _, _, need_k, need_v, _, _, need_aq = ctx.needs_input_grad[:8]
    g_q, g_k, g_v, g_aq = _selected_rows_grads(
        ctx, (need_q, need_k, need_v, need_aq), g_output, g_weights, g_scores
    )
    rest = (None,) * (len(ctx.needs_input_grad) - 8)
    return (g_q, None, None, g_k, g_v, None, None, g_aq, *rest)


_fused_retrieve_attend_int8.register_autograd(_backward_int8, setup_context=_setup_context_int8)


def fused_retrieve_attend_int8(
    query: Tensor,
    codes: Tensor,
    scales: Tensor,
    keys: Tensor,
    values: Tensor,
    k: int,
    *,
    candidates: Optional[int] = None,
    attn_query: Optional[Tensor] = None,
    temperature: float = 1.0,
    exclude: Optional[Tensor] = None,
    allow: Optional[Tensor] = None,
) -> RetrieveAttend:
    """`fused_retrieve_attend` with the search done coarsely on int8 keys, then re-ranked exactly.

    codes, scales = quantize_keys(keys), computed once per memory. The query is quantised the
    same way; each row's coarse score is the exact int8 dot product times its scale. The
    `candidates` rows of best coarse score (default min(N, max(4k, k + 16))) are re-scored
    exactly against keys, and the k best of them are attended as in `fused_retrieve_attend`
    (same outputs, order and gradients). A row of the exact top-k that is not among the candidates
    is missed: measure recall@k on your data (benchmarks/bench_int8.py). On CUDA, the coarse search
    runs on int8 tensor cores (candidates <= 64, d a multiple of 16); elsewhere, the reference.
    """
    check_retrieve_attend_args(query, keys, values, k, attn_query, temperature, exclude, allow)
    if candidates is None:
        candidates = min(keys.shape[0], max(4 * k, k + 16))
    check_int8_args(query, codes, scales, keys, k, candidates)
    return RetrieveAttend(
        *torch.ops.reco.fused_retrieve_attend_int8(
            query,
            codes,
            scales,
            keys,
            values,
            k,
            candidates,
            attn_query,
            _as_float(temperature),  # a SymFloat under torch.compile stays symbolic
            exclude,
            allow,
        )
    )


class SearchResult(NamedTuple):
    indices: Tensor  # [B, k] int64
    scores: Tensor  # [B, k], float32 (float64 if query or keys is)


@torch.library.custom_op("reco::search", mutates_args=())
def _search(
    query: Tensor, keys: Tensor, k: int, exclude: Optional[Tensor], allow: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    # Default body: devices without a compiled kernel run the reference.
    check_search_args(query, keys, k, exclude, allow=allow)
    return reference_search(query, keys, k, exclude, allow)


@_search.register_fake
def _search_fake(query, keys, k, exclude, allow=None):
    check_search_args(query, keys, k, exclude, allow=allow)
    return empty_search_outputs(query, keys, k)


def _setup_context_search(ctx, inputs, output):
    query, keys = inputs[:2]
    indices, _scores = output
    ctx.save_for_backward(query, keys, indices)
    ctx.mark_non_differentiable(indices)


def _backward_search(ctx, _g_indices, g_scores):
    """scores[b, j] = query[b] . keys[indices[b, j]]: gradients through the selected rows."""
    query, keys, indices = ctx.saved_tensors
    need_q, need_k = ctx.needs_input_grad[:2]
    rest = (None,) * (len(ctx.needs_input_grad) - 2)
    g_q = g_k = None
    if g_scores is None:
        return (None, None, *rest)
    ct = g_scores.dtype
    if need_q:
        g_q = torch.einsum("bk,bkd->bd", g_scores, keys[indices].to(ct)).to(query.dtype)
    if need_k:
        rows = (g_scores.unsqueeze(-1) * query.to(ct).unsqueeze(1)).reshape(-1, keys.shape[1])
        g_k = keys.new_zeros(keys.shape, dtype=ct).index_add_(0, indices.reshape(-1), rows)
        g_k = g_k.to(keys.dtype)
    return (g_q, g_k, *rest)


_search.register_autograd(_backward_search, setup_context=_setup_context_search)


def search(
    query: Tensor,
    keys: Tensor,
    k: int,
    *,
    exclude: Optional[Tensor] = None,
    allow: Optional[Tensor] = None,
) -> SearchResult:
    """Exact top-k rows of keys by inner product with each query: `fused_retrieve_attend`'s
    selection without values or attention, computed by the same kernels.

    query [B, d], keys [N, d]: float32, float16, bfloat16 (float64 for gradcheck). exclude [B, E]
    int64 lists rows query b must not select (-1 = padding); allow [N] bool, rows any query may
    select (False: never; the kernels skip disallowed rows cheaply, see README "A living memory").
    A k above a query's allowed, not excluded rows is a ValueError. Returns SearchResult(indices
    [B, k] int64, scores [B, k] float32, or float64 if an input is): larger score first, ties to the
    lower row, NaN scores below every number; scores are the winners re-scored exactly.
    Differentiable in query and keys through the selected rows.
    """
    check_search_args(query, keys, k, exclude, allow=allow)
    return SearchResult(*torch.ops.reco.search(query, keys, k, exclude, allow))


# ---- the kernels of each device (reco.backends), registered behind the argument checks ----------


def _checked_retrieve_attend(kernel):
    @functools.wraps(kernel)
    def run(query, keys, values, k, attn_query, temperature, exclude, allow=None):
        args = (query, keys, values, k, attn_query, temperature, exclude, allow)
        check_retrieve_attend_args(*args)
        return kernel(*args)

    return run


def _checked_int8(kernel):
    @functools.wraps(kernel)
    def run(
        query, codes, scales, keys, values, k, candidates, attn_query, temperature, exclude,
        allow=None,
    ):  # fmt: skip
        check_retrieve_attend_args(query, keys, values, k, attn_query, temperature, exclude, allow)
        check_int8_args(query, codes, scales, keys, k, candidates)
        return kernel(
            query, codes, scales, keys, values, k, candidates, attn_query, temperature, exclude,
            allow,
        )  # fmt: skip

    return run


def _checked_search(kernel):
    @functools.wraps(kernel)
    def run(query, keys, k, exclude, allow=None):
        check_search_args(query, keys, k, exclude, allow=allow)
        return kernel(query, keys, k, exclude, allow)

    return run


_OPS = {
    "fused_retrieve_attend": (_fused_retrieve_attend, _checked_retrieve_attend),
    "fused_retrieve_attend_int8": (_fused_retrieve_attend_int8, _checked_int8),
    "search": (_search, _checked_search),
}
for _device, _kernels in backends.KERNELS.items():
    for _name, _kernel in _kernels.items():
        _op, _check = _OPS[_name]
        _op.register_kernel(_device)(_check(_kernel))
