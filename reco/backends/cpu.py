"""CPU kernels of reco's ops: reco._C's SIMD search + attention (and its int8 coarse search, with
the exact re-rank in torch). Under RECO_EMULATE_CUDA, calls go through the emulated CUDA path
first (`emulated`)."""

from __future__ import annotations

import torch

from .. import reference
from . import emulated
from ._common import allow_bytes, empty_outputs, empty_search_outputs, owned, unit_inner_stride
from ._compiled import _C


def _fused_retrieve_attend(query, keys, values, k, attn_query, temperature, exclude, allow):
    out = emulated.fused_retrieve_attend(
        query, keys, values, k, attn_query, temperature, exclude, allow
    )
    if out is not None:
        return out
    outputs = empty_outputs(query, keys, values, k, attn_query)
    if query.shape[0] == 0:
        return outputs
    ct = outputs[0].dtype
    _C.retrieve_attend(
        query.detach().to(ct).contiguous(),
        unit_inner_stride(keys.detach()),
        unit_inner_stride(values.detach()),
        None if attn_query is None else attn_query.detach().to(ct).contiguous(),
        None if exclude is None else exclude.contiguous(),
        allow_bytes(allow),
        k,
        float(temperature),
        *outputs,
        torch.get_num_threads(),
    )
    return outputs


def _search(query, keys, k, exclude, allow):
    out = emulated.search(query, keys, k, exclude, allow)
    if out is not None:
        return out
    indices, scores = empty_search_outputs(query, keys, k)
    if query.shape[0] == 0:
        return indices, scores
    _C.retrieve_attend(
        query.detach().to(scores.dtype).contiguous(),
        unit_inner_stride(keys.detach()),
        None,
        None,
        None if exclude is None else exclude.contiguous(),
        allow_bytes(allow),
        k,
        1.0,
        None,
        None,
        indices,
        scores,
        torch.get_num_threads(),
    )
    return indices, scores


def _fused_retrieve_attend_int8(
    query, codes, scales, keys, values, k, candidates, attn_query, temperature, exclude, allow
):  # fmt: skip
    args = (query, codes, scales, keys, values, k, candidates, attn_query, temperature, exclude,
            allow)  # fmt: skip
    out = emulated.fused_retrieve_attend_int8(*args)
    if out is not None:
        return out
    # The coarse search in reco._C (AVX512-VNNI where available), the exact re-rank of the
    # B x candidates rows in torch.
    B = query.shape[0]
    rows = torch.empty(B, candidates, dtype=torch.int64)
    coarse = torch.empty(B, candidates, dtype=torch.float32)
    _C.coarse_int8(
        reference.quantize_rows(query)[0],
        unit_inner_stride(codes.detach()),
        scales.detach().contiguous(),
        None if exclude is None else exclude.contiguous(),
        allow_bytes(allow),
        candidates,
        rows,
        coarse,
        torch.get_num_threads(),
    )
    r = reference.rerank_attend(
        query, keys, values, rows, rows < 0, k, attn_query, temperature, exclude, allow
    )
    return owned(r)


KERNELS: dict = {}
if _C is not None:
    KERNELS = {
        "fused_retrieve_attend": _fused_retrieve_attend,
        "fused_retrieve_attend_int8": _fused_retrieve_attend_int8,
        "search": _search,
    }
