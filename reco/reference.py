"""Pure-torch reference of reco's ops: the test oracle, and the fallback where no kernel exists.

It follows the contract in DESIGN.md literally and favours clarity over speed; it scores the keys
in chunks so that it also runs on memories far larger than one B x N score matrix.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class RetrieveAttend(NamedTuple):
    """Result of `fused_retrieve_attend`.

    output  [B, H, dv]  float32 (float64 if any input is float64)
    weights [B, H, k]   attention weights, summing to 1 over k
    indices [B, k]      int64 rows of keys, best first
    scores  [B, k]      query . keys[indices], same dtype as output
    """

    output: Tensor
    weights: Tensor
    indices: Tensor
    scores: Tensor


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any given tensor is float64, else float32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


# Rank classes, best first: a real score (-inf included), then NaN, then excluded rows.
_REAL, _NAN, _EXCLUDED = 0, 1, 2


def select_top(scores: Tensor, rows: Tensor, cls: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k best candidates per query in THE selection order, the one function that writes it
    (the kernels' is csrc/include/reco/order.h): lexicographic in (class, -score, row), the
    classes being a number (-inf included), NaN, then excluded or empty. So: higher score first,
    ties to the lower row, NaN below every number, NaNs by ascending row."""
    # Three stable sorts, least significant key first.
    order = torch.sort(rows, dim=1, stable=True)[1]
    s_key = torch.where(torch.isnan(scores), -torch.inf, scores).gather(1, order)
    order = order.gather(1, torch.sort(s_key, dim=1, descending=True, stable=True)[1])
    order = order.gather(1, torch.sort(cls.gather(1, order), dim=1, stable=True)[1])[:, :k]
    return scores.gather(1, order), rows.gather(1, order), cls.gather(1, order)


