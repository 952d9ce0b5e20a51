"""Tie-aware comparison of top-k results against an exact oracle (as FAISS's GPU tests do)."""

from __future__ import annotations

import torch


def exact_scores(query: torch.Tensor, keys: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """query . keys[indices] in float64 (inputs widened exactly)."""
    return torch.einsum("bd,bkd->bk", query.double(), keys.double()[indices])


def assert_topk_match(
    query: torch.Tensor,
    keys: torch.Tensor,
    got_indices: torch.Tensor,
    got_scores: torch.Tensor,
    want_indices: torch.Tensor,
    tol: float,
    exclude: torch.Tensor | None = None,
) -> None:
    """Checks a top-k result against an exact one, accepting swaps only between near-ties.

    - got scores are the true scores of got rows (within tol), sorted descending;
    - rows are distinct and never excluded;
    - position by position, the true score of the got row equals that of the wanted row within
      tol, and wherever the two rows differ, both scores lie within tol of each other (a tie).
    """
    assert got_indices.shape == want_indices.shape
    assert got_indices.dtype == torch.int64
    true_got = exact_scores(query, keys, got_indices)
    true_want = exact_scores(query, keys, want_indices)
    torch.testing.assert_close(got_scores.double(), true_got, atol=tol, rtol=0)
    assert bool((got_scores[:, 1:] <= got_scores[:, :-1] + tol).all()), "scores not descending"
    for b in range(got_indices.shape[0]):
        assert len(set(got_indices[b].tolist())) == got_indices.shape[1], "duplicate rows"
        if exclude is not None:
            banned = set(exclude[b].tolist()) - {-1}
            assert not banned & set(got_indices[b].tolist()), "an excluded row was selected"
    torch.testing.assert_close(true_got, true_want, atol=tol, rtol=0)
    differs = got_indices != want_indices
    if bool(differs.any()):
        gap = (true_got - true_want).abs()[differs]
        assert float(gap.max()) <= tol, "rows differ where scores do not tie"
