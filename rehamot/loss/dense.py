"""Reference losses: the plain B x G formulations and a single-process entry point.

The chunked cores of `rehamot.loss.chunked` never hold a B x G matrix with autograd; the cores
here do, which makes them short and obviously correct. They are the reference the chunked
cores are tested against, the dense arm of the loss benchmarks, and what
`loss.implementation=dense` selects. `single_process_loss` scores one batch in one process
(rows == columns), with either implementation.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rehamot.config import LOSS_IMPLEMENTATIONS, REDUCTIONS, LossConfig
from rehamot.loss.chunked import (
    AUTO_CHUNK,
    CHUNKED_CORES,
    Core,
    DropThresholds,
    LossTerms,
    _as_scale,
    _check_core_inputs,
    _chunk_masks,
    _drop_masks,
    _upcast,
    _zero_count,
    drop_thresholds,
)

# ----------------------------------------------------------------------------- dense cores


def _dense_setup(
    rows_m: Tensor, rows_t: Tensor, cols_m: Tensor, cols_t: Tensor, row_ids: Tensor, col_ids: Tensor, row_offset: int
) -> tuple[Tensor, ...]:
    """Upcast inputs, full (B, G) scores of both directions, the positive mask and the negatives mask."""
    _check_core_inputs(rows_m, rows_t, cols_m, cols_t, row_ids, col_ids, row_offset)
    rows_m, rows_t, cols_m, cols_t = _upcast(rows_m, rows_t, cols_m, cols_t)
    is_positive, not_negative = _chunk_masks(row_ids, col_ids, row_offset, 0, cols_m.shape[0])
    return rows_m, rows_t, cols_m, cols_t, rows_m @ cols_t.T, rows_t @ cols_m.T, is_positive, ~not_negative


def dense_reference_sum_hinge_core(
    rows_m: Tensor, rows_t: Tensor, cols_m: Tensor, cols_t: Tensor,
    row_ids: Tensor, col_ids: Tensor, row_offset: int, *, margin: float = 0.2, chunk_size: int = 0
) -> LossTerms:
    """Reference SH: the whole B x G matrices with autograd (chunk_size is ignored)."""
    rows_m, rows_t, _, _, s_mt, s_tm, _, negative = _dense_setup(
        rows_m, rows_t, cols_m, cols_t, row_ids, col_ids, row_offset
    )
    pos = (rows_m * rows_t).sum(1, keepdim=True)
    per_anchor = 0
    for scores in (s_mt, s_tm):
        hinge = torch.relu(margin + scores - pos)
        per_anchor = per_anchor + torch.where(negative, hinge, torch.zeros_like(hinge)).sum(1)
    return LossTerms(per_anchor, _zero_count(s_mt.device), 2 * negative.sum())


def dense_reference_drop_triple_core(
    rows_m: Tensor, rows_t: Tensor, cols_m: Tensor, cols_t: Tensor,
    row_ids: Tensor, col_ids: Tensor, row_offset: int, *,
    margin: float = 0.2,
    thresholds: DropThresholds | None,
    chunk_size: int = 0,
) -> LossTerms:
    """Reference DropTriple / MH (thresholds=None) on whole B x G matrices."""
    rows_m, rows_t, cols_m, cols_t, s_mt, s_tm, _, negative = _dense_setup(
        rows_m, rows_t, cols_m, cols_t, row_ids, col_ids, row_offset
    )
    kept_mt = kept_tm = negative
    dropped = _zero_count(s_mt.device)
    if thresholds is not None:
        drop_mt, drop_tm = _drop_masks(rows_m, rows_t, cols_m, cols_t, thresholds, ~negative)
        kept_mt, kept_tm = negative & ~drop_mt, negative & ~drop_tm
        dropped = drop_mt.sum() + drop_tm.sum()
    pos = (rows_m * rows_t).sum(1)
    per_anchor = 0
    for scores, kept in ((s_mt, kept_mt), (s_tm, kept_tm)):
        hardest, _ = scores.masked_fill(~kept, float("-inf")).max(dim=1)  # first max on ties
        hinge = torch.relu(margin + hardest - pos)
        per_anchor = per_anchor + torch.where(kept.any(1), hinge, torch.zeros_like(hinge))
    return LossTerms(per_anchor, dropped, 2 * negative.sum())


def dense_reference_max_hinge_core(
    rows_m: Tensor, rows_t: Tensor, cols_m: Tensor, cols_t: Tensor,
    row_ids: Tensor, col_ids: Tensor, row_offset: int, *, margin: float = 0.2, chunk_size: int = 0
) -> LossTerms:
    return dense_reference_drop_triple_core(
        rows_m, rows_t, cols_m, cols_t, row_ids, col_ids, row_offset, margin=margin, thresholds=None
    )


def dense_reference_info_nce_core(
    rows_m: Tensor, rows_t: Tensor, cols_m: Tensor, cols_t: Tensor,
    row_ids: Tensor, col_ids: Tensor, row_offset: int, *,
    scale: Tensor | float = 1 / 0.07,
    chunk_size: int = 0,
) -> LossTerms:
    """Reference InfoNCE: logsumexp over whole B x G logits (same-id columns masked)."""
    rows_m, rows_t, _, _, s_mt, s_tm, is_positive, negative = _dense_setup(
        rows_m, rows_t, cols_m, cols_t, row_ids, col_ids, row_offset
    )
    scale_t = _as_scale(scale, s_mt)
    pos = (rows_m * rows_t).sum(1)
    per_anchor = 0
    for scores in (s_mt, s_tm):
        logits = (scale_t * scores).masked_fill(~(negative | is_positive), float("-inf"))
        per_anchor = per_anchor + torch.logsumexp(logits, dim=1) - scale_t * pos
    return LossTerms(per_anchor, _zero_count(s_mt.device), 2 * negative.sum())


DENSE_REFERENCE_CORES: dict[str, Core] = {
    "sh": dense_reference_sum_hinge_core,
    "mh": dense_reference_max_hinge_core,
    "droptriple": dense_reference_drop_triple_core,
    "infonce": dense_reference_info_nce_core,
}
CORES = {"chunked": CHUNKED_CORES, "dense": DENSE_REFERENCE_CORES}
assert tuple(CORES) == LOSS_IMPLEMENTATIONS


def loss_core(name: str, implementation: str = "chunked") -> Core:
    """The core for a loss name; implementation "dense" gives the reference."""
    if implementation not in CORES:
        raise ValueError(f"implementation must be one of {LOSS_IMPLEMENTATIONS}, got {implementation!r}")
    if name not in CORES[implementation]:
        raise ValueError(f"unknown loss {name!r}; choose one of {tuple(CHUNKED_CORES)}")
    return CORES[implementation][name]


# ----------------------------------------------------------------------------- single process


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
    motion_emb, text_emb = _upcast(motion_emb, text_emb)
    if motion_ids is None:
        motion_ids = torch.arange(num, device=motion_emb.device)
    motion_ids = motion_ids.to(motion_emb.device)
    terms = core(motion_emb, text_emb, motion_emb, text_emb, motion_ids, motion_ids, 0,
                 chunk_size=chunk_size, **kwargs)
    total = terms.per_anchor.sum()
    loss = total / num if reduction == "mean" else total
    if not return_stats:
        return loss
    return loss, {"loss_sum": total.detach(), "dropped": terms.dropped, "candidates": terms.candidates}
