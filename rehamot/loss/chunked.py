"""Retrieval losses for motion<->text dual encoders: SH, MH, DropTriple and InfoNCE, chunked.

Every core scores *local rows x global columns* (`rehamot.loss.pairs.Pairs`): the rows are the
B anchors this process owns, the columns the G candidates of the whole (gathered) batch.
Pure torch: gathering the columns is the objective's job (`rehamot.loss.objective`).

Conventions shared by every loss (S_ij = cos(motion_i, text_j); inputs are unit vectors, so
the dot product is the cosine):
- both directions are scored: motion i -> all captions j (S_ij) and caption i -> all
  motions j (S_ji); each anchor's positive score S_ii is taken from its own row pair
  (rows_m[i] . rows_t[i]), so with gathered columns its gradient stays local;
- a candidate j with the same motion id as anchor i (the positive included) is no negative
  and adds no term;
- DropTriple additionally *excludes* (never zeroes) j when cos(m_i, m_j) > theta_m or
  cos(t_i, t_j) > theta_t; intra-modal similarities carry no gradient;
- MH / DropTriple take the hardest remaining negative; ties go to the lowest global column;
  an anchor with no remaining negative contributes 0 (and still counts in the mean);
- scores and masks are computed in fp32 (fp64 inputs stay fp64) whatever the input dtype.

Memory: no chunked core holds a B x G matrix with autograd. MH / DropTriple pick each
anchor's hardest kept negative without grad, chunk by chunk, then recompute only the chosen
pairs with grad; SH and InfoNCE are custom autograd Functions that recompute each chunk's
scores in backward. The plain B x G formulations, the obviously-correct reference, live in
`rehamot.loss.dense`.

The search for each anchor's hardest kept negative, and the drop count, live in
`rehamot.loss.negative_search`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from rehamot.config import LOSS_NAMES
from rehamot.loss.negative_search import AUTO_CHUNK, chunk_width, column_chunks, hardest_kept_negatives
from rehamot.loss.pairs import (
    DropThresholds,
    LossTerms,
    Pairs,
    as_scale,
    block_masks,
    candidate_count,
    zero_count,
)

_ROW_BLOCK = 1024  # rows per block where (block x D) temporaries are made


# ----------------------------------------------------------------------------- SH (chunked)


def _hinge_margins(anchors: Tensor, block: Tensor, pos: Tensor, margin: float) -> Tensor:
    """(S - S_ii) + margin for one chunk, in place; forward and backward share the op order."""
    return (anchors @ block.T).sub_(pos[:, None]).add_(margin)


class _SumHingeChunked(torch.autograd.Function):
    """Per-anchor sum of hinges over all negatives, recomputing chunk scores in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        rows_m: Tensor,
        rows_t: Tensor,
        cols_m: Tensor,
        cols_t: Tensor,
        pos: Tensor,
        row_ids: Tensor,
        col_ids: Tensor,
        row_offset: int,
        margin: float,
        chunk_size: int,
    ) -> Tensor:
        per_anchor = torch.zeros_like(pos)
        row_index = _row_index(row_ids, row_offset)
        for start in column_chunks(cols_m.shape[0], chunk_size):
            stop = min(start + chunk_size, cols_m.shape[0])
            _, not_negative = block_masks(row_ids, row_index, col_ids, start, stop)
            for anchors, candidates in ((rows_m, cols_t), (rows_t, cols_m)):
                hinge = _hinge_margins(anchors, candidates[start:stop], pos, margin)
                per_anchor += hinge.clamp_min_(0).masked_fill_(not_negative, 0).sum(1)
        ctx.save_for_backward(rows_m, rows_t, cols_m, cols_t, pos, row_ids, col_ids)
        ctx.row_offset, ctx.margin, ctx.chunk_size = row_offset, margin, chunk_size
        return per_anchor

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_per_anchor: Tensor):  # type: ignore[override]
        rows_m, rows_t, cols_m, cols_t, pos, row_ids, col_ids = ctx.saved_tensors
        grad_rows_m, grad_rows_t = torch.zeros_like(rows_m), torch.zeros_like(rows_t)
        grad_cols_m, grad_cols_t = torch.zeros_like(cols_m), torch.zeros_like(cols_t)
        grad_pos = torch.zeros_like(pos)
        chunk_size, row_index = ctx.chunk_size, _row_index(row_ids, ctx.row_offset)
        for start in column_chunks(cols_m.shape[0], chunk_size):
            stop = min(start + chunk_size, cols_m.shape[0])
            _, not_negative = block_masks(row_ids, row_index, col_ids, start, stop)
            directions = (
                (rows_m, cols_t, grad_rows_m, grad_cols_t),
                (rows_t, cols_m, grad_rows_t, grad_cols_m),
            )
            for anchors, candidates, grad_anchors, grad_candidates in directions:
                block = candidates[start:stop]
                weight = _hinge_margins(anchors, block, pos, ctx.margin)
                # d hinge / d score is 1 where the hinge is active (> 0) on a negative
                weight = (weight > 0).masked_fill_(not_negative, False).to(anchors.dtype)
                weight *= grad_per_anchor[:, None]
                grad_anchors += weight @ block
                grad_candidates[start:stop] += weight.T @ anchors
                grad_pos -= weight.sum(1)
        return grad_rows_m, grad_rows_t, grad_cols_m, grad_cols_t, grad_pos, None, None, None, None, None


