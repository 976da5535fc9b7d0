"""The loss cores by name and implementation, and one loss over one batch in one process.

Training reaches a core through `loss_core` (the objective); tests and benchmarks score a whole
batch in one process through `single_process_loss`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rehamot.config import LOSS_IMPLEMENTATIONS, REDUCTIONS, LossConfig
from rehamot.loss.chunked import AUTO_CHUNK, CHUNKED_CORES, Core
from rehamot.loss.dense import DENSE_REFERENCE_CORES
from rehamot.loss.pairs import DropThresholds, Pairs, drop_thresholds, upcast

CORES = {"chunked": CHUNKED_CORES, "dense": DENSE_REFERENCE_CORES}
assert tuple(CORES) == LOSS_IMPLEMENTATIONS


def loss_core(name: str, implementation: str = "chunked") -> Core:
    """The core for a loss name; implementation "dense" gives the reference."""
    if implementation not in CORES:
        raise ValueError(f"implementation must be one of {LOSS_IMPLEMENTATIONS}, got {implementation!r}")
    if name not in CORES[implementation]:
        raise ValueError(f"unknown loss {name!r}; choose one of {tuple(CHUNKED_CORES)}")
    return CORES[implementation][name]


def single_process_loss(
    name: str,
    motion_emb: Tensor,
    text_emb: Tensor,
    *,
    motion_ids: Tensor | None = None,
    margin: float = 0.2,
    thresholds: DropThresholds | None = None,
    temperature: Tensor | float = 0.07,
    reduction: str = "mean",
    chunk_size: int = AUTO_CHUNK,
    implementation: str = "chunked",
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """One loss over one batch of unit embeddings (B, D), in one process.

    margin: SH / MH / DropTriple. thresholds: DropTriple's (default: those of the default
    `LossConfig`). temperature: InfoNCE's; a tensor receives a gradient. motion_ids: None
    means every pair is its own motion.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if motion_emb.ndim != 2 or motion_emb.shape != text_emb.shape:
        raise ValueError(
            f"expected two (B, D) embeddings of one shape, got {tuple(motion_emb.shape)} and "
            f"{tuple(text_emb.shape)}"
        )
    core = loss_core(name, implementation)
    if name == "infonce":
        scale = 1.0 / temperature if isinstance(temperature, Tensor) else 1.0 / float(temperature)
        kwargs: dict[str, object] = {"scale": scale}
    else:
        kwargs = {"margin": margin}
        if name == "droptriple":
            kwargs["thresholds"] = thresholds if thresholds is not None else drop_thresholds(LossConfig())
    num = motion_emb.shape[0]
    # Upcast once: rows and columns then share one fp32 tensor, so their gradients add up
    # in fp32 before the single cast back to the input dtype.
    motion_emb, text_emb = upcast(motion_emb, text_emb)
    if motion_ids is None:
        motion_ids = torch.arange(num, device=motion_emb.device)
    motion_ids = motion_ids.to(motion_emb.device)
    terms = core(Pairs.single(motion_emb, text_emb, motion_ids), chunk_size=chunk_size, **kwargs)
    total = terms.per_anchor.sum()
    loss = total / num if reduction == "mean" else total
    if not return_stats:
        return loss
    return loss, {"loss_sum": total.detach(), "dropped": terms.dropped, "candidates": terms.candidates}
