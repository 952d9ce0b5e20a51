"""reco's torch ops: registration, argument checks, fake (meta) kernels and autograd formulas.

`reco::fused_retrieve_attend` is a `torch.library.custom_op`. Its default body is the pure-torch
reference (any device without a compiled kernel, with a one-time warning); the CPU kernel lives in
reco._C, which takes the arrays through DLPack and links no libtorch.
`reco::fused_retrieve_attend_int8` (int8 keys scored coarsely, re-ranked exactly) has CPU and
CUDA kernels for its coarse search; elsewhere its body is the reference.
"""

import contextlib
import math
import os
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import reference
from .reference import RetrieveAttend, compute_dtype

try:
    from . import _C
except ImportError:  # a source checkout without a build: every device uses the reference
    _C = None
try:  # the CUDA path compiled against the CPU emulation (csrc/emulation): RECO_EMULATE_CUDA
    from . import _C_emu
except ImportError:
    _C_emu = None

__all__ = [
    "RetrieveAttend",
    "fused_retrieve_attend",
    "fused_retrieve_attend_int8",
    "quantize_keys",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_warned_devices: set = set()


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


def check_retrieve_attend_args(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    k: int,
    attn_query: Optional[Tensor],
    temperature: float,
    exclude: Optional[Tensor],
    *,
    check_value: bool = True,
) -> None:
    """Raises TypeError/ValueError naming the bad argument; checks shapes, dtypes and devices only.

    Checks that need the data (exclude rows in range, k <= N minus excluded) run in the kernels.
    check_value=False leaves the temperature's value to the op's kernels (see check_temperature).
    """
    _check_tensor("query", query, "[B, d]", 2)
    _check_tensor("keys", keys, "[N, d]", 2)
    _check_tensor("values", values, "[N, dv]", 2)
    B, d = query.shape
    N = keys.shape[0]
    if keys.shape[1] != d:
        raise ValueError(f"keys {_shape(keys)} and query {_shape(query)} must have the same d")
    if values.shape[0] != N:
        raise ValueError(f"values {_shape(values)} and keys {_shape(keys)} must have the same N")
    if N == 0:
        raise ValueError(f"keys must have at least one row, got {_shape(keys)}")
    if d == 0 or values.shape[1] == 0:
        raise ValueError(
            f"d and dv must be >= 1, got query {_shape(query)}, values {_shape(values)}"
        )
    if isinstance(k, bool) or not isinstance(k, (int, torch.SymInt)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= N:
        raise ValueError(f"k={k} must be in [1, N] where N={N} is the number of keys")
    check_temperature(temperature, value=check_value)
    for name, t in (("keys", keys), ("values", values)):
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
    if attn_query is not None:
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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # Default body: devices without a compiled kernel run the reference.
    check_retrieve_attend_args(query, keys, values, k, attn_query, temperature, exclude)
    return _reference_body(query, keys, values, k, attn_query, temperature, exclude)


def _reference_body(query, keys, values, k, attn_query, temperature, exclude):
    if query.device.type not in _warned_devices:
        _warned_devices.add(query.device.type)
        warnings.warn(
            f"reco: no compiled fused_retrieve_attend kernel for device '{query.device.type}'; "
            "using the pure-torch reference (slower, same results)",
            stacklevel=4,
        )
    r = reference.fused_retrieve_attend(
        query, keys, values, k, attn_query=attn_query, temperature=temperature, exclude=exclude
    )
    return _owned(r)


def _owned(r: RetrieveAttend) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A custom op may not return views of its inputs: fresh copies of the four results."""
    return r.output.clone(), r.weights.clone(), r.indices.clone(), r.scores.clone()


def _empty_outputs(query, keys, values, k, attn_query) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Uninitialised (output [B, H, dv], weights [B, H, k], indices [B, k], scores [B, k])."""
    ct = _out_dtype(query, keys, values, attn_query)
    B, dv = query.shape[0], values.shape[1]
    H = 1 if attn_query is None else attn_query.shape[1]
    return (
        query.new_empty((B, H, dv), dtype=ct),
        query.new_empty((B, H, k), dtype=ct),
        query.new_empty((B, k), dtype=torch.int64),
        query.new_empty((B, k), dtype=ct),
    )


def _unit_inner_stride(t: Tensor) -> Tensor:
    # The kernel accepts any row stride (even 0, for expanded memories) but needs unit inner stride.
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


if _C is not None:

    @_fused_retrieve_attend.register_kernel("cpu")
    def _fused_retrieve_attend_cpu(
        query: Tensor,
        keys: Tensor,
        values: Tensor,
        k: int,
        attn_query: Optional[Tensor],
        temperature: float,
        exclude: Optional[Tensor],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        check_retrieve_attend_args(query, keys, values, k, attn_query, temperature, exclude)
        if emulated_cuda() is not None:
            args = (query, keys, values, k, attn_query, temperature, exclude)
            emulated = _cuda_retrieve_attend(_C_emu, *args)
            if emulated is not None:
                return emulated
        outputs = _empty_outputs(query, keys, values, k, attn_query)
        if query.shape[0] == 0:
            return outputs
        ct = outputs[0].dtype
        _C.retrieve_attend(
            query.detach().to(ct).contiguous(),
            _unit_inner_stride(keys.detach()),
            _unit_inner_stride(values.detach()),
            None if attn_query is None else attn_query.detach().to(ct).contiguous(),
            None if exclude is None else exclude.contiguous(),
            k,
            float(temperature),
            *outputs,
            torch.get_num_threads(),
        )
        return outputs


def query_terms(query: Tensor, dtype: torch.dtype) -> Tensor:
    """The query as [T, B, d] terms of the 16-bit `dtype` whose sum is the query scaled per row by
    a power of two, to about float32 precision: the tensor-core search multiplies each term by
    16-bit keys exactly and accumulates in float32.

    float16 (T = 2): each row is scaled so that its largest magnitude lies in [2^14, 2^15), which
    keeps the second term clear of float16's subnormals; the error of a row is at most 2^-22 of
    its largest element. bfloat16 (T = 3, no scaling): the error is at most 2^-24 of each element.
    A term that would be inf - inf is 0, so infinite elements score as they do in float32.
    """
    q = query.detach().float()
    if dtype == torch.float16:
        # The largest finite magnitude sets the scale (an infinite one stays infinite).
        amax = torch.where(torch.isfinite(q), q.abs(), 0.0).amax(dim=1, keepdim=True)
        exponent = torch.frexp(torch.where(amax > 0, amax, 1.0)).exponent
        q = torch.ldexp(q, (15 - exponent).clamp(max=126))
        count = 2
    elif dtype == torch.bfloat16:
        count = 3
    else:
        raise ValueError(f"query_terms: dtype must be float16 or bfloat16, got {dtype}")
    terms = []
    rest = q
    for _ in range(count):
        t = rest.to(dtype)
        terms.append(t)
        rest = torch.where(torch.isfinite(t), rest - t.float(), 0.0)
    return torch.stack(terms)


def emulated_cuda() -> Optional[str]:
    """The GPU that RECO_EMULATE_CUDA names, "sm_90" (H100) or "sm_80" (A100), or None when it is
    unset. With it, CPU tensors take the CUDA path (planning, binding, launches, kernels, merge)
    compiled against the CPU emulation of csrc/emulation: slow, for tests."""
    name = os.environ.get("RECO_EMULATE_CUDA", "")
    if not name:
        return None
    if name not in ("sm_80", "sm_90"):
        raise ValueError(f"RECO_EMULATE_CUDA must be sm_80, sm_90 or unset, got {name!r}")
    if _C_emu is None:
        raise RuntimeError(
            "RECO_EMULATE_CUDA is set, but this build of reco has no CUDA emulation "
            "(reco._C_emu is built with GCC on Linux; RECO_EMULATION=OFF leaves it out)"
        )
    _C_emu.set_arch(name)
    return name


def _launch_cuda(
    mod, q, terms, codes, scales, keys, values, attn_query, exclude, k, candidates, temperature,
    outputs, plan,
) -> None:  # fmt: skip
    """mod.retrieve_attend_cuda (reco._C, or reco._C_emu on CPU tensors) on the current stream,
    writing `outputs`: the query q as float32, its 16-bit or int8 terms for the tensor-core
    search (or None), the int8 codes and scales (or None); the workspace of `candidates` rows per
    split comes from torch's caching allocator (stream-ordered, CUDA-graph safe)."""
    splits, pow2, queries, mma = plan
    B = q.shape[0]
    part_scores = q.new_empty((B, splits, candidates), dtype=torch.float32)
    part_rows = q.new_empty((B, splits, candidates), dtype=torch.int64)
    # The stream the kernels run on, also given to every array's __dlpack__.
    stream = torch.cuda.current_stream(q.device).cuda_stream if q.is_cuda else None
    mod.retrieve_attend_cuda(
        q,
        terms,
        codes,
        scales,
        _unit_inner_stride(keys.detach()),
        _unit_inner_stride(values.detach()),
        None if attn_query is None else attn_query.detach().float().contiguous(),
        None if exclude is None else exclude.contiguous(),
        k,
        candidates,
        float(temperature),
        *outputs,
        part_scores,
        part_rows,
        splits,
        pow2,
        queries,
        mma,
        stream,
    )


def _cuda_plan(mod, query: Tensor, rows: int, k: int, terms: int):
    """(splits, pow2, queries, mma) of mod.cuda_plan, or None where the kernel cannot take k."""
    if k > mod.cuda_max_candidates:
        return None
    ok, splits, pow2, queries, mma = mod.cuda_plan(
        query.shape[0], rows, query.shape[1], k, terms, query.device.index or 0
    )
    return (splits, pow2, queries, mma) if ok else None


def cuda_kernel_enabled() -> bool:
    """The CUDA kernel is compiled in but has not yet been validated on a GPU, so CUDA tensors
    run the reference unless RECO_CUDA_KERNEL=1 opts in."""
    return bool(getattr(_C, "with_cuda", False)) and os.environ.get("RECO_CUDA_KERNEL") == "1"


def _cuda_retrieve_attend(mod, query, keys, values, k, attn_query, temperature, exclude):
    """The CUDA path of fused_retrieve_attend through mod (reco._C on CUDA tensors, reco._C_emu on
    CPU ones), or None where its kernels cannot take the call (the caller falls back)."""
    if _out_dtype(query, keys, values, attn_query) != torch.float32:
        return None
    outputs = _empty_outputs(query, keys, values, k, attn_query)
    if query.shape[0] == 0:
        return outputs
    # 16-bit keys: the tensor-core search takes the query as 16-bit terms of their dtype
    # (the query itself when it has that dtype), fp32 accumulation of exact products.
    half_query = query.dtype == keys.dtype and query.dtype in (torch.float16, torch.bfloat16)
    terms = {torch.float16: 2, torch.bfloat16: 3}.get(keys.dtype, 0)
    with _device_of(query):
        plan = _cuda_plan(mod, query, keys.shape[0], k, 1 if half_query else terms)
        if plan is None:  # k too large for the kernel's shared memory
            return None
        # Both searches and the merge take the query as float32 (exact for a 16-bit query).
        q = query.detach().float().contiguous()
        if not plan[3]:
            terms_in = None
        elif half_query:
            terms_in = query.detach().contiguous()[None]
        else:
            terms_in = query_terms(q, keys.dtype)
        _launch_cuda(
            mod, q, terms_in, None, None, keys, values, attn_query, exclude, k, k, temperature,
            outputs, plan,
        )  # fmt: skip
    return outputs


def _device_of(t: Tensor):
    """torch.cuda.device(t.device) for a CUDA tensor (DLPack exports only from the current
    device), else a no-op context."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


if _C is not None and getattr(_C, "with_cuda", False):

    @_fused_retrieve_attend.register_kernel("cuda")
    def _fused_retrieve_attend_cuda(
        query: Tensor,
        keys: Tensor,
        values: Tensor,
        k: int,
        attn_query: Optional[Tensor],
        temperature: float,
        exclude: Optional[Tensor],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        check_retrieve_attend_args(query, keys, values, k, attn_query, temperature, exclude)
        args = (query, keys, values, k, attn_query, temperature, exclude)
        out = _cuda_retrieve_attend(_C, *args) if cuda_kernel_enabled() else None
        return _reference_body(*args) if out is None else out


@_fused_retrieve_attend.register_fake
def _fused_retrieve_attend_fake(query, keys, values, k, attn_query, temperature, exclude):
    check_retrieve_attend_args(
        query, keys, values, k, attn_query, temperature, exclude, check_value=False
    )
    return _empty_outputs(query, keys, values, k, attn_query)


def _setup_context(ctx, inputs, output):
    query, keys, values, _k, attn_query, temperature, _exclude = inputs
    _out, weights, indices, _scores = output
    ctx.save_for_backward(query, keys, values, attn_query, indices, weights)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(indices)


def _backward(ctx, g_output, g_weights, _g_indices, g_scores):
    need_q, need_k, need_v, _, need_aq, _, _ = ctx.needs_input_grad
    g_q, g_k, g_v, g_aq = _selected_rows_grads(
        ctx, (need_q, need_k, need_v, need_aq), g_output, g_weights, g_scores
    )
    return g_q, g_k, g_v, None, g_aq, None, None


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
) -> RetrieveAttend:
    """Exact top-k retrieval by inner product, fused with attention over the retrieved values.

    query [B, d], keys [N, d], values [N, dv]: float32, float16, bfloat16 (float64 for gradcheck);
    keys and values may differ in dtype. exclude [B, E] int64 lists rows query b must not select
    (-1 = padding). attn_query [B, H, dv] switches the attention logits from the scores to
    attn_query . values. Returns RetrieveAttend(output [B, H, dv], weights [B, H, k],
    indices [B, k] int64, scores [B, k]), float32 (float64 if any input is float64).
    Ties go to the lower row; NaN scores rank below every number. Scores are float32 arithmetic
    with subnormals honoured (never flushed to zero) at every CPU SIMD level, whatever the
    caller's flush-to-zero mode (torch.set_flush_denormal). Differentiable in query, keys, values
    and attn_query through the selected rows. See DESIGN.md for the full contract.
    """
    check_retrieve_attend_args(query, keys, values, k, attn_query, temperature, exclude)
    return RetrieveAttend(
        *torch.ops.reco.fused_retrieve_attend(
            query, keys, values, k, attn_query, torch.sym_float(temperature), exclude
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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # Default body (CPU, and CUDA where the kernel cannot take the call): the reference.
    check_retrieve_attend_args(query, keys, values, k, attn_query, temperature, exclude)
    check_int8_args(query, codes, scales, keys, k, candidates)
    return _int8_reference_body(
        query, codes, scales, keys, values, k, candidates, attn_query, temperature, exclude
    )


def _int8_reference_body(
    query, codes, scales, keys, values, k, candidates, attn_query, temperature, exclude
):
    r = reference.retrieve_attend_int8(
        query,
        codes,
        scales,
        keys,
        values,
        k,
        candidates,
        attn_query=attn_query,
        temperature=temperature,
        exclude=exclude,
    )
    return _owned(r)


if _C is not None:

    @_fused_retrieve_attend_int8.register_kernel("cpu")
    def _fused_retrieve_attend_int8_cpu(
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
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # The coarse search in reco._C (AVX512-VNNI where available), the exact re-rank of the
        # B x candidates rows in torch.
        check_retrieve_attend_args(query, keys, values, k, attn_query, temperature, exclude)
        check_int8_args(query, codes, scales, keys, k, candidates)
        if emulated_cuda() is not None:
            args = (query, codes, scales, keys, values, k, candidates, attn_query, temperature)
            emulated = _cuda_retrieve_attend_int8(_C_emu, *args, exclude)
            if emulated is not None:
                return emulated
        B = query.shape[0]
        rows = torch.empty(B, candidates, dtype=torch.int64)
        coarse = torch.empty(B, candidates, dtype=torch.float32)
        _C.coarse_int8(
            reference.quantize_rows(query)[0],
            _unit_inner_stride(codes.detach()),
            scales.detach().contiguous(),
            None if exclude is None else exclude.contiguous(),
            candidates,
            rows,
            coarse,
            torch.get_num_threads(),
        )
        r = reference.rerank_attend(query, keys, values, rows, rows < 0, k, attn_query, temperature)
        return _owned(r)


@_fused_retrieve_attend_int8.register_fake
def _fused_retrieve_attend_int8_fake(
    query, codes, scales, keys, values, k, candidates, attn_query, temperature, exclude
):
    check_retrieve_attend_args(
        query, keys, values, k, attn_query, temperature, exclude, check_value=False
    )
    check_int8_args(query, codes, scales, keys, k, candidates)
    return _empty_outputs(query, keys, values, k, attn_query)


def _cuda_retrieve_attend_int8(
    mod, query, codes, scales, keys, values, k, candidates, attn_query, temperature, exclude
):  # fmt: skip
    """The CUDA path of fused_retrieve_attend_int8 through mod (see _cuda_retrieve_attend), or
    None where its kernels cannot take the call."""
    B, d = query.shape
    codes = codes if codes.stride(1) == 1 else codes.contiguous()
    if (
        _out_dtype(query, keys, values, attn_query) != torch.float32
        or d % 16 != 0
        or codes.data_ptr() % 16 != 0
        or codes.stride(0) % 16 != 0
    ):
        return None
    outputs = _empty_outputs(query, keys, values, k, attn_query)
    if B == 0:
        return outputs
    with _device_of(query):
        plan = _cuda_plan(mod, query, keys.shape[0], candidates, 1)
        if plan is None or not plan[3]:  # more candidates than the tensor-core list holds
            return None
        q = query.detach().float().contiguous()
        codes, scales = codes.detach(), scales.detach().contiguous()
        q_codes = reference.quantize_rows(q)[0][None]
        _launch_cuda(
            mod, q, q_codes, codes, scales, keys, values, attn_query, exclude, k, candidates,
            temperature, outputs, plan,
        )  # fmt: skip
    return outputs


if _C is not None and getattr(_C, "with_cuda", False):

    @_fused_retrieve_attend_int8.register_kernel("cuda")
    def _fused_retrieve_attend_int8_cuda(
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
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        check_retrieve_attend_args(query, keys, values, k, attn_query, temperature, exclude)
        check_int8_args(query, codes, scales, keys, k, candidates)
        args = (query, codes, scales, keys, values, k, candidates, attn_query, temperature, exclude)
        out = _cuda_retrieve_attend_int8(_C, *args) if cuda_kernel_enabled() else None
        return _int8_reference_body(*args) if out is None else out


def _setup_context_int8(ctx, inputs, output):
    query, _codes, _scales, keys, values, _k, _c, attn_query, temperature, _exclude = inputs
    _out, weights, indices, _scores = output
    ctx.save_for_backward(query, keys, values, attn_query, indices, weights)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(indices)


def _backward_int8(ctx, g_output, g_weights, _g_indices, g_scores):
    need_q, _, _, need_k, need_v, _, _, need_aq, _, _ = ctx.needs_input_grad
    g_q, g_k, g_v, g_aq = _selected_rows_grads(
        ctx, (need_q, need_k, need_v, need_aq), g_output, g_weights, g_scores
    )
    return g_q, None, None, g_k, g_v, None, None, g_aq, None, None


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
    check_retrieve_attend_args(query, keys, values, k, attn_query, temperature, exclude)
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
            torch.sym_float(temperature),  # a SymFloat under torch.compile stays symbolic
            exclude,
        )
    )