def sum_hinge_core(pairs: Pairs, *, margin: float = 0.2, chunk_size: int = AUTO_CHUNK,
                   count_drops: bool = True) -> LossTerms:
    """SH: sum over negatives j of [margin + S_ij - S_ii]+, in both directions."""
    p = pairs.checked()
    chunk_size = chunk_width(chunk_size, p.num_rows)
    pos = (p.rows_m * p.rows_t).sum(1)
    per_anchor = _SumHingeChunked.apply(
        p.rows_m, p.rows_t, p.cols_m, p.cols_t, pos, p.row_ids, p.col_ids, p.row_offset, float(margin), chunk_size
    )
    return LossTerms(per_anchor, zero_count(pos.device), candidate_count(p.row_ids, p.col_ids))


# ----------------------------------------------------------------------------- MH / DropTriple


class _ChosenHinges(torch.autograd.Function):
    """Per anchor, [margin + S(m_i, t_a) - S_ii]+ + [margin + S(t_i, m_b) - S_ii]+ for the chosen
    negatives a = index_mt[i], b = index_tm[i] (-1: none left, the term is 0).

    Autograd on index_select / mul / sum would hold about six (B or G) x D temporaries in
    backward: at B = 8,192, D = 1,024 they were most of the chunked loss's peak memory. This
    backward writes each input's gradient once, in row blocks, and when rows and columns are
    one tensor (a single process) writes one gradient for both.
    """

    @staticmethod
    def forward(ctx, rows_m: Tensor, rows_t: Tensor, cols_m: Tensor, cols_t: Tensor,  # type: ignore[override]
                index_mt: Tensor, index_tm: Tensor, margin: float) -> Tensor:
        pos = _row_dots(rows_m, rows_t)
        hinge_mt = _row_dots(rows_m, cols_t, index_mt).add_(margin).sub_(pos)
        hinge_tm = _row_dots(rows_t, cols_m, index_tm).add_(margin).sub_(pos)
        # clamp_min's gradient passes where its input >= 0; keep that rule exactly
        active_mt = (hinge_mt >= 0) & (index_mt >= 0)
        active_tm = (hinge_tm >= 0) & (index_tm >= 0)
        ctx.save_for_backward(rows_m, rows_t, cols_m, cols_t, index_mt.clamp_min(0), index_tm.clamp_min(0),
                              active_mt, active_tm)
        ctx.shared = rows_m is cols_m and rows_t is cols_t
        per_anchor = hinge_mt.clamp_min_(0).masked_fill_(index_mt < 0, 0)
        return per_anchor.add_(hinge_tm.clamp_min_(0).masked_fill_(index_tm < 0, 0))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        rows_m, rows_t, cols_m, cols_t, index_mt, index_tm, active_mt, active_tm = ctx.saved_tensors
        g_mt = grad * active_mt
        g_tm = grad * active_tm
        g_pos = (g_mt + g_tm)[:, None]
        # d/d rows_m: g_mt * t_a - (g_mt + g_tm) * t_i ; d/d t_a: g_mt * m_i (likewise for text)
        grad_rows_m = torch.mul(rows_t, g_pos).neg_()
        grad_rows_t = torch.mul(rows_m, g_pos).neg_()
        grad_cols_m, grad_cols_t = (grad_rows_m, grad_rows_t) if ctx.shared else (
            torch.zeros_like(cols_m), torch.zeros_like(cols_t))
        for lo in range(0, rows_m.shape[0], _ROW_BLOCK):
            hi = lo + _ROW_BLOCK
            grad_rows_m[lo:hi].addcmul_(cols_t.index_select(0, index_mt[lo:hi]), g_mt[lo:hi, None])
            grad_rows_t[lo:hi].addcmul_(cols_m.index_select(0, index_tm[lo:hi]), g_tm[lo:hi, None])
            grad_cols_t.index_add_(0, index_mt[lo:hi], rows_m[lo:hi] * g_mt[lo:hi, None])
            grad_cols_m.index_add_(0, index_tm[lo:hi], rows_t[lo:hi] * g_tm[lo:hi, None])
        if ctx.shared:
            return grad_rows_m, grad_rows_t, None, None, None, None, None
        return grad_rows_m, grad_rows_t, grad_cols_m, grad_cols_t, None, None, None


