"""How many length-sorted row groups the towers run a batch as (both encoders use it)."""
from __future__ import annotations

import torch


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
