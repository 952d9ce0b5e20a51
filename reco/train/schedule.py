"""Learning-rate schedules: linear warmup then cosine decay.

The factor multiplies each param group's base lr. With W = warmup_steps, T = total_steps,
m = min_lr_ratio and s the scheduler step (0 before the first scheduler.step()):

    s < W:       (s + 1) / W                                       linear warmup, 1/W .. 1
    W <= s < T:  m + (1 - m) * 0.5 * (1 + cos(pi * (s - W) / (T - W)))   cosine, 1 .. m
    s >= T:      m                                                 constant

Warmup starts at 1/W rather than 0 so that the first optimizer step is not wasted at lr 0; the
price is that steps W - 1 and W both run at the full lr.
"""

from __future__ import annotations

import math

import torch

__all__ = ["cosine_warmup_factor", "cosine_with_warmup"]


def _check(warmup_steps: int, total_steps: int, min_lr_ratio: float) -> None:
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps <= warmup_steps:
        raise ValueError(
            f"total_steps must be > warmup_steps, got total_steps={total_steps}, "
            f"warmup_steps={warmup_steps}"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:  # also rejects nan
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")


def cosine_warmup_factor(
    step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> float:
    """The lr factor at scheduler step `step` (see the module docstring for the closed form)."""
    _check(warmup_steps, total_steps, min_lr_ratio)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return float(min_lr_ratio)
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying cosine_warmup_factor to every param group; call .step() once after
    each optimizer.step(). Its state_dict holds only the step count and lrs (the factor is a
    plain closure, which LambdaLR does not save), so a resumed run uses the arguments given here.
    """
    _check(warmup_steps, total_steps, min_lr_ratio)

    def factor(step: int) -> float:
        return cosine_warmup_factor(step, warmup_steps, total_steps, min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
