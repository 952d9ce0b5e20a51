"""Helpers every device's kernels share: output allocation and the reference fallback."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .. import reference
from ..reference import RetrieveAttend, compute_dtype

_warned_devices: set = set()


def out_dtype(*tensors: Tensor | None) -> torch.dtype:
    return compute_dtype(*tensors)


def empty_outputs(query, keys, values, k, attn_query) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Uninitialised (output [B, H, dv], weights [B, H, k], indices [B, k], scores [B, k])."""
    ct = compute_dtype(query, keys, values, attn_query)
    B, dv = query.shape[0], values.shape[1]
    H = 1 if attn_query is None else attn_query.shape[1]
    return (
        query.new_empty((B, H, dv), dtype=ct),
        query.new_empty((B, H, k), dtype=ct),
        query.new_empty((B, k), dtype=torch.int64),
        query.new_empty((B, k), dtype=ct),
    )


def empty_search_outputs(query, keys, k) -> tuple[Tensor, Tensor]:
    """Uninitialised (indices [B, k] int64, scores [B, k])."""
    B = query.shape[0]
    ct = compute_dtype(query, keys)
    return query.new_empty((B, k), dtype=torch.int64), query.new_empty((B, k), dtype=ct)


def allow_bytes(allow: Tensor | None) -> Tensor | None:
    """The allow mask at the kernel boundary: contiguous bytes (1 = may be selected), or None."""
    return None if allow is None else allow.detach().contiguous().view(torch.uint8)


def unit_inner_stride(t: Tensor) -> Tensor:
    # The kernels accept any row stride (even 0, for expanded memories) but need unit inner stride.
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def warn_reference(device_type: str) -> None:
    if device_type not in _warned_devices:
        _warned_devices.add(device_type)
        warnings.warn(
            f"reco: no compiled kernel for device '{device_type}'; using the pure-torch "
            "reference (slower, same results)",
            stacklevel=5,
        )


def owned(r: RetrieveAttend) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A custom op may not return views of its inputs: fresh copies of the four results."""
    return r.output.clone(), r.weights.clone(), r.indices.clone(), r.scores.clone()


def reference_retrieve_attend(query, keys, values, k, attn_query, temperature, exclude, allow):
    warn_reference(query.device.type)
    r = reference.fused_retrieve_attend(
        query, keys, values, k, attn_query=attn_query, temperature=temperature, exclude=exclude,
        allow=allow,
    )  # fmt: skip
    return owned(r)


def reference_int8(query, codes, scales, keys, values, k, candidates, attn_query, temperature,
                   exclude, allow):  # fmt: skip
    r = reference.retrieve_attend_int8(
        query, codes, scales, keys, values, k, candidates,
        attn_query=attn_query, temperature=temperature, exclude=exclude, allow=allow,
    )  # fmt: skip
    return owned(r)


def reference_search(query, keys, k, exclude, allow) -> tuple[Tensor, Tensor]:
    warn_reference(query.device.type)
    with torch.no_grad():
        indices, scores = reference.search(query.detach(), keys.detach(), k, exclude, allow=allow)
    return indices.clone(), scores.clone()
