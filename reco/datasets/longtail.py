"""Long-tailed splits of balanced datasets (the ImageNet-LT / Places-LT recipe)."""

from __future__ import annotations

import numpy as np


def exponential_profile(classes: int, head: int = 1000, imbalance: float = 200.0) -> list[int]:
    """Images per class, head * imbalance^(-i / (classes - 1)) for the i-th class, rounded:
    the first class has `head`, the last head / imbalance. For 10 classes, head 1000 and ratio
    200: 1000, 555, 308, 171, 95, 53, 29, 16, 9, 5."""
    if classes < 2 or head < 1 or imbalance < 1:
        raise ValueError(
            f"need classes >= 2, head >= 1, imbalance >= 1; got {classes}, {head}, {imbalance}"
        )
    return [round(head * imbalance ** (-i / (classes - 1))) for i in range(classes)]


def long_tail_split(
    labels: np.ndarray, profile: list[int], seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Picks a long-tailed subset of a labelled set: the class order is shuffled by seed (which
    class is the head is random), then profile[i] random items of the i-th class in that order.
    Returns (subset indices, the items left out, per-class counts [C] of the subset)."""
    labels = np.asarray(labels)
    classes = int(labels.max()) + 1
    if len(profile) != classes:
        raise ValueError(f"profile has {len(profile)} entries for {classes} classes")
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    chosen = []
    counts = np.zeros(classes, dtype=np.int64)
    for rank, c in enumerate(order):
        idx = np.flatnonzero(labels == c)
        if len(idx) < profile[rank]:
            raise ValueError(f"class {c} has {len(idx)} items, the profile asks {profile[rank]}")
        chosen.append(rng.choice(idx, profile[rank], replace=False))
        counts[c] = profile[rank]
    subset = np.sort(np.concatenate(chosen))
    rest = np.setdiff1d(np.arange(len(labels)), subset)
    return subset, rest, counts
