"""DropTriple's search: each anchor's hardest *kept* negative, without grad, and the drop count.

The hardest kept negative of an anchor depends on the intra-modal similarities of only the
candidates that score above it, so this module computes the B x G scores once (one product in a
single process, whose columns give the text -> motion direction too; two with gathered
columns) and intra-modal similarities only where they can matter. Two searches do that, and
give what the plain scan gives (every intra-modal similarity, the reference and the fallback):

- **top-k**: each anchor keeps its TOP_K best candidates; cos(m_i, m_j) and cos(t_i, t_j) are
  computed for those pairs only. A row whose best kept candidate scores strictly above its
  k-th is settled; the others go to the bounded scan. Cheap when few top candidates are
  dropped (thresholds that drop little, embeddings without tight clusters).
- **bounded scan**: the columns are grouped around a few centroids (one Lloyd step from
  evenly spaced pivots); a group's radius is the largest angle of a member to its centroid.
  By the triangle inequality on the sphere, no member of group h is within angle
  angle(x_i, c_h) - radius_h of anchor x_i, so an anchor whose bound rules out a drop in both
  modalities needs no intra-modal similarity with that group. The scan scores every column and
  computes intra-modal similarities for the (anchor, group) tiles the bound cannot rule out.
  Cheap when the embeddings cluster (the case where many top candidates are dropped, which
  defeats top-k); the plain scan when they do not.

"auto" scans plainly below MIN_SEARCH_CELLS; above, it probes a few rows (`probe`): the plain
scan when they drop more than a quarter of their candidates, the bounded scan when the top-k
search would leave more than PROBE_LIMIT of them unsettled, the top-k search otherwise. Every strategy returns the
same indices (ties to the lowest global column), up to the float round-off of a similarity
computed in another order lying exactly at a threshold. Counting *every* dropped pair needs
each similarity the bound cannot rule out: the bounded scan counts them on the way; after a
top-k search it costs the bounded tiles again, so the objective asks for it on logged steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rehamot.loss.pairs import (
    NOT_COUNTED,
    DropThresholds,
    Pairs,
    block_masks,
    candidate_count,
    chunk_masks,
    zero_count,
)

AUTO_CHUNK = 0  # chunk_size 0: chunk_width picks the width from the number of rows
CHUNK_CELLS = 1 << 22  # ~4M cells: a chunk's scores, intra-modal sims and masks stay ~60 MB

TOP_K = 8  # candidates per anchor whose intra-modal similarities the top-k search checks
STRATEGIES = ("auto", "topk", "bounded", "plain")
# "auto" scans plainly below MIN_SEARCH_CELLS score cells (B x G), where the searches' fixed
# costs outweigh the products they save (measured: 2,048^2 slower, 4,096^2 faster), and
# above it probes a few rows
MIN_SEARCH_CELLS = 1 << 23
PROBE_MIN_ROWS = 256
PROBE_LIMIT = 0.3

# Column groups of the bounded scan: about GROUP_SIZE columns each, between the two bounds;
# where the bound keeps more than MAX_TILE_SHARE of the cells, the plain scan is cheaper.
GROUP_SIZE = 64
MIN_GROUPS, MAX_GROUPS = 16, 256
MAX_TILE_SHARE = 0.25
SPLIT_RADIUS = 1.3  # a group wider than this times the median radius is split once

_ROW_BLOCK = 1024  # rows per block where (block x k x D) temporaries are made


def chunk_width(chunk_size: int, num_rows: int) -> int:
    """Columns per chunk: chunk_size, or with 0 (auto) CHUNK_CELLS // rows (at least 64).

    Auto keeps the per-chunk memory flat: a training step's B = 32 rows score every column
    in one chunk, a loss benchmark's 8,192 rows take 512 columns at a time.
    """
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be positive, or 0 for auto, got {chunk_size}")
    return chunk_size or max(64, CHUNK_CELLS // max(num_rows, 1))


def column_chunks(num_cols: int, chunk_size: int) -> range:
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive here, got {chunk_size}")
    return range(0, num_cols, chunk_size)


class _Hardest:
    """Each row's best (score, global column) so far; ties go to the lowest column."""

    def __init__(self, num_rows: int, like: Tensor) -> None:
        self.value = torch.full((num_rows,), float("-inf"), dtype=like.dtype, device=like.device)
        self.index = torch.full((num_rows,), -1, dtype=torch.int64, device=like.device)

    def update(self, scores: Tensor, col_index: Tensor) -> None:
        """scores: (R, C) with -inf where skipped; col_index: the C global columns, ascending."""
        value, where = scores.max(dim=1)  # first maximal column: the lowest of this chunk
        index = col_index[where]
        better = (value > self.value) | ((value == self.value) & (value > float("-inf")) & (index < self.index))
        self.value = torch.where(better, value, self.value)
        self.index = torch.where(better, index, self.index)


