"""Retrieval losses for motion<->text dual encoders: SH, MH, DropTriple and InfoNCE.

Every loss is written as *local rows x global columns*: the rows are the B anchors this
process owns, the columns are the G candidates of the whole (gathered) batch, and
`row_offset` is the global column index of row 0 (so row i's positive is column
`row_offset + i`). A single process is the special case rows == columns, row_offset = 0.
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
`rehamot.loss.dense` (tests, benchmarks and `loss.implementation=dense`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from rehamot.config import LOSS_NAMES, THRESHOLD_MODES, LossConfig

AUTO_CHUNK = 0  # chunk_size 0: chunk_width picks the width from the number of rows

CHUNK_CELLS = 1 << 22  # ~4M cells: a chunk's scores, intra-modal sims and masks stay ~60 MB


class LossTerms(NamedTuple):
    """What a core returns for its B local anchors."""

    per_anchor: Tensor  # (B,) loss of each anchor, both directions added; carries grad
    dropped: Tensor  # 0-d int64: ordered (anchor, candidate) pairs removed by thresholds
    candidates: Tensor  # 0-d int64: ordered pairs eligible as negatives before thresholds


@dataclass(frozen=True)
class DropThresholds:
    """Cosine thresholds above which DropTriple drops a candidate, for each direction.

    Motion -> text (anchor motion i, candidate caption j): dropped when
    cos(m_i, m_j) > mt_motion or cos(t_i, t_j) > mt_text. Text -> motion likewise with the
    tm_* pair.
    """

    mt_motion: float
    mt_text: float
    tm_motion: float
    tm_text: float


def drop_thresholds(cfg: LossConfig) -> DropThresholds:
    """Per-direction thresholds from the loss config.

    "symmetric" (2024 code): one mask, motions vs threshold_motion, captions vs
    threshold_text, in both directions. "per_direction" (MMAsia code, `threshold_hetero` /
    `threshold_homo` there): the anchor's own modality is compared with threshold_anchor and
    the candidate's modality with threshold_candidate, so the roles swap per direction.
    """
    if cfg.threshold_mode == "symmetric":
        return DropThresholds(cfg.threshold_motion, cfg.threshold_text, cfg.threshold_motion, cfg.threshold_text)
    if cfg.threshold_mode == "per_direction":
        return DropThresholds(
            mt_motion=cfg.threshold_anchor,
            mt_text=cfg.threshold_candidate,
            tm_motion=cfg.threshold_candidate,
            tm_text=cfg.threshold_anchor,
        )
    raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {cfg.threshold_mode!r}")


# ----------------------------------------------------------------------------- helpers


def _score_dtype(*tensors: Tensor) -> torch.dtype:
    # fp64 stays fp64 (gradcheck, parity tests); fp32/bf16/fp16 are scored in fp32.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _upcast(*tensors: Tensor) -> tuple[Tensor, ...]:
    dtype = _score_dtype(*tensors)
    return tuple(t.to(dtype) for t in tensors)


def chunk_width(chunk_size: int, num_rows: int) -> int:
    """Columns per chunk: chunk_size, or with 0 (auto) CHUNK_CELLS // rows (at least 64).

    Auto keeps the per-chunk memory flat: a training step's B = 32 rows score every column
    in one chunk, a loss benchmark's 8,192 rows take 512 columns at a time.
    """
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be positive, or 0 for auto, got {chunk_size}")
    return chunk_size or max(64, CHUNK_CELLS // max(num_rows, 1))


def _chunks(num_cols: int, chunk_size: int) -> range:
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive here, got {chunk_size}")
    return range(0, num_cols, chunk_size)


def _chunk_masks(
    row_ids: Tensor, col_ids: Tensor, row_offset: int, start: int, stop: int
) -> tuple[Tensor, Tensor]:
    """(is_positive, not_negative) for rows x columns[start:stop], both (B, C) bool.

    not_negative marks the positive and every same-motion-id candidate.
    """
    device = row_ids.device
    row_index = torch.arange(row_offset, row_offset + row_ids.shape[0], device=device)
    col_index = torch.arange(start, stop, device=device)
    is_positive = row_index[:, None] == col_index[None, :]
    not_negative = row_ids[:, None] == col_ids[None, start:stop]
    not_negative |= is_positive
    return is_positive, not_negative


def _drop_masks(
    rows_m: Tensor,
    rows_t: Tensor,
    cols_m: Tensor,
    cols_t: Tensor,
    thresholds: DropThresholds,
    not_negative: Tensor,
) -> tuple[Tensor, Tensor]:
    """Threshold drops (B, C) for motion->text and text->motion, the plain way (the dense
    reference uses it; the chunked path has the leaner `_threshold_skips`). No grad."""
    with torch.no_grad():
        sim_mm = rows_m @ cols_m.T
        sim_tt = rows_t @ cols_t.T
        drop_mt = ((sim_mm > thresholds.mt_motion) | (sim_tt > thresholds.mt_text)) & ~not_negative
        drop_tm = ((sim_mm > thresholds.tm_motion) | (sim_tt > thresholds.tm_text)) & ~not_negative
    return drop_mt, drop_tm


def _check_core_inputs(
    rows_m: Tensor,
    rows_t: Tensor,
    cols_m: Tensor,
    cols_t: Tensor,
    row_ids: Tensor,
    col_ids: Tensor,
    row_offset: int,
) -> None:
    if rows_m.ndim != 2 or rows_m.shape != rows_t.shape:
        raise ValueError(
            f"row embeddings must be two (B, D) tensors of one shape, got {tuple(rows_m.shape)} "
            f"and {tuple(rows_t.shape)}"
        )
    if cols_m.ndim != 2 or cols_m.shape != cols_t.shape or cols_m.shape[1] != rows_m.shape[1]:
        raise ValueError(
            f"column embeddings must be two (G, {rows_m.shape[1]}) tensors, got "
            f"{tuple(cols_m.shape)} and {tuple(cols_t.shape)}"
        )
    num_rows, num_cols = rows_m.shape[0], cols_m.shape[0]
    if row_ids.shape != (num_rows,) or col_ids.shape != (num_cols,):
        raise ValueError(
            f"ids must be 1-D with one id per row ({num_rows}) and per column ({num_cols}), got "
            f"{tuple(row_ids.shape)} and {tuple(col_ids.shape)}"
        )
    if row_ids.dtype.is_floating_point or col_ids.dtype.is_floating_point:
        raise TypeError("motion ids must be an integer tensor")
    if not 0 <= row_offset <= num_cols - num_rows:
        raise ValueError(f"row_offset {row_offset} puts {num_rows} rows outside {num_cols} columns")


def _zero_count(device: torch.device) -> Tensor:
    return torch.zeros((), dtype=torch.int64, device=device)


def _candidate_count(row_ids: Tensor, col_ids: Tensor) -> Tensor:
    """Ordered (anchor, candidate) negative pairs over both directions, before thresholds."""
    # The non-negatives of an anchor are exactly the columns sharing its motion id (its
    # positive included); count them per id instead of materialising a B x G mask.
    unique_ids, counts = torch.unique(col_ids, return_counts=True)
    where = torch.searchsorted(unique_ids, row_ids).clamp_max(unique_ids.numel() - 1)
    same_id = torch.where(unique_ids[where] == row_ids, counts[where], 0).sum()
    return 2 * (row_ids.numel() * col_ids.numel() - same_id)


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
        for start in _chunks(cols_m.shape[0], chunk_size):
            stop = min(start + chunk_size, cols_m.shape[0])
            _, not_negative = _chunk_masks(row_ids, col_ids, row_offset, start, stop)
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
        chunk_size = ctx.chunk_size
        for start in _chunks(cols_m.shape[0], chunk_size):
            stop = min(start + chunk_size, cols_m.shape[0])
            _, not_negative = _chunk_masks(row_ids, col_ids, ctx.row_offset, start, stop)
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


def sum_hinge_core(
    rows_m: Tensor,
    rows_t: Tensor,
    cols_m: Tensor,
    cols_t: Tensor,
    row_ids: Tensor,
    col_ids: Tensor,
    row_offset: int,
    *,
    margin: float = 0.2,
    chunk_size: int = AUTO_CHUNK,
) -> LossTerms:
    """SH: sum over negatives j of [margin + S_ij - S_ii]+, in both directions."""
    _check_core_inputs(rows_m, rows_t, cols_m, cols_t, row_ids, col_ids, row_offset)
    rows_m, rows_t, cols_m, cols_t = _upcast(rows_m, rows_t, cols_m, cols_t)
    chunk_size = chunk_width(chunk_size, rows_m.shape[0])
    pos = (rows_m * rows_t).sum(1)
    per_anchor = _SumHingeChunked.apply(
        rows_m, rows_t, cols_m, cols_t, pos, row_ids, col_ids, row_offset, float(margin), chunk_size
    )
    return LossTerms(per_anchor, _zero_count(rows_m.device), _candidate_count(row_ids, col_ids))


# ----------------------------------------------------------------------------- MH / DropTriple


def _threshold_skips(
    rows_m: Tensor,
    rows_t: Tensor,
    block_m: Tensor,
    block_t: Tensor,
    thresholds: DropThresholds,
    not_negative: Tensor,
) -> tuple[Tensor, Tensor]:
    """Per direction, the (B, C) candidates to skip: non-negatives plus threshold drops.

    The chunked path's lean form of `_drop_masks` (which the dense reference uses).
    """
    sim_mm = rows_m @ block_m.T
    sim_tt = rows_t @ block_t.T

    def skip(motion_threshold: float, text_threshold: float) -> Tensor:
        mask = sim_mm > motion_threshold
        mask |= sim_tt > text_threshold
        return mask.logical_or_(not_negative)

    skip_mt = skip(thresholds.mt_motion, thresholds.mt_text)
    symmetric = (thresholds.tm_motion, thresholds.tm_text) == (thresholds.mt_motion, thresholds.mt_text)
    return skip_mt, skip_mt if symmetric else skip(thresholds.tm_motion, thresholds.tm_text)


def _update_hardest(best: Tensor, best_index: Tensor, scores: Tensor, start: int) -> None:
    # Row max returns the first maximal column, and an earlier chunk wins a tie (strict >),
    # so ties resolve to the lowest global column index.
    value, index = scores.max(dim=1)
    better = value > best
    best.copy_(torch.where(better, value, best))
    best_index.copy_(torch.where(better, index + start, best_index))


def hardest_kept_negatives(
    rows_m: Tensor,
    rows_t: Tensor,
    cols_m: Tensor,
    cols_t: Tensor,
    row_ids: Tensor,
    col_ids: Tensor,
    row_offset: int,
    *,
    thresholds: DropThresholds | None,
    chunk_size: int = AUTO_CHUNK,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Global column index of each anchor's hardest kept negative, without grad.

    Returns (index_mt, index_tm, dropped, candidates); an index is -1 where no negative
    remains. thresholds=None means MH (nothing dropped).
    """
    chunk_size = chunk_width(chunk_size, rows_m.shape[0])
    with torch.no_grad():
        num_rows, num_cols = rows_m.shape[0], cols_m.shape[0]
        fill = dict(device=rows_m.device)
        best_mt = torch.full((num_rows,), float("-inf"), dtype=rows_m.dtype, **fill)
        best_tm = best_mt.clone()
        index_mt = torch.full((num_rows,), -1, dtype=torch.int64, **fill)
        index_tm = index_mt.clone()
        dropped = _zero_count(rows_m.device)
        candidates = _zero_count(rows_m.device)
        for start in _chunks(num_cols, chunk_size):
            stop = min(start + chunk_size, num_cols)
            _, not_negative = _chunk_masks(row_ids, col_ids, row_offset, start, stop)
            excluded = torch.count_nonzero(not_negative)
            candidates += 2 * (not_negative.numel() - excluded)
            skip_mt = skip_tm = not_negative
            if thresholds is not None:
                skip_mt, skip_tm = _threshold_skips(
                    rows_m, rows_t, cols_m[start:stop], cols_t[start:stop], thresholds, not_negative
                )
                # the skips contain not_negative; what they add are the threshold drops
                dropped += torch.count_nonzero(skip_mt) + torch.count_nonzero(skip_tm) - 2 * excluded
            del not_negative
            scores = (rows_m @ cols_t[start:stop].T).masked_fill_(skip_mt, float("-inf"))
            _update_hardest(best_mt, index_mt, scores, start)
            del skip_mt, scores
            scores = (rows_t @ cols_m[start:stop].T).masked_fill_(skip_tm, float("-inf"))
            _update_hardest(best_tm, index_tm, scores, start)
            del skip_tm, scores
    return index_mt, index_tm, dropped, candidates


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