def _row_dots(anchors: Tensor, candidates: Tensor, index: Tensor | None = None) -> Tensor:
    """anchors[i] . candidates[index[i]] (candidates[i] without index), in row blocks."""
    out = anchors.new_empty(anchors.shape[0])
    for lo in range(0, anchors.shape[0], _ROW_BLOCK):
        hi = lo + _ROW_BLOCK
        block = candidates[lo:hi] if index is None else candidates.index_select(0, index[lo:hi].clamp_min(0))
        out[lo:hi] = torch.linalg.vecdot(anchors[lo:hi], block)
    return out


def drop_triple_core(pairs: Pairs, *, margin: float = 0.2, thresholds: DropThresholds | None,
                     chunk_size: int = AUTO_CHUNK, count_drops: bool = True, strategy: str = "auto") -> LossTerms:
    """DropTriple (MH when thresholds is None): hinge on the hardest kept negative.

    count_drops=False leaves `dropped` NOT_COUNTED (two products fewer); strategy: see
    `hardest_kept_negatives`."""
    p = pairs.checked()
    index_mt, index_tm, dropped, candidates = hardest_kept_negatives(
        p, thresholds=thresholds, chunk_size=chunk_size, count_drops=count_drops, strategy=strategy)
    per_anchor = _ChosenHinges.apply(p.rows_m, p.rows_t, p.cols_m, p.cols_t, index_mt, index_tm, float(margin))
    return LossTerms(per_anchor, dropped, candidates)


def max_hinge_core(pairs: Pairs, *, margin: float = 0.2, chunk_size: int = AUTO_CHUNK,
                   count_drops: bool = True) -> LossTerms:
    """MH (VSE++): hinge on the hardest negative, in both directions."""
    return drop_triple_core(pairs, margin=margin, thresholds=None, chunk_size=chunk_size)


def _row_index(row_ids: Tensor, row_offset: int) -> Tensor:
    return torch.arange(row_offset, row_offset + row_ids.shape[0], device=row_ids.device)


# ----------------------------------------------------------------------------- InfoNCE (chunked)