def _not_negative(row_ids: Tensor, row_index: Tensor, col_ids: Tensor, col_index: Tensor) -> Tensor:
    """(R, C) bool: the positive and every same-motion-id candidate of each row."""
    mask = row_ids[:, None] == col_ids[None, :]
    return mask.logical_or_(row_index[:, None] == col_index[None, :])


# ----------------------------------------------------------------------------- bounded scan


@dataclass(frozen=True)
class _Groups:
    """Columns grouped around centres, in an order that keeps each group contiguous."""

    order: Tensor  # (G,) global columns, group by group, ascending within a group
    bounds: list[tuple[int, int]]  # [start, stop) of each group in `order`
    centres_m: Tensor  # (P, D) unit motion centre of each group
    centres_t: Tensor
    lowest_m: Tensor  # (P,) smallest cosine of a member's motion to its centre (the radius)
    lowest_t: Tensor
    cosine_m: Tensor  # (G, P) every column's cosines to the centres (a single process's rows)
    cosine_t: Tensor


def _group_columns(cols_m: Tensor, cols_t: Tensor, keep_cosines: bool = True) -> _Groups:
    """Groups of similar motions: evenly spaced pivots, one Lloyd step, then the farthest member
    of every group much wider than the median becomes a centre of its own (a cluster that got
    no pivot would otherwise widen another's group, and the bound with it). keep_cosines:
    keep the (G, P) cosines of the columns to the centres (a single process's rows reuse them)."""
    num_cols = cols_m.shape[0]
    count = min(MAX_GROUPS, max(MIN_GROUPS, num_cols // GROUP_SIZE), num_cols)
    pivots = cols_m[torch.linspace(0, num_cols - 1, count, device=cols_m.device).long()]
    centres_m = _centroids(cols_m, (cols_m @ pivots.T).argmax(dim=1), count)  # one Lloyd step
    cosine = cols_m @ centres_m.T
    best, assign = cosine.max(dim=1)
    radius = torch.arccos(_lowest(best, assign, count).clamp(-1, 1))
    wide = torch.nonzero(radius > SPLIT_RADIUS * radius.median()).squeeze(1)
    if wide.numel():
        # the member of each wide group farthest from its centre
        lowest = _lowest(best, assign, count)
        farthest = torch.nonzero(best == lowest[assign]).squeeze(1)
        first = torch.full((count,), num_cols, dtype=torch.int64, device=cols_m.device)
        first = first.scatter_reduce(0, assign[farthest], farthest, "amin")
        extra = cols_m.index_select(0, first[wide])
        centres_m = torch.cat([centres_m, extra])
        cosine = torch.cat([cosine, cols_m @ extra.T], dim=1)
        best, assign = cosine.max(dim=1)
    present, assign = torch.unique(assign, return_inverse=True)  # drop empty groups
    count = present.numel()
    centres_m, cosine_m = centres_m[present], cosine[:, present]
    order, bounds = _grouped_order(assign, count)
    centres_t = _centroids(cols_t, assign, count)
    cosine_t = cols_t @ centres_t.T
    lowest_t = _lowest(cosine_t.gather(1, assign[:, None]).squeeze(1), assign, count)
    if not keep_cosines:
        cosine_m = cosine_t = cosine_m[:0]
    return _Groups(order, bounds, centres_m, centres_t, _lowest(best, assign, count), lowest_t, cosine_m, cosine_t)


def _lowest(cosine: Tensor, assign: Tensor, count: int) -> Tensor:
    return torch.ones(count, dtype=cosine.dtype, device=cosine.device).scatter_reduce(0, assign, cosine, "amin")


def _grouped_order(assign: Tensor, count: int) -> tuple[Tensor, list[tuple[int, int]]]:
    """Indices group by group (ascending within one) and each group's [start, stop)."""
    order = torch.argsort(assign * assign.numel() + torch.arange(assign.numel(), device=assign.device))
    stops = torch.cumsum(torch.bincount(assign, minlength=count), 0).tolist()
    return order, list(zip([0] + stops[:-1], stops))


def _centroids(cols: Tensor, assign: Tensor, count: int) -> Tensor:
    sums = torch.zeros(count, cols.shape[1], dtype=cols.dtype, device=cols.device)
    return F.normalize(sums.index_add_(0, assign, cols), dim=1)


def _may_exceed(cosine: Tensor, lowest: Tensor, dim: int) -> Tensor:
    """(R, P): an upper bound on cos(row, member) over each group's members, from the rows'
    cosines to the centres.

    Triangle inequality on angles: angle(x, member) >= angle(x, c) - radius. Each cosine
    is moved by its worst round-off (D * 2^-23 in float32) in the safe direction first.
    """
    slack = dim * torch.finfo(cosine.dtype).eps
    angle = torch.arccos((cosine + slack).clamp_(-1, 1))
    radius = torch.arccos((lowest - slack).clamp(-1, 1))
    return torch.cos((angle - radius[None, :]).clamp_min_(0)).add_(slack)


def _tile_drops(rows_m: Tensor, rows_t: Tensor, block_m: Tensor, block_t: Tensor, motion_threshold: float,
                text_threshold: float) -> Tensor:
    drop = (rows_m @ block_m.T) > motion_threshold
    return drop.logical_or_((rows_t @ block_t.T) > text_threshold)


def _same_motion_pairs(row_ids: Tensor, row_index: Tensor, col_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, columns) of every pair that is no negative: the positive and same-id columns."""
    sorted_ids, by_id = torch.sort(col_ids, stable=True)
    first = torch.searchsorted(sorted_ids, row_ids, right=False)
    counts = torch.searchsorted(sorted_ids, row_ids, right=True) - first
    rows = torch.repeat_interleave(torch.arange(row_ids.numel(), device=row_ids.device), counts)
    offsets = torch.arange(rows.numel(), device=row_ids.device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts)
    cols = by_id[torch.repeat_interleave(first, counts) + offsets]
    positives = torch.arange(row_ids.numel(), device=row_ids.device)
    return torch.cat([rows, positives]), torch.cat([cols, row_index])


def _no_negative_count(rows: Tensor, cols: Tensor, row_ids: Tensor, row_index: Tensor, col_ids: Tensor) -> Tensor:
    """How many of these (row, global column) pairs are no negative (not counted as drops)."""
    same = row_ids[rows] == col_ids[cols]
    return torch.count_nonzero(same.logical_or_(row_index[rows] == cols))


class _BoundedTiles:
    """The (row group, column group) tiles the bound cannot rule out, walked chunk by chunk.

    The columns are visited in group order, chunk_size at a time, each chunk's columns
    ascending (so a row's first maximal column is its lowest); a chunk's threshold drops come
    from the tiles of the groups it holds, computed when the chunk is scored: nothing of size
    B x G, or of the number of drops, is kept. `usable` is False when the bound keeps more
    than MAX_TILE_SHARE of the cells (no clusters: the plain scan is cheaper).
    """

    def __init__(self, rows_m: Tensor, rows_t: Tensor, row_ids: Tensor, row_index: Tensor, pairs: Pairs,
                 thresholds: DropThresholds, chunk_size: int) -> None:
        shared = rows_m is pairs.cols_m and rows_t is pairs.cols_t  # a single process's rows
        groups = _group_columns(pairs.cols_m, pairs.cols_t, keep_cosines=shared)
        cosine_m, cosine_t = (groups.cosine_m, groups.cosine_t) if shared else (
            rows_m @ groups.centres_m.T, rows_t @ groups.centres_t.T)
        may = _may_exceed(cosine_m, groups.lowest_m, rows_m.shape[1]) > min(thresholds.mt_motion,
                                                                             thresholds.tm_motion)
        may |= _may_exceed(cosine_t, groups.lowest_t, rows_m.shape[1]) > min(thresholds.mt_text, thresholds.tm_text)
        # rows join the group of their nearest motion centre, so a row group's tiles are few
        count = len(groups.bounds)
        row_group = cosine_m.argmax(dim=1)
        self.row_order, self.row_bounds = (groups.order, groups.bounds) if shared else _grouped_order(row_group, count)
        need = torch.zeros(count, count, dtype=torch.int32, device=may.device).index_add_(0, row_group, may.int()) > 0
        row_sizes = torch.tensor([hi - lo for lo, hi in self.row_bounds], dtype=torch.float64)
        col_sizes = torch.tensor([hi - lo for lo, hi in groups.bounds], dtype=torch.float64)
        cells = float((row_sizes[:, None] * col_sizes[None, :])[need.cpu()].sum())
        self.usable = cells <= MAX_TILE_SHARE * rows_m.shape[0] * pairs.num_cols
        if not self.usable:
            return
        self.pairs, self.row_ids, self.row_index, self.num_rows = pairs, row_ids, row_index, rows_m.shape[0]
        self.order = groups.order
        self.directions = [(thresholds.mt_motion, thresholds.mt_text)]
        if not thresholds.symmetric:
            self.directions.append((thresholds.tm_motion, thresholds.tm_text))
        self.cols_p = (pairs.cols_m.index_select(0, groups.order), pairs.cols_t.index_select(0, groups.order))
        self.rows_p = self.cols_p if shared else (rows_m.index_select(0, self.row_order),
                                                  rows_t.index_select(0, self.row_order))
        # per column group, the positions (in row order) of every row group that needs it: one
        # product per piece of a column group instead of one per tile
        self.need_rows = [torch.cat([torch.arange(*self.row_bounds[g], device=may.device)
                                     for g in torch.nonzero(need[:, h]).squeeze(1).tolist()] or
                                    [torch.zeros(0, dtype=torch.int64, device=may.device)])
                          for h in range(count)]
        num_cols, device = pairs.num_cols, rows_m.device
        self.chunks = [(start, min(start + chunk_size, num_cols)) for start in column_chunks(num_cols, chunk_size)]
        self.place = torch.empty(num_cols, dtype=torch.int64, device=device)  # order position -> place in chunk
        self.chunk_cols = []
        for start, stop in self.chunks:
            cols, perm = torch.sort(groups.order[start:stop])
            self.place[start + perm] = torch.arange(stop - start, device=device)
            self.chunk_cols.append(cols)
        self.pieces: list[list[tuple[int, int, int]]] = [[] for _ in self.chunks]
        for h, (lo, hi) in enumerate(groups.bounds):  # a group cut where a chunk ends
            piece = lo
            while piece < hi:
                piece_hi = min(hi, (piece // chunk_size + 1) * chunk_size)
                self.pieces[piece // chunk_size].append((piece, piece_hi, h))
                piece = piece_hi
        # the pairs that are no negative, by chunk
        same_rows, same_cols = _same_motion_pairs(row_ids, row_index, pairs.col_ids)
        position = torch.empty_like(self.order)
        position[self.order] = torch.arange(num_cols, device=device)
        same_position = position[same_cols]
        by_position = torch.argsort(same_position)
        self.same_rows, self.same_position = same_rows[by_position], same_position[by_position]

    def not_negatives(self, chunk: int) -> tuple[Tensor, Tensor]:
        """(rows, places in the chunk) of the chunk's non-negative pairs."""
        start, stop = self.chunks[chunk]
        bounds = torch.tensor([start, stop], device=self.same_position.device)
        lo, hi = torch.searchsorted(self.same_position, bounds).tolist()
        return self.same_rows[lo:hi], self.place[self.same_position[lo:hi]]

    def drops(self, chunk: int, count: bool) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
        """Per direction (one when the thresholds are symmetric) the (rows, places in the chunk)
        of its threshold drops, and when `count` their count over both directions,
        non-negatives excluded."""
        found: list[tuple[list[Tensor], list[Tensor]]] = [([], []) for _ in self.directions]
        dropped = zero_count(self.row_order.device)
        for lo, hi, h in self.pieces[chunk]:
            need = self.need_rows[h]  # the rows of every row group the bound keeps for group h
            if need.numel() == 0:
                continue
            sims_m = self.rows_p[0].index_select(0, need) @ self.cols_p[0][lo:hi].T
            sims_t = self.rows_p[1].index_select(0, need) @ self.cols_p[1][lo:hi].T
            for (rows, places), (motion_threshold, text_threshold) in zip(found, self.directions):
                drop = (sims_m > motion_threshold).logical_or_(sims_t > text_threshold)
                tile_rows, tile_cols = torch.nonzero(drop, as_tuple=True)
                rows.append(self.row_order[need[tile_rows]])
                places.append(self.place[tile_cols + lo])
                if count:
                    dropped += (tile_rows.numel() - _no_negative_count(
                        rows[-1], self.order[tile_cols + lo], self.row_ids, self.row_index, self.pairs.col_ids)) * (
                        3 - len(self.directions))  # symmetric thresholds: both directions drop these pairs
        empty = self.same_rows[:0]
        return [(torch.cat(rows or [empty]), torch.cat(places or [empty])) for rows, places in found], dropped


def _skip(scores: Tensor, *pairs: tuple[Tensor, Tensor]) -> Tensor:
    """Set these (row, column) pairs of the scores to -inf."""
    minus_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    return scores.index_put_((torch.cat([r for r, _ in pairs]), torch.cat([c for _, c in pairs])), minus_inf)


def _first_max_rows(scores: Tensor) -> Tensor:
    """Per column, the first row holding its maximum (-1 where all are -inf).

    max(dim=0) with indices is ~10x slower than a max over contiguous memory, so the rows are
    reduced in blocks: the first block holding the column's maximum, then the row within it."""
    num_rows, num_cols = scores.shape
    full = num_rows - num_rows % _MAX_BLOCK
    cols = torch.arange(num_cols, device=scores.device)
    if full:
        blocks = scores[:full].view(full // _MAX_BLOCK, _MAX_BLOCK, num_cols)
        block_max = blocks.amax(dim=1)
        value = block_max.amax(dim=0)
        block = (block_max == value).to(torch.int8).argmax(dim=0)
        within = (blocks[block, :, cols] == value[:, None]).to(torch.int8).argmax(dim=1)
        first = block * _MAX_BLOCK + within
    if full < num_rows:
        rest_value, rest_row = scores[full:].max(dim=0)
        if full:
            later = rest_value > value  # ties stay with the earlier rows
            value, first = torch.where(later, rest_value, value), torch.where(later, rest_row + full, first)
        else:
            value, first = rest_value, rest_row
    return torch.where(value > float("-inf"), first, -1)


_MAX_BLOCK = 64


def bounded_scan(pairs: Pairs, rows: Tensor | None, thresholds: DropThresholds, chunk_size: int, *,
                 bounded: bool = True, count: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(index_mt, index_tm, dropped) of the rows (all, or the `rows` given), no grad.

    bounded=False computes every intra-modal similarity (the plain scan). `dropped` counts the
    threshold drops of these rows over both directions when `count`, else NOT_COUNTED.
    """
    rows_m, rows_t, row_ids, row_index = pairs.rows_m, pairs.rows_t, pairs.row_ids, pairs.row_index()
    if rows is not None:
        rows_m, rows_t = rows_m.index_select(0, rows), rows_t.index_select(0, rows)
        row_ids, row_index = row_ids[rows], row_index[rows]
    num_rows, device = rows_m.shape[0], rows_m.device
    tiles = _BoundedTiles(rows_m, rows_t, row_ids, row_index, pairs, thresholds, chunk_size) if bounded else None
    if tiles is not None and not tiles.usable:
        tiles = None
    # In a single process with every row present, column j of the motion -> text scores is
    # caption j against every motion: its text -> motion row, complete within the chunk.
    shared = pairs.shared and rows is None
    hardest_mt, hardest_tm = _Hardest(num_rows, rows_m), _Hardest(num_rows, rows_m)
    index_tm_shared = torch.full((pairs.num_cols,), -1, dtype=torch.int64, device=device)
    dropped = zero_count(device)
    for chunk, (start, stop) in enumerate(column_chunks_of(tiles, pairs.num_cols, chunk_size)):
        if tiles is not None:
            col_index = tiles.chunk_cols[chunk]
            block_t = pairs.cols_t.index_select(0, col_index)
            block_m = None if shared else pairs.cols_m.index_select(0, col_index)
        else:
            col_index = torch.arange(start, stop, device=device)
            block_m, block_t = pairs.cols_m[start:stop], pairs.cols_t[start:stop]
        scores_mt = rows_m @ block_t.T
        scores_tm = None if shared and thresholds.symmetric else (
            scores_mt.clone() if shared else rows_t @ block_m.T)
        if tiles is not None:
            not_negative = tiles.not_negatives(chunk)
            by_direction, tile_dropped = tiles.drops(chunk, count)
            dropped += tile_dropped
            _skip(scores_mt, not_negative, by_direction[0])
            if scores_tm is not None:
                _skip(scores_tm, not_negative, by_direction[-1])
        else:
            not_negative = _not_negative(row_ids, row_index, pairs.col_ids[start:stop], col_index)
            drop_mt = _tile_drops(rows_m, rows_t, block_m, block_t, thresholds.mt_motion, thresholds.mt_text)
            drop_tm = drop_mt if thresholds.symmetric else _tile_drops(
                rows_m, rows_t, block_m, block_t, thresholds.tm_motion, thresholds.tm_text)
            drop_mt.logical_and_(~not_negative)
            if drop_tm is not drop_mt:
                drop_tm.logical_and_(~not_negative)
            if count:
                dropped += torch.count_nonzero(drop_mt) + torch.count_nonzero(drop_tm)
            scores_mt.masked_fill_(drop_mt.logical_or_(not_negative), float("-inf"))
            if scores_tm is not None:
                scores_tm.masked_fill_(drop_tm.logical_or_(not_negative), float("-inf"))
        hardest_mt.update(scores_mt, col_index)
        if shared:
            # the text -> motion anchors are this chunk's columns, their candidates every row
            # (rows in global order: the first maximal row is the lowest column)
            index_tm_shared[col_index] = _first_max_rows(scores_mt if scores_tm is None else scores_tm)
        else:
            hardest_tm.update(scores_tm, col_index)
    index_tm = index_tm_shared if shared else hardest_tm.index
    return hardest_mt.index, index_tm, dropped if count else torch.full_like(dropped, NOT_COUNTED)


def column_chunks_of(tiles: _BoundedTiles | None, num_cols: int, chunk_size: int) -> list[tuple[int, int]]:
    """The [start, stop) chunks a scan walks: the tiles' (in group order) or plain ones."""
    if tiles is not None:
        return tiles.chunks
    return [(start, min(start + chunk_size, num_cols)) for start in column_chunks(num_cols, chunk_size)]


def count_dropped_pairs(pairs: Pairs, thresholds: DropThresholds, chunk_size: int) -> Tensor:
    """Every dropped ordered (anchor, candidate) pair of both directions: the bounded tiles,
    or two products where the bound cannot prune."""
    tiles = _BoundedTiles(pairs.rows_m, pairs.rows_t, pairs.row_ids, pairs.row_index(), pairs, thresholds,
                          chunk_size)
    dropped = zero_count(pairs.rows_m.device)
    if tiles.usable:
        for chunk in range(len(tiles.chunks)):
            dropped += tiles.drops(chunk, count=True)[1]
        return dropped
    for start in column_chunks(pairs.num_cols, chunk_size):
        stop = min(start + chunk_size, pairs.num_cols)
        _, not_negative = chunk_masks(pairs, start, stop)
        block = (pairs.cols_m[start:stop], pairs.cols_t[start:stop])
        for motion_threshold, text_threshold in ((thresholds.mt_motion, thresholds.mt_text),
                                                 (thresholds.tm_motion, thresholds.tm_text)):
            drop = _tile_drops(pairs.rows_m, pairs.rows_t, *block, motion_threshold, text_threshold)
            dropped += torch.count_nonzero(drop.logical_and_(~not_negative))
    return dropped


# ----------------------------------------------------------------------------- top-k search


class _TopK:
    """Each row's k best (score, column) pairs so far, merged chunk by chunk."""

    def __init__(self, num_rows: int, k: int, like: Tensor) -> None:
        self.k = k
        self.values = torch.full((num_rows, k), float("-inf"), dtype=like.dtype, device=like.device)
        self.index = torch.full((num_rows, k), -1, dtype=torch.int64, device=like.device)

    def merge(self, scores: Tensor, start: int) -> None:
        k = min(self.k, scores.shape[1])
        values, index = scores.topk(k, dim=1)
        values = torch.cat([self.values, values], dim=1)
        index = torch.cat([self.index, index + start], dim=1)
        self.values, where = values.topk(self.k, dim=1)
        self.index = index.gather(1, where)


def _top_candidates(pairs: Pairs, rows: Tensor | None, k: int, chunk_size: int) -> tuple[_TopK, _TopK]:
    """The k best-scoring negatives of each row (all rows, or the `rows` given), per direction."""
    rows_m, rows_t, row_ids, row_index = pairs.rows_m, pairs.rows_t, pairs.row_ids, pairs.row_index()
    if rows is not None:
        rows_m, rows_t, row_ids, row_index = rows_m[rows], rows_t[rows], row_ids[rows], row_index[rows]
    shared = pairs.shared and rows is None
    top_mt, top_tm = _TopK(rows_m.shape[0], k, rows_m), _TopK(rows_m.shape[0], k, rows_m)
    for start in column_chunks(pairs.num_cols, chunk_size):
        stop = min(start + chunk_size, pairs.num_cols)
        _, not_negative = block_masks(row_ids, row_index, pairs.col_ids, start, stop)
        scores = (rows_m @ pairs.cols_t[start:stop].T).masked_fill_(not_negative, float("-inf"))
        top_mt.merge(scores, start)
        if shared:
            # caption j's scores against every motion are column j of the same product, and a
            # chunk holds every row: its column top-k are final
            values, index = scores.T.topk(min(k, scores.shape[0]), dim=1)
            top_tm.values[start:stop, :values.shape[1]], top_tm.index[start:stop, :values.shape[1]] = values, index
            continue
        scores = (rows_t @ pairs.cols_m[start:stop].T).masked_fill_(not_negative, float("-inf"))
        top_tm.merge(scores, start)
    return top_mt, top_tm


def _pair_sims(rows: Tensor, cols: Tensor, index: Tensor) -> Tensor:
    """(R, k) cosines rows[i] . cols[index[i, s]] (index -1: anything; masked by the caller)."""
    out = rows.new_empty(index.shape)
    for lo in range(0, rows.shape[0], _ROW_BLOCK):
        hi = min(lo + _ROW_BLOCK, rows.shape[0])
        block = cols.index_select(0, index[lo:hi].clamp_min(0).reshape(-1)).view(hi - lo, index.shape[1], -1)
        out[lo:hi] = torch.bmm(block, rows[lo:hi, :, None]).squeeze(2)
    return out


def _first_kept(top: _TopK, sim_mm: Tensor, sim_tt: Tensor, motion_threshold: float,
                text_threshold: float) -> tuple[Tensor, Tensor]:
    """(chosen column, settled) per row from its top-k candidates.

    A row is settled when its best kept candidate scores strictly above its k-th candidate
    (so no candidate outside the top-k can beat or tie it), or when the top-k hold every
    candidate of the row (fewer than k). Candidates are ordered by score, then column.
    """
    by_column = top.index.argsort(dim=1, stable=True)
    values, index = top.values.gather(1, by_column), top.index.gather(1, by_column)
    sim_mm, sim_tt = sim_mm.gather(1, by_column), sim_tt.gather(1, by_column)
    order = values.argsort(dim=1, descending=True, stable=True)
    values, index = values.gather(1, order), index.gather(1, order)
    kept = (values > float("-inf")) & ~(sim_mm.gather(1, order) > motion_threshold) & ~(
        sim_tt.gather(1, order) > text_threshold)
    first = kept.to(torch.int8).argmax(dim=1)
    any_kept = kept.any(dim=1)
    chosen_value = values.gather(1, first[:, None]).squeeze(1)
    every_candidate = values[:, -1] == float("-inf")
    settled = every_candidate | (any_kept & (chosen_value > values[:, -1]))
    chosen = torch.where(any_kept, index.gather(1, first[:, None]).squeeze(1), -1)
    return chosen, settled


def top_k_search(pairs: Pairs, rows: Tensor | None, thresholds: DropThresholds, k: int,
                 chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(index_mt, index_tm, settled) of the rows from their top-k candidates alone."""
    top_mt, top_tm = _top_candidates(pairs, rows, k, chunk_size)
    rows_m, rows_t = (pairs.rows_m, pairs.rows_t) if rows is None else (pairs.rows_m[rows], pairs.rows_t[rows])
    index_mt, settled_mt = _first_kept(top_mt, _pair_sims(rows_m, pairs.cols_m, top_mt.index),
                                       _pair_sims(rows_t, pairs.cols_t, top_mt.index),
                                       thresholds.mt_motion, thresholds.mt_text)
    index_tm, settled_tm = _first_kept(top_tm, _pair_sims(rows_m, pairs.cols_m, top_tm.index),
                                       _pair_sims(rows_t, pairs.cols_t, top_tm.index),
                                       thresholds.tm_motion, thresholds.tm_text)
    return index_mt, index_tm, settled_mt & settled_tm


def probe(pairs: Pairs, thresholds: DropThresholds, k: int) -> str:
    """The search for these pairs, from a few evenly spaced rows: "plain" when they drop more
    than MAX_TILE_SHARE of their candidates (the bound's tiles hold every drop, so it cannot
    prune enough), "bounded" when the top-k search would leave more than PROBE_LIMIT of them
    unsettled, else "topk"."""
    if pairs.num_rows < PROBE_MIN_ROWS:
        return "topk"
    count = max(16, pairs.num_rows // 128)
    rows = torch.linspace(0, pairs.num_rows - 1, count, device=pairs.rows_m.device).long().unique()
    drop = (pairs.rows_m.index_select(0, rows) @ pairs.cols_m.T) > min(thresholds.mt_motion, thresholds.tm_motion)
    drop |= (pairs.rows_t.index_select(0, rows) @ pairs.cols_t.T) > min(thresholds.mt_text, thresholds.tm_text)
    if float(drop.float().mean()) > MAX_TILE_SHARE:
        return "plain"
    _, _, settled = top_k_search(pairs, rows, thresholds, k, chunk_width(AUTO_CHUNK, rows.numel()))
    return "bounded" if float((~settled).float().mean()) > PROBE_LIMIT else "topk"


# ----------------------------------------------------------------------------- MH and the dispatcher


def _hardest_scores(pairs: Pairs, chunk_size: int) -> tuple[Tensor, Tensor]:
    """MH: each row's hardest negative per direction, by score alone. In a single process the
    columns of the one score product are the text -> motion rows (first maximal row wins a
    tie there too, so ties still go to the lowest column)."""
    hardest_mt, hardest_tm = _Hardest(pairs.num_rows, pairs.rows_m), _Hardest(pairs.num_rows, pairs.rows_m)
    index_tm = torch.full((pairs.num_cols,), -1, dtype=torch.int64, device=pairs.rows_m.device)
    for start in column_chunks(pairs.num_cols, chunk_size):
        stop = min(start + chunk_size, pairs.num_cols)
        col_index = torch.arange(start, stop, device=pairs.rows_m.device)
        _, not_negative = chunk_masks(pairs, start, stop)
        scores = (pairs.rows_m @ pairs.cols_t[start:stop].T).masked_fill_(not_negative, float("-inf"))
        hardest_mt.update(scores, col_index)
        if pairs.shared:
            value, index = scores.max(dim=0)
            index_tm[start:stop] = torch.where(value > float("-inf"), index, -1)
            continue
        scores = (pairs.rows_t @ pairs.cols_m[start:stop].T).masked_fill_(not_negative, float("-inf"))
        hardest_tm.update(scores, col_index)
    return hardest_mt.index, index_tm if pairs.shared else hardest_tm.index


def hardest_kept_negatives(
    pairs: Pairs,
    *,
    thresholds: DropThresholds | None,
    chunk_size: int = AUTO_CHUNK,
    count_drops: bool = True,
    strategy: str = "auto",
    top_k: int = TOP_K,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Global column index of each anchor's hardest kept negative, without grad.

    Returns (index_mt, index_tm, dropped, candidates); an index is -1 where no negative
    remains. thresholds=None means MH (nothing dropped). `dropped` is NOT_COUNTED unless
    count_drops. strategy: "topk" (then the bounded scan for the rows it cannot settle),
    "bounded", "plain" (every intra-modal similarity), or "auto" (see the module docstring);
    all give the same indices.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    chunk_size = chunk_width(chunk_size, pairs.num_rows)
    candidates = candidate_count(pairs.row_ids, pairs.col_ids)
    with torch.no_grad():
        if thresholds is None:
            index_mt, index_tm = _hardest_scores(pairs, chunk_size)
            return index_mt, index_tm, zero_count(pairs.rows_m.device), candidates
        if strategy == "auto" and pairs.num_rows * pairs.num_cols < MIN_SEARCH_CELLS:
            strategy = "plain"
        if strategy == "auto":
            strategy = probe(pairs, thresholds, top_k)
        if strategy in ("bounded", "plain"):
            index_mt, index_tm, dropped = bounded_scan(pairs, None, thresholds, chunk_size,
                                                       bounded=strategy == "bounded", count=count_drops)
            return index_mt, index_tm, dropped, candidates
        index_mt, index_tm, settled = top_k_search(pairs, None, thresholds, top_k, chunk_size)
        rest = torch.nonzero(~settled).squeeze(1)
        if rest.numel():
            scanned_mt, scanned_tm, _ = bounded_scan(pairs, rest, thresholds, chunk_width(AUTO_CHUNK, rest.numel()))
            index_mt[rest], index_tm[rest] = scanned_mt, scanned_tm
        dropped = count_dropped_pairs(pairs, thresholds, chunk_size) if count_drops else torch.full(
            (), NOT_COUNTED, dtype=torch.int64, device=pairs.rows_m.device)
    return index_mt, index_tm, dropped, candidates

