"""Choices made on validation data, never on test: a class-stratified validation split carved
from the training images, a declared search space per method with the same number of trials for
every method, and paired intervals over seeds for the comparisons."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def stratified_holdout(
    labels: np.ndarray, pool: np.ndarray, per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(validation, remaining) indices: `per_class` random items of every class drawn from the
    indices `pool` (ImageNet-LT's recipe: a balanced validation set from training images outside
    the long-tailed subset). ValueError if a class has fewer than per_class + 1 items in pool."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    labels, pool = np.asarray(labels), np.asarray(pool)
    rng = np.random.default_rng([seed, 7919])
    chosen = []
    for c in np.unique(labels):
        items = pool[labels[pool] == c]
        if len(items) <= per_class:
            raise ValueError(
                f"class {c} has {len(items)} training items outside the long-tailed subset: "
                f"too few for a validation split of {per_class} per class"
            )
        chosen.append(rng.choice(items, per_class, replace=False))
    val = np.sort(np.concatenate(chosen))
    return val, np.setdiff1d(pool, val)


@dataclass
class SearchSpace:
    """Each method's declared search: `trials` configurations drawn (seeded, without
    replacement) from the grid of its values; every method gets the same number of trials.
    Steps are chosen by early stopping inside each trial (the best validation checkpoint, read
    every `eval_every` steps, stopping after `patience` reads without a gain). k applies to
    the methods that retrieve."""

    trials: int = 2
    lr: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    weight_decay: tuple[float, ...] = (1e-4, 0.05)
    k: tuple[int, ...] = (5, 10, 20)
    eval_every: int = 100
    patience: int | None = 4  # reads without a gain before a trial stops (None: never)

    def validate(self) -> None:
        if self.trials < 1:
            raise ValueError(f"search trials must be >= 1, got {self.trials}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}")
        for name in ("lr", "weight_decay", "k"):
            if not getattr(self, name):
                raise ValueError(f"search space {name} is empty")

    def grid(self, retrieves: bool) -> list[dict]:
        ks = self.k if retrieves else (None,)
        return [
            {"lr": lr, "weight_decay": wd, **({"k": k} if k is not None else {})}
            for lr in self.lr
            for wd in self.weight_decay
            for k in ks
        ]

    def draw(self, method: str, retrieves: bool, seed: int) -> list[dict]:
        """The trials of one method on one seed (at most the grid's size)."""
        grid = self.grid(retrieves)
        rng = np.random.default_rng([seed, sum(map(ord, method))])
        pick = rng.permutation(len(grid))[: self.trials]
        return [grid[i] for i in sorted(pick)]


@dataclass
class Selection:
    """What the search tried and chose: every trial's config, validation accuracy and best
    step; the chosen trial's index."""

    trials: list[dict] = field(default_factory=list)
    chosen: int = -1

    def add(self, config: dict, val_accuracy: float, best_step: int) -> None:
        self.trials.append({**config, "val_accuracy": val_accuracy, "best_step": best_step})
        # Ties go to the earlier trial, so the choice does not depend on float noise order.
        if self.chosen < 0 or val_accuracy > self.trials[self.chosen]["val_accuracy"]:
            self.chosen = len(self.trials) - 1

    def as_dict(self) -> dict:
        return {"trials": self.trials, "chosen": self.trials[self.chosen]}


def paired_interval(diffs: list[float] | np.ndarray, level: float = 0.95) -> dict[str, float]:
    """The paired t interval of the mean of per-seed differences: mean ± t_{n-1} * sd / sqrt(n).
    With one seed the interval is unbounded (NaN ends)."""
    from scipy import stats

    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError(f"diffs must be a non-empty 1-D list, got shape {d.shape}")
    mean = float(d.mean())
    if len(d) < 2:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "n": 1}
    half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": len(d)}