_ROW_BLOCK = 1024  # rows per block in _ChosenHinges: bounds its (block x D) temporaries


def _row_dots(anchors: Tensor, candidates: Tensor, index: Tensor | None = None) -> Tensor:
    """anchors[i] . candidates[index[i]] (candidates[i] without index), in row blocks."""
    out = anchors.new_empty(anchors.shape[0])
    for lo in range(0, anchors.shape[0], _ROW_BLOCK):
        hi = lo + _ROW_BLOCK
        block = candidates[lo:hi] if index is None else candidates.index_select(0, index[lo:hi].clamp_min(0))
        out[lo:hi] = torch.linalg.vecdot(anchors[lo:hi], block)
    return out


def drop_triple_core(
    rows_m: Tensor,
    rows_t: Tensor,
    cols_m: Tensor,
    cols_t: Tensor,
    row_ids: Tensor,
    col_ids: Tensor,
    row_offset: int,
    *,
    margin: float = 0.2,
    thresholds: DropThresholds | None,
    chunk_size: int = AUTO_CHUNK,
) -> LossTerms:
    """DropTriple (MH when thresholds is None): hinge on the hardest kept negative."""
    _check_core_inputs(rows_m, rows_t, cols_m, cols_t, row_ids, col_ids, row_offset)
    rows_m, rows_t, cols_m, cols_t = _upcast(rows_m, rows_t, cols_m, cols_t)
    index_mt, index_tm, dropped, candidates = hardest_kept_negatives(
        rows_m, rows_t, cols_m, cols_t, row_ids, col_ids, row_offset,
        thresholds=thresholds, chunk_size=chunk_size,
    )
    per_anchor = _ChosenHinges.apply(rows_m, rows_t, cols_m, cols_t, index_mt, index_tm, float(margin))
    return LossTerms(per_anchor, dropped, candidates)


