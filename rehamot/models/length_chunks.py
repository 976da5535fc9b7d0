"""Running a padded batch as length-sorted row groups, each cut to its own longest row.

Both encoders use it: padded positions never reach a real position's attention, so every
row's output is the same as in the whole padded batch; only the padded work goes. The batch
itself (which rows are each other's negatives) is untouched.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def auto_chunks(chunks: int, device: torch.device, cpu_default: int) -> int:
    """`chunks`, or for 0 (auto) `cpu_default` on CPU and 1 elsewhere.

    On CPU the padded work dominates a step, so length-sorted groups pay. On a GPU they cost far
    more than the padding they save: measured on an H200 (docs/benchmarks.md), chunks made a
    paper-size fine-tuned step 3.7x (batch 32) to 5.6x (batch 256) slower (not profiled
    further: more, smaller kernels, and new shapes every step).
    """
    if chunks:
        return chunks
    return cpu_default if device.type == "cpu" else 1


def run_by_length(mask: Tensor, chunks: int, run: Callable[[Tensor, int], Tensor]) -> Tensor:
    """`run(rows, n)` on `chunks` groups of rows sorted by length, rows back in input order.

    `mask` is (B, T), true at real positions; a row's length runs up to its last real position
    (so left padding is still right, it just saves nothing), and `n` is the group's longest
    (at least 1). The order is a function of the mask alone, so a replayed forward (GradCache)
    draws its dropout masks in the same order.
    """
    positions = torch.arange(mask.shape[1], device=mask.device)
    used = torch.where(mask.bool(), positions, -1).amax(dim=1) + 1
    order = torch.argsort(used, stable=True)
    groups = order.tensor_split(chunks)
    longest = torch.stack([used[g].max() for g in groups]).clamp(min=1).tolist()  # one device sync
    return torch.cat([run(rows, n) for rows, n in zip(groups, longest)])[torch.argsort(order)]
