"""CUDA kernels of reco's ops (reco._C's retrieve_attend_cuda), and the launch path they share
with the emulation (`emulated`, the same code through reco._C_emu on CPU tensors).

The kernels have not yet been validated on a GPU, so CUDA tensors run the reference unless
RECO_CUDA_KERNEL=1 opts in (cuda_kernel_enabled).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from .. import reference
from ._common import (
    allow_bytes,
    empty_outputs,
    empty_search_outputs,
    out_dtype,
    reference_int8,
    reference_retrieve_attend,
    reference_search,
    unit_inner_stride,
)
from ._compiled import _C


def query_terms(query: Tensor, dtype: torch.dtype) -> Tensor:
    """The query as [T, B, d] terms of the 16-bit `dtype` whose sum is the query scaled per row by
    a power of two, to about float32 precision: the tensor-core search multiplies each term by
    16-bit keys exactly and accumulates in float32.

    float16 (T = 2): each row is scaled so that its largest finite magnitude lies in
    [2^14, 2^15), which keeps the second term clear of float16's subnormals; the error of a row is
    at most 2^-22 of that element. bfloat16 (T = 3, no scaling): the error is at most 2^-24 of each
    element. A term that would be inf - inf is 0, so infinite elements score as they do in float32.
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


def cuda_kernel_enabled() -> bool:
    """The CUDA kernel is compiled in but has not yet been validated on a GPU, so CUDA tensors
    run the reference unless RECO_CUDA_KERNEL=1 opts in."""
    return bool(getattr(_C, "with_cuda", False)) and os.environ.get("RECO_CUDA_KERNEL") == "1"


