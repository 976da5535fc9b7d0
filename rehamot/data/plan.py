"""The epoch plan: which samples each (rank, loader worker) reads, as a pure function.

An epoch is one visit per motion (sample). Its `steps_per_epoch = N // (W * B)` global batches
are known from the manifest before any shard is opened.

How the plan keeps every rank at exactly that many steps, with uneven shards:

1. The split's shards are permuted with (seed, epoch) and read as one concatenated stream of N
   sample positions (the manifest knows every shard's sample count).
2. The stream is cut into W * nw contiguous ranges, one per slot (rank-major: rank r, worker w
   is slot r * nw + w). A slot's length is exactly its quota: a rank's DataLoader takes
   batch b from worker b % nw, so worker w of every rank delivers the batches
   range(w, steps, nw), i.e. len(range(w, steps, nw)) * B samples. Cuts fall inside shards where
   they must; the two slots sharing a shard each read their part of it.
3. The last N - steps * W * B (< W * B) positions of the permuted stream are not visited this
   epoch; the permutation changes every epoch, so a different tail is dropped each time.

Result: within an epoch every visited motion is seen exactly once, on exactly one rank and
worker, and every rank yields the same number of full batches by construction. (The only
repeats come from bad samples: the reader refills a slot's quota from the start of its own
range, one repeat per bad sample; see pipeline.py.)
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """Sample positions [first, stop) of one shard (index into the manifest's shard list)."""

    shard: int
    first: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.first


@dataclass(frozen=True)
class SlotPlan:
    """What one loader worker of one rank reads in one epoch, and which batches it delivers."""

    rank: int
    worker: int
    batches: range  # logical batch indices within the epoch, in delivery order
    segments: tuple[Segment, ...]  # read in this order

    @property
    def num_samples(self) -> int:
        return sum(s.size for s in self.segments)


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    return num_samples // (world_size * batch_size)


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The epoch's shard permutation; a str seed makes random.Random hash it with sha512."""
    order = list(range(num_shards))
    random.Random(f"rehamot/shards/{seed}/{epoch}").shuffle(order)
    return order


def plan_epoch(
    shard_sizes: Sequence[int],
    *,
    seed: int,
    epoch: int,
    world_size: int,
    num_workers: int,
    batch_size: int,
) -> list[SlotPlan]:
    """All W * max(num_workers, 1) slot plans of an epoch, rank-major."""
    if world_size < 1 or batch_size < 1 or num_workers < 0:
        raise ValueError(f"bad sizes: world_size={world_size} batch_size={batch_size} "
                         f"num_workers={num_workers}")
    workers = max(num_workers, 1)  # num_workers=0 reads in the main process: one slot
    steps = steps_per_epoch(sum(shard_sizes), world_size, batch_size)
    order = shard_order(len(shard_sizes), seed, epoch)
    # Prefix positions of the permuted concatenation, to cut it into slot ranges.
    starts, total = [], 0
    for shard in order:
        starts.append(total)
        total += shard_sizes[shard]

    plans, cursor = [], 0
    for rank in range(world_size):
        for worker in range(workers):
            batches = range(worker, steps, workers)
            end = cursor + len(batches) * batch_size
            segments = []
            for shard, start in zip(order, starts):
                first, stop = max(cursor, start), min(end, start + shard_sizes[shard])
                if first < stop:
                    segments.append(Segment(shard, first - start, stop - start))
            plans.append(SlotPlan(rank, worker, batches, tuple(segments)))
            cursor = end
    return plans
