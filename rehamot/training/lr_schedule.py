"""Learning-rate schedules as multipliers of each param group's base lr (for LambdaLR)."""
from __future__ import annotations

import math
from typing import Callable, Sequence


def lr_multiplier(
    schedule: str,
    total_steps: int,
    warmup_steps: int = 0,
    decay_steps: Sequence[int] = (),
    decay_factor: float = 0.1,
) -> Callable[[int], float]:
    """Linear warm-up over `warmup_steps`, then constant, step decay or cosine to zero."""
    milestones = sorted(decay_steps)

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        if schedule == "step":
            return decay_factor ** sum(step >= m for m in milestones)
        if schedule == "cosine":
            span = max(1, total_steps - warmup_steps)
            progress = min(1.0, (step - warmup_steps) / span)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"unknown schedule {schedule!r}")

    return factor


def gated(factor: Callable[[int], float], open_at: int) -> Callable[[int], float]:
    """Zero until optimizer step `open_at` (a language model unfrozen after N steps)."""
    return lambda step: 0.0 if step < open_at else factor(step)
