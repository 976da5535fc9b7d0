"""Reference losses: the plain B x G formulations.

The chunked cores of `rehamot.loss.chunked` never hold a B x G matrix with autograd; the cores
here do, which makes them short and obviously correct. They are the reference the chunked
cores are tested against, the dense arm of the loss benchmarks, and what
`loss.implementation=dense` selects. chunk_size and count_drops are accepted for a common
signature and ignored: the dense cores always count the dropped pairs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rehamot.loss.pairs import DropThresholds, LossTerms, Pairs, as_scale, chunk_masks, drop_masks, zero_count


def _dense_setup(pairs: Pairs) -> tuple[Pairs, Tensor, Tensor, Tensor, Tensor]:
    """Checked pairs, full (B, G) scores of both directions, the positive mask and the negatives mask."""
    p = pairs.checked()
    is_positive, not_negative = chunk_masks(p, 0, p.num_cols)
    return p, p.rows_m @ p.cols_t.T, p.rows_t @ p.cols_m.T, is_positive, ~not_negative


def dense_reference_sum_hinge_core(pairs: Pairs, *, margin: float = 0.2, chunk_size: int = 0,
                                   count_drops: bool = True) -> LossTerms:
    """Reference SH: the whole B x G matrices with autograd (chunk_size is ignored)."""
    p, s_mt, s_tm, _, negative = _dense_setup(pairs)
    pos = (p.rows_m * p.rows_t).sum(1, keepdim=True)
    per_anchor = 0
    for scores in (s_mt, s_tm):
        hinge = torch.relu(margin + scores - pos)
        per_anchor = per_anchor + torch.where(negative, hinge, torch.zeros_like(hinge)).sum(1)
    return LossTerms(per_anchor, zero_count(s_mt.device), 2 * negative.sum())


def dense_reference_drop_triple_core(pairs: Pairs, *, margin: float = 0.2, thresholds: DropThresholds | None,
                                     chunk_size: int = 0, count_drops: bool = True) -> LossTerms:
    """Reference DropTriple / MH (thresholds=None) on whole B x G matrices."""
    p, s_mt, s_tm, _, negative = _dense_setup(pairs)
    kept_mt = kept_tm = negative
    dropped = zero_count(s_mt.device)
    if thresholds is not None:
        drop_mt, drop_tm = drop_masks(p, thresholds, ~negative)
        kept_mt, kept_tm = negative & ~drop_mt, negative & ~drop_tm
        dropped = drop_mt.sum() + drop_tm.sum()
    pos = (p.rows_m * p.rows_t).sum(1)
    per_anchor = 0
    for scores, kept in ((s_mt, kept_mt), (s_tm, kept_tm)):
        hardest, _ = scores.masked_fill(~kept, float("-inf")).max(dim=1)  # first max on ties
        hinge = torch.relu(margin + hardest - pos)
        per_anchor = per_anchor + torch.where(kept.any(1), hinge, torch.zeros_like(hinge))
    return LossTerms(per_anchor, dropped, 2 * negative.sum())


def dense_reference_max_hinge_core(pairs: Pairs, *, margin: float = 0.2, chunk_size: int = 0,
                                   count_drops: bool = True) -> LossTerms:
    return dense_reference_drop_triple_core(pairs, margin=margin, thresholds=None)


def dense_reference_info_nce_core(pairs: Pairs, *, scale: Tensor | float = 1 / 0.07, chunk_size: int = 0,
                                  count_drops: bool = True) -> LossTerms:
    """Reference InfoNCE: logsumexp over whole B x G logits (same-id columns masked)."""
    p, s_mt, s_tm, is_positive, negative = _dense_setup(pairs)
    scale_t = as_scale(scale, s_mt)
    pos = (p.rows_m * p.rows_t).sum(1)
    per_anchor = 0
    for scores in (s_mt, s_tm):
        logits = (scale_t * scores).masked_fill(~(negative | is_positive), float("-inf"))
        per_anchor = per_anchor + torch.logsumexp(logits, dim=1) - scale_t * pos
    return LossTerms(per_anchor, zero_count(s_mt.device), 2 * negative.sum())


DENSE_REFERENCE_CORES = {
    "sh": dense_reference_sum_hinge_core,
    "mh": dense_reference_max_hinge_core,
    "droptriple": dense_reference_drop_triple_core,
    "infonce": dense_reference_info_nce_core,
}