def max_hinge_core(
    rows_m: Tensor,
    rows_t: Tensor,
    cols_m: Tensor,
    cols_t: Tensor,
    row_ids: Tensor,
    col_ids: Tensor,
    row_offset: int,
    *,
    margin: float = 0.2,
    chunk_size: int = AUTO_CHUNK,
) -> LossTerms:
    """MH (VSE++): hinge on the hardest negative, in both directions."""
    return drop_triple_core(
        rows_m, rows_t, cols_m, cols_t, row_ids, col_ids, row_offset,
        margin=margin, thresholds=None, chunk_size=chunk_size,
    )


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
        for start in _chunks(cols_m.shape[0], chunk_size):
            stop = min(start + chunk_size, cols_m.shape[0])
            is_positive, not_negative = _chunk_masks(row_ids, col_ids, row_offset, start, stop)
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
        chunk_size = ctx.chunk_size
        for start in _chunks(cols_m.shape[0], chunk_size):
            stop = min(start + chunk_size, cols_m.shape[0])
            is_positive, not_negative = _chunk_masks(row_ids, col_ids, ctx.row_offset, start, stop)
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


def _as_scale(scale: Tensor | float, like: Tensor) -> Tensor:
    if isinstance(scale, Tensor):
        if scale.numel() != 1:
            raise ValueError(f"the logit scale must be a scalar, got shape {tuple(scale.shape)}")
        return scale.reshape(()).to(like.dtype)
    return torch.tensor(float(scale), dtype=like.dtype, device=like.device)