def merge_topk(scores: Tensor, rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Merges candidate lists (e.g. per-shard top-k with global row ids) [B, M] into the top-k in
    the contract's order. Returns (rows int64 [B, k], scores [B, k])."""
    if rows.shape != scores.shape or rows.shape[1] < k:
        raise ValueError(f"need [B, M >= k={k}] candidates, got {tuple(rows.shape)}")
    cls = torch.where(torch.isnan(scores), _NAN, _REAL)
    best_s, best_i, _ = select_top(scores, rows, cls, k)
    return best_i, best_s


def selectable_rows(N: int, exclude: Tensor | None, allow: Tensor | None) -> Tensor:
    """Per query, the rows it may select: allowed (allow [N] bool, None = all) and not in
    exclude[b] (-1 = padding). int64 [B] on the CPU ([1] without exclude)."""
    allowed = torch.tensor(N) if allow is None else allow.sum().cpu()
    if exclude is None or exclude.shape[1] == 0:
        return allowed.reshape(1)
    rows = exclude.sort(1).values
    distinct = rows >= 0
    distinct[:, 1:] &= rows[:, 1:] != rows[:, :-1]
    if allow is not None:
        distinct &= allow[rows.clamp(min=0)]
    return allowed - distinct.sum(1).cpu()


def short_k_error(k: int, N: int, exclude: Tensor | None, allow: Tensor | None) -> ValueError:
    """The error for a k above some query's selectable rows, naming the first such query and its
    count, as the CPU kernel does."""
    counts = selectable_rows(N, exclude, allow)
    short = (counts < k).nonzero()
    b = int(short[0]) if short.numel() else 0
    allowed = N if allow is None else int(allow.sum())
    excluded = 0
    if exclude is not None and exclude.shape[1]:
        excluded = int(exclude[b][exclude[b] >= 0].unique().numel())
    return ValueError(
        f"k={k} exceeds the {int(counts[min(b, counts.numel() - 1)])} selectable rows of query "
        f"{b} (N={N}, {allowed} allowed, {excluded} excluded)"
    )


def _select_chunked(
    score,
    B: int,
    N: int,
    k: int,
    exclude: Tensor | None,
    chunk: int,
    like: Tensor,
    allow: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The k best (scores, rows, classes) per query of score(n0, n1) -> [B, n1 - n0] over rows
    0..N-1, chunk by chunk, in the contract's order; excluded rows and rows with allow False rank
    last (class _EXCLUDED). `like` gives the scores' dtype and device. ValueError for an exclude
    value out of range."""
    if exclude is not None and bool(((exclude < -1) | (exclude >= N)).any()):
        raise ValueError(f"exclude holds values that are neither rows of keys (N={N}) nor -1")
    best_s = like.new_empty(B, 0)
    best_i = torch.empty(B, 0, dtype=torch.int64, device=like.device)
    best_c = torch.empty(B, 0, dtype=torch.int64, device=like.device)
    for n0 in range(0, N, chunk):
        s = score(n0, min(N, n0 + chunk))
        rows = torch.arange(n0, n0 + s.shape[1], device=like.device).expand(B, -1)
        cls = torch.where(torch.isnan(s), _NAN, _REAL)
        if exclude is not None:
            hit = (rows.unsqueeze(-1) == exclude.unsqueeze(1)).any(-1)
            cls = torch.where(hit, _EXCLUDED, cls)
        if allow is not None:
            cls = torch.where(allow[n0 : n0 + s.shape[1]], cls, _EXCLUDED)
        best_s, best_i, best_c = select_top(
            torch.cat([best_s, s], 1), torch.cat([best_i, rows], 1), torch.cat([best_c, cls], 1), k
        )
    return best_s, best_i, best_c


def search(
    query: Tensor,
    keys: Tensor,
    k: int,
    exclude: Tensor | None = None,
    chunk: int = 1 << 16,
    allow: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact top-k rows of keys by inner product with each query.

    Order: larger score first, equal scores to the lower row, NaN below every number; excluded
    rows (exclude[b], -1 = padding) and rows with allow [N] False never.
    Returns (indices int64 [B, k], scores [B, k]).
    """
    ct = compute_dtype(query, keys)
    q = query.to(ct)
    N = keys.shape[0]
    best_s, best_i, best_c = _select_chunked(
        lambda n0, n1: q @ keys[n0:n1].to(ct).T, q.shape[0], N, k, exclude, chunk, q, allow
    )
    if best_i.shape[1] < k or bool((best_c == _EXCLUDED).any()):
        raise short_k_error(k, N, exclude, allow)
    return best_i, best_s


def attend(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    indices: Tensor,
    attn_query: Tensor | None = None,
    temperature: float = 1.0,
) -> RetrieveAttend:
    """Attention over the given rows; differentiable in query, keys, values and attn_query.

    Without attn_query, H = 1 and the logits are the scores query . keys[indices]; with
    attn_query [B, H, dv] they are attn_query[b, h] . values[indices[b, j]]. Logits are divided by
    temperature, softmaxed over the k rows, and weight values[indices] into output [B, H, dv].
    """
    ct = compute_dtype(query, keys, values, attn_query)
    k_sel = keys[indices].to(ct)  # [B, k, d]
    v_sel = values[indices].to(ct)  # [B, k, dv]
    scores = torch.einsum("bd,bkd->bk", query.to(ct), k_sel)
    return attend_rows(scores, v_sel, indices, attn_query, temperature)


def attend_rows(
    scores: Tensor,
    v_sel: Tensor,
    indices: Tensor,
    attn_query: Tensor | None = None,
    temperature: float = 1.0,
) -> RetrieveAttend:
    """`attend` on rows already gathered: scores [B, k] and their values v_sel [B, k, dv]."""
    if attn_query is None:
        logits = scores.unsqueeze(1)
    else:
        logits = torch.einsum("bhd,bkd->bhk", attn_query.to(v_sel.device, v_sel.dtype), v_sel)
    weights = torch.softmax(logits / temperature, dim=-1)
    output = torch.einsum("bhk,bkd->bhd", weights, v_sel)
    return RetrieveAttend(output, weights, indices, scores)


def fused_retrieve_attend(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    k: int,
    *,
    attn_query: Tensor | None = None,
    temperature: float = 1.0,
    exclude: Tensor | None = None,
    allow: Tensor | None = None,
) -> RetrieveAttend:
    """Reference of `reco.fused_retrieve_attend`: `search`, then `attend` on the selected rows."""
    with torch.no_grad():
        indices, _ = search(query, keys, k, exclude, allow=allow)
    return attend(query, keys, values, indices, attn_query, temperature)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: codes int8 [R, d] in [-127, 127] and scales float32 [R] with
    x ~= codes * scales[:, None]; scale = max |x_row| / 127 (1 for an all-zero row). Rows with a
    non-finite element get scale NaN (their coarse scores are NaN)."""
    x = x.detach().float()
    amax = x.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    codes = torch.round(x / scales[:, None]).clamp_(-127, 127)
    codes = torch.where(torch.isfinite(codes), codes, 0.0).to(torch.int8)
    scales = torch.where(torch.isfinite(amax), scales, torch.full_like(scales, torch.nan))
    return codes, scales


def coarse_scores(query_codes: Tensor, codes: Tensor, scales: Tensor) -> Tensor:
    """float32(query_codes . codes[n]) * scales[n] in float32: the int8 search's coarse score
    (the query's own scale, a positive constant per query, left out). The dot product is exact:
    |sum| <= 127^2 d stays below 2^53."""
    dots = query_codes.double() @ codes.double().T
    return dots.float() * scales.float()


def retrieve_attend_int8(
    query: Tensor,
    codes: Tensor,
    scales: Tensor,
    keys: Tensor,
    values: Tensor,
    k: int,
    candidates: int,
    *,
    attn_query: Tensor | None = None,
    temperature: float = 1.0,
    exclude: Tensor | None = None,
    chunk: int = 1 << 16,
    allow: Tensor | None = None,
) -> RetrieveAttend:
    """Reference of `reco.fused_retrieve_attend_int8`: the `candidates` rows of best coarse score
    (`coarse_scores` of the int8-quantised query against codes; the contract's order: ties to the
    lower row, NaN last, excluded and disallowed rows never), re-scored exactly against keys; the
    k best of them (same order) are attended as in `attend`."""
    with torch.no_grad():
        q_codes, _ = quantize_rows(query)
        _, best_i, best_c = _select_chunked(
            lambda n0, n1: coarse_scores(q_codes, codes[n0:n1], scales[n0:n1]),
            query.shape[0],
            codes.shape[0],
            candidates,
            exclude,
            chunk,
            torch.empty(0, device=query.device),
            allow,
        )
    return rerank_attend(
        query, keys, values, best_i, best_c == _EXCLUDED, k, attn_query, temperature, exclude, allow
    )


def rerank_attend(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    rows: Tensor,
    unusable: Tensor,
    k: int,
    attn_query: Tensor | None = None,
    temperature: float = 1.0,
    exclude: Tensor | None = None,
    allow: Tensor | None = None,
) -> RetrieveAttend:
    """The exact re-rank of fused_retrieve_attend_int8: candidate rows [B, c] (best coarse score
    first; `unusable` [B, c] marks excluded or empty slots, which come last) re-scored exactly
    against keys; the k best in the contract's order are attended as in `attend`. exclude and
    allow only name the count in the error where fewer than k are usable."""
    with torch.no_grad():
        if rows.shape[1] < k or bool(unusable[:, :k].any()):
            raise short_k_error(k, keys.shape[0], exclude, allow)
        rows = torch.where(unusable, 0, rows)
        ct = compute_dtype(query, keys)
        exact = torch.einsum("bd,bkd->bk", query.to(ct), keys[rows].to(ct))
        cls = torch.where(unusable, _EXCLUDED, torch.where(exact.isnan(), _NAN, _REAL))
        _, indices, _ = select_top(exact, rows, cls, k)
    return attend(query, keys, values, indices, attn_query, temperature)