def device_of(t: Tensor):
    """torch.cuda.device(t.device) for a CUDA tensor (DLPack exports only from the current
    device), else a no-op context."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def plan(mod, query: Tensor, rows: int, k: int, terms: int):
    """(splits, pow2, queries, mma) of mod.cuda_plan, or None where the kernel cannot take k."""
    if k > mod.cuda_max_candidates:
        return None
    ok, splits, pow2, queries, mma = mod.cuda_plan(
        query.shape[0], rows, query.shape[1], k, terms, query.device.index or 0
    )
    return (splits, pow2, queries, mma) if ok else None


def launch(
    mod, q, terms, codes, scales, keys, values, attn_query, exclude, allow, k, candidates,
    temperature, outputs, plan,
) -> None:  # fmt: skip
    """mod.retrieve_attend_cuda (reco._C, or reco._C_emu on CPU tensors) on the current stream,
    writing `outputs` (output, weights, indices, scores; output and weights None without values):
    the query q as float32, its 16-bit or int8 terms for the tensor-core search (or None), the int8
    codes and scales (or None); the workspace of `candidates` rows per split comes from torch's
    caching allocator (stream-ordered, CUDA-graph safe)."""
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
        unit_inner_stride(keys.detach()),
        None if values is None else unit_inner_stride(values.detach()),
        None if attn_query is None else attn_query.detach().float().contiguous(),
        None if exclude is None else exclude.contiguous(),
        allow_bytes(allow),
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


def _search_inputs(mod, query: Tensor, keys: Tensor, k: int):
    """(plan, q, terms) for the search of `query` in `keys` (None where the kernel cannot take k):
    against 16-bit keys the tensor-core search takes the query as 16-bit terms of their dtype (the
    query itself when it has that dtype), fp32 accumulation of exact products."""
    half_query = query.dtype == keys.dtype and query.dtype in (torch.float16, torch.bfloat16)
    count = {torch.float16: 2, torch.bfloat16: 3}.get(keys.dtype, 0)
    p = plan(mod, query, keys.shape[0], k, 1 if half_query else count)
    if p is None:  # k too large for the kernel's shared memory
        return None
    # Both searches and the merge take the query as float32 (exact for a 16-bit query).
    q = query.detach().float().contiguous()
    if not p[3]:
        terms = None
    elif half_query:
        terms = query.detach().contiguous()[None]
    else:
        terms = query_terms(q, keys.dtype)
    return p, q, terms


def retrieve_attend(mod, query, keys, values, k, attn_query, temperature, exclude, allow):
    """fused_retrieve_attend through mod (reco._C on CUDA tensors, reco._C_emu on CPU ones), or
    None where its kernels cannot take the call (the caller falls back)."""
    if out_dtype(query, keys, values, attn_query) != torch.float32:
        return None
    outputs = empty_outputs(query, keys, values, k, attn_query)
    if query.shape[0] == 0:
        return outputs
    with device_of(query):
        found = _search_inputs(mod, query, keys, k)
        if found is None:
            return None
        p, q, terms = found
        launch(mod, q, terms, None, None, keys, values, attn_query, exclude, allow, k, k,
               temperature, outputs, p)  # fmt: skip
    return outputs


def search(mod, query, keys, k, exclude, allow):
    """search through mod (see retrieve_attend): the same kernels without values or attention."""
    if out_dtype(query, keys) != torch.float32:
        return None
    indices, scores = empty_search_outputs(query, keys, k)
    if query.shape[0] == 0:
        return indices, scores
    with device_of(query):
        found = _search_inputs(mod, query, keys, k)
        if found is None:
            return None
        p, q, terms = found
        launch(mod, q, terms, None, None, keys, None, None, exclude, allow, k, k, 1.0,
               (None, None, indices, scores), p)  # fmt: skip
    return indices, scores


def retrieve_attend_int8(
    mod, query, codes, scales, keys, values, k, candidates, attn_query, temperature, exclude, allow
):  # fmt: skip
    """fused_retrieve_attend_int8 through mod (see retrieve_attend), or None where its kernels
    cannot take the call."""
    B, d = query.shape
    codes = codes if codes.stride(1) == 1 else codes.contiguous()
    if (
        out_dtype(query, keys, values, attn_query) != torch.float32
        or d % 16 != 0
        or codes.data_ptr() % 16 != 0
        or codes.stride(0) % 16 != 0
    ):
        return None
    outputs = empty_outputs(query, keys, values, k, attn_query)
    if B == 0:
        return outputs
    with device_of(query):
        p = plan(mod, query, keys.shape[0], candidates, 1)
        if p is None or not p[3]:  # more candidates than the tensor-core list holds
            return None
        q = query.detach().float().contiguous()
        codes, scales = codes.detach(), scales.detach().contiguous()
        q_codes = reference.quantize_rows(q)[0][None]
        launch(mod, q, q_codes, codes, scales, keys, values, attn_query, exclude, allow, k,
               candidates, temperature, outputs, p)  # fmt: skip
    return outputs


def _fused_retrieve_attend(query, keys, values, k, attn_query, temperature, exclude, allow):
    args = (query, keys, values, k, attn_query, temperature, exclude, allow)
    out = retrieve_attend(_C, *args) if cuda_kernel_enabled() else None
    return reference_retrieve_attend(*args) if out is None else out


def _fused_retrieve_attend_int8(
    query, codes, scales, keys, values, k, candidates, attn_query, temperature, exclude, allow
):  # fmt: skip
    args = (query, codes, scales, keys, values, k, candidates, attn_query, temperature, exclude,
            allow)  # fmt: skip
    out = retrieve_attend_int8(_C, *args) if cuda_kernel_enabled() else None
    return reference_int8(*args) if out is None else out


def _search(query, keys, k, exclude, allow):
    out = search(_C, query, keys, k, exclude, allow) if cuda_kernel_enabled() else None
    return reference_search(query, keys, k, exclude, allow) if out is None else out


KERNELS: dict = {}
if _C is not None and getattr(_C, "with_cuda", False):
    KERNELS = {
        "fused_retrieve_attend": _fused_retrieve_attend,
        "fused_retrieve_attend_int8": _fused_retrieve_attend_int8,
        "search": _search,
    }

__all__ = ["KERNELS", "cuda_kernel_enabled", "query_terms"]