def info_nce_core(
    rows_m: Tensor,
    rows_t: Tensor,
    cols_m: Tensor,
    cols_t: Tensor,
    row_ids: Tensor,
    col_ids: Tensor,
    row_offset: int,
    *,
    scale: Tensor | float = 1 / 0.07,
    chunk_size: int = AUTO_CHUNK,
) -> LossTerms:
    """InfoNCE: per anchor, the two directions' cross-entropies with logits scale * S.

    `scale` is 1 / temperature (a tensor to learn it); same-id columns other than the
    positive are removed from the denominators.
    """
    _check_core_inputs(rows_m, rows_t, cols_m, cols_t, row_ids, col_ids, row_offset)
    rows_m, rows_t, cols_m, cols_t = _upcast(rows_m, rows_t, cols_m, cols_t)
    chunk_size = chunk_width(chunk_size, rows_m.shape[0])
    scale_t = _as_scale(scale, rows_m)
    log_denominators = _LogSumExpChunked.apply(
        rows_m, rows_t, cols_m, cols_t, scale_t, row_ids, col_ids, row_offset, chunk_size
    )
    pos = (rows_m * rows_t).sum(1)
    per_anchor = log_denominators - 2 * scale_t * pos
    return LossTerms(per_anchor, _zero_count(rows_m.device), _candidate_count(row_ids, col_ids))


Core = Callable[..., LossTerms]
CHUNKED_CORES: dict[str, Core] = {
    "sh": sum_hinge_core,
    "mh": max_hinge_core,
    "droptriple": drop_triple_core,
    "infonce": info_nce_core,
}
assert tuple(CHUNKED_CORES) == LOSS_NAMES  # one core per configurable loss
