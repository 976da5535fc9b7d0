"""What every loss core takes and returns: the scored pairs, their masks, the drop thresholds.

A core scores *local rows x global columns*: the rows are the B anchors this process owns, the
columns are the G candidates of the whole (gathered) batch, and row i's positive is column
`row_offset + i`. A single process is the special case rows is columns, row_offset 0
(`Pairs.single`). Pure torch; shared by the chunked cores (`rehamot.loss.chunked`) and the
dense reference (`rehamot.loss.dense`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from rehamot.config import THRESHOLD_MODES, LossConfig


@dataclass(frozen=True)
class Pairs:
    """The B local anchors (rows) and the G global candidates (columns) of one loss call."""

    rows_m: Tensor  # (B, D) motion embeddings of the local anchors, unit rows
    rows_t: Tensor  # (B, D) their captions' embeddings
    cols_m: Tensor  # (G, D) every motion of the global batch
    cols_t: Tensor  # (G, D) every caption of the global batch
    row_ids: Tensor  # (B,) motion ids of the rows
    col_ids: Tensor  # (G,) motion ids of the columns
    row_offset: int = 0  # global column of row 0

    @classmethod
    def single(cls, motion: Tensor, text: Tensor, ids: Tensor) -> Pairs:
        """One process: the rows are the columns (one tensor, so one gradient each)."""
        return cls(motion, text, motion, text, ids, ids, 0)

    @property
    def num_rows(self) -> int:
        return self.rows_m.shape[0]

    @property
    def num_cols(self) -> int:
        return self.cols_m.shape[0]

    @property
    def shared(self) -> bool:
        """Rows and columns are the same tensors (a single process)."""
        return self.rows_m is self.cols_m and self.rows_t is self.cols_t

    def checked(self) -> Pairs:
        """These pairs, validated and upcast to the scoring dtype (see `score_dtype`)."""
        check_pairs(self)
        dtype = score_dtype(self.rows_m, self.rows_t, self.cols_m, self.cols_t)
        rows_m, rows_t = self.rows_m.to(dtype), self.rows_t.to(dtype)
        if self.shared:  # keep one tensor per modality
            cols_m, cols_t = rows_m, rows_t
        else:
            cols_m, cols_t = self.cols_m.to(dtype), self.cols_t.to(dtype)
        return Pairs(rows_m, rows_t, cols_m, cols_t, self.row_ids, self.col_ids, self.row_offset)

    def row_index(self) -> Tensor:
        """The global column index of each row (its positive)."""
        return torch.arange(self.row_offset, self.row_offset + self.num_rows, device=self.row_ids.device)


class LossTerms(NamedTuple):
    """What a core returns for its B local anchors."""

    per_anchor: Tensor  # (B,) loss of each anchor, both directions added; carries grad
    dropped: Tensor  # 0-d int64: ordered (anchor, candidate) pairs removed by thresholds (-1: not counted)
    candidates: Tensor  # 0-d int64: ordered pairs eligible as negatives before thresholds


NOT_COUNTED = -1  # `dropped` of a call that was asked not to count the drops


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

    @property
    def symmetric(self) -> bool:
        """Both directions drop the same pairs."""
        return (self.tm_motion, self.tm_text) == (self.mt_motion, self.mt_text)


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


def score_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 stays fp64 (gradcheck, parity tests); fp32/bf16/fp16 are scored in fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def upcast(*tensors: Tensor) -> tuple[Tensor, ...]:
    dtype = score_dtype(*tensors)
    return tuple(t.to(dtype) for t in tensors)


def check_pairs(pairs: Pairs) -> None:
    rows_m, rows_t, cols_m, cols_t = pairs.rows_m, pairs.rows_t, pairs.cols_m, pairs.cols_t
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
    if pairs.row_ids.shape != (num_rows,) or pairs.col_ids.shape != (num_cols,):
        raise ValueError(
            f"ids must be 1-D with one id per row ({num_rows}) and per column ({num_cols}), got "
            f"{tuple(pairs.row_ids.shape)} and {tuple(pairs.col_ids.shape)}"
        )
    if pairs.row_ids.dtype.is_floating_point or pairs.col_ids.dtype.is_floating_point:
        raise TypeError("motion ids must be an integer tensor")
    if not 0 <= pairs.row_offset <= num_cols - num_rows:
        raise ValueError(f"row_offset {pairs.row_offset} puts {num_rows} rows outside {num_cols} columns")


def block_masks(row_ids: Tensor, row_index: Tensor, col_ids: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """(is_positive, not_negative) of some rows x columns[start:stop], both (R, C) bool.

    `row_index` holds each row's global column (its positive); not_negative marks the positive
    and every same-motion-id candidate.
    """
    col_index = torch.arange(start, stop, device=row_ids.device)
    is_positive = row_index[:, None] == col_index[None, :]
    not_negative = row_ids[:, None] == col_ids[None, start:stop]
    not_negative |= is_positive
    return is_positive, not_negative


def chunk_masks(pairs: Pairs, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """`block_masks` of every row of `pairs`."""
    return block_masks(pairs.row_ids, pairs.row_index(), pairs.col_ids, start, stop)


def drop_masks(pairs: Pairs, thresholds: DropThresholds, not_negative: Tensor) -> tuple[Tensor, Tensor]:
    """Threshold drops (B, G) for motion->text and text->motion, the plain way (the dense
    reference and the exact drop count use it). No grad."""
    with torch.no_grad():
        sim_mm = pairs.rows_m @ pairs.cols_m.T
        sim_tt = pairs.rows_t @ pairs.cols_t.T
        drop_mt = ((sim_mm > thresholds.mt_motion) | (sim_tt > thresholds.mt_text)) & ~not_negative
        drop_tm = ((sim_mm > thresholds.tm_motion) | (sim_tt > thresholds.tm_text)) & ~not_negative
    return drop_mt, drop_tm


def zero_count(device: torch.device) -> Tensor:
    return torch.zeros((), dtype=torch.int64, device=device)


def candidate_count(row_ids: Tensor, col_ids: Tensor) -> Tensor:
    """Ordered (anchor, candidate) negative pairs over both directions, before thresholds."""
    # The non-negatives of an anchor are exactly the columns sharing its motion id (its
    # positive included); count them per id instead of materialising a B x G mask.
    unique_ids, counts = torch.unique(col_ids, return_counts=True)
    where = torch.searchsorted(unique_ids, row_ids).clamp_max(unique_ids.numel() - 1)
    same_id = torch.where(unique_ids[where] == row_ids, counts[where], 0).sum()
    return 2 * (row_ids.numel() * col_ids.numel() - same_id)


def as_scale(scale: Tensor | float, like: Tensor) -> Tensor:
    """InfoNCE's logit scale as a 0-d tensor of the scoring dtype (a tensor keeps its grad)."""
    if isinstance(scale, Tensor):
        if scale.numel() != 1:
            raise ValueError(f"the logit scale must be a scalar, got shape {tuple(scale.shape)}")
        return scale.reshape(()).to(like.dtype)
    return torch.tensor(float(scale), dtype=like.dtype, device=like.device)