class _LogSumExpChunked(torch.autograd.Function):
    """Per-anchor log-denominators of both directions, recomputing chunk logits in backward.

    Columns sharing the anchor's motion id, other than the positive, are left out.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        rows_m: Tensor,
        rows_t: Tensor,
        cols_m: Tensor,
        cols_t: Tensor,
        scale: Tensor,
        row_ids: Tensor,
        col_ids: Tensor,
        row_offset: int,
        chunk_size: int,
    ) -> Tensor:
        num_rows = rows_m.shape[0]
        lse = rows_m.new_full((2, num_rows), float("-inf"))  # [motion->text, text->motion]
        row_index = _row_index(row_ids, row_offset)
        for start in column_chunks(cols_m.shape[0], chunk_size):
            stop = min(start + chunk_size, cols_m.shape[0])
            is_positive, not_negative = block_masks(row_ids, row_index, col_ids, start, stop)
            left_out = not_negative.logical_and_(is_positive.logical_not_())
            for direction, (anchors, candidates) in enumerate(((rows_m, cols_t), (rows_t, cols_m))):
                logits = (anchors @ candidates[start:stop].T).mul_(scale).masked_fill_(left_out, float("-inf"))
                lse[direction] = torch.logaddexp(lse[direction], torch.logsumexp(logits, dim=1))
        ctx.save_for_backward(rows_m, rows_t, cols_m, cols_t, scale, row_ids, col_ids, lse)
        ctx.row_offset, ctx.chunk_size = row_offset, chunk_size
        return lse.sum(0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_per_anchor: Tensor):  # type: ignore[override]
        rows_m, rows_t, cols_m, cols_t, scale, row_ids, col_ids, lse = ctx.saved_tensors
        grad_rows_m, grad_rows_t = torch.zeros_like(rows_m), torch.zeros_like(rows_t)
        grad_cols_m, grad_cols_t = torch.zeros_like(cols_m), torch.zeros_like(cols_t)
        grad_scale = torch.zeros_like(scale)
        chunk_size, row_index = ctx.chunk_size, _row_index(row_ids, ctx.row_offset)
        for start in column_chunks(cols_m.shape[0], chunk_size):
            stop = min(start + chunk_size, cols_m.shape[0])
            is_positive, not_negative = block_masks(row_ids, row_index, col_ids, start, stop)
            left_out = not_negative.logical_and_(is_positive.logical_not_())
            directions = (
                (rows_m, cols_t, grad_rows_m, grad_cols_t),
                (rows_t, cols_m, grad_rows_t, grad_cols_m),
            )
            for direction, (anchors, candidates, grad_anchors, grad_candidates) in enumerate(directions):
                block = candidates[start:stop]
                scores = anchors @ block.T
                # d lse / d logit = softmax over the kept columns, times the upstream grad
                weight = (scores * scale).sub_(lse[direction][:, None]).exp_().masked_fill_(left_out, 0)
                weight *= grad_per_anchor[:, None]
                grad_scale += torch.dot(weight.flatten(), scores.flatten())
                del scores
                weight *= scale
                grad_anchors += weight @ block
                grad_candidates[start:stop] += weight.T @ anchors
        return grad_rows_m, grad_rows_t, grad_cols_m, grad_cols_t, grad_scale, None, None, None, None


def info_nce_core(pairs: Pairs, *, scale: Tensor | float = 1 / 0.07, chunk_size: int = AUTO_CHUNK,
                  count_drops: bool = True) -> LossTerms:
    """InfoNCE: per anchor, the two directions' cross-entropies with logits scale * S.

    `scale` is 1 / temperature (a tensor to learn it); same-id columns other than the
    positive are removed from the denominators.
    """
    p = pairs.checked()
    chunk_size = chunk_width(chunk_size, p.num_rows)
    scale_t = as_scale(scale, p.rows_m)
    log_denominators = _LogSumExpChunked.apply(
        p.rows_m, p.rows_t, p.cols_m, p.cols_t, scale_t, p.row_ids, p.col_ids, p.row_offset, chunk_size
    )
    pos = (p.rows_m * p.rows_t).sum(1)
    per_anchor = log_denominators - 2 * scale_t * pos
    return LossTerms(per_anchor, zero_count(pos.device), candidate_count(p.row_ids, p.col_ids))


Core = Callable[..., LossTerms]
CHUNKED_CORES: dict[str, Core] = {
    "sh": sum_hinge_core,
    "mh": max_hinge_core,
    "droptriple": drop_triple_core,
    "infonce": info_nce_core,
}
assert tuple(CHUNKED_CORES) == LOSS_NAMES  # one core per configurable loss
