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

Several sources (plan_mixture): a source of weight w = k + f (k whole, 0 <= f < 1) contributes
k passes over its train shards, each in its own seeded order, and, for f > 0, round(f * N)
consecutive positions, from a seeded start, of one more seeded order of them read as a cycle:
a different part each epoch, drawn from (seed, epoch, source). The sources' passes are then interleaved shard by shard in an
order drawn from (seed, epoch), each source's shards keeping their own order, and the
interleaved stream is cut into slot ranges as above; the shuffle buffer mixes within a slot.
The first pass of the first source is ordered as a lone shard set's, so one source of weight
1 is exactly plan_epoch's plan.

Dropped samples (drop_samples: train samples that duplicate a val/test sample, rehamot.data.leaks):
a source's shard is then read as the segments between them, and its sample count is the kept
count, so the steps per epoch, the equal steps of the ranks and exact resume hold as before;
nothing dropped leaves every plan as it was.
"""
from __future__ import annotations

import functools
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace


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


def shard_order(num_shards: int, seed: int, epoch: int | str) -> list[int]:
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
    order = shard_order(len(shard_sizes), seed, epoch)
    pieces = [Segment(shard, 0, shard_sizes[shard]) for shard in order]
    return cut_slots(pieces, world_size=world_size, num_workers=num_workers, batch_size=batch_size)


@dataclass(frozen=True)
class SourceShards:
    """One source of a mixture: its train shards' sizes, where they start in the stream's
    shard numbering (the sources' shard lists concatenated), and its weight."""

    name: str
    shard_sizes: tuple[int, ...]
    offset: int
    weight: float
    dropped: frozenset[tuple[int, int]] = frozenset()  # (its shard, position) never read

    @property
    def num_samples(self) -> int:
        return sum(self.shard_sizes) - len(self.dropped)

    @functools.cached_property
    def _dropped_by_shard(self) -> dict[int, list[int]]:
        """Dropped positions per shard, ascending (grouped once: plans ask per shard, per epoch)."""
        by_shard: dict[int, list[int]] = {}
        for shard, position in sorted(self.dropped):
            by_shard.setdefault(shard, []).append(position)
        return by_shard

    def shard_pieces(self, shard: int) -> list[Segment]:
        """One of its shards (numbered within the source) as the segments of its kept positions."""
        pieces, first = [], 0
        for position in self._dropped_by_shard.get(shard, ()):
            if first < position:
                pieces.append(Segment(self.offset + shard, first, position))
            first = position + 1
        if first < self.shard_sizes[shard]:
            pieces.append(Segment(self.offset + shard, first, self.shard_sizes[shard]))
        return pieces


def drop_samples(sources: Sequence[SourceShards], shard_keys: Sequence[Sequence[str]],
                 dropped: Mapping[str, Sequence[str]]) -> list[SourceShards]:
    """The sources with the samples `dropped` names ({source name: sample keys}) left out;
    shard_keys: each shard's sample keys in tar order, in the stream's shard numbering."""
    out = []
    for source in sources:
        keys = set(dropped.get(source.name, ()))
        gone = frozenset((shard, position) for shard in range(len(source.shard_sizes))
                         for position, key in enumerate(shard_keys[source.offset + shard]) if key in keys)
        out.append(replace(source, dropped=source.dropped | gone))
    return out


def mixture_samples(sources: Sequence[SourceShards]) -> int:
    """Sample visits in one epoch of the mixture (the same every epoch)."""
    return sum(_visits(source) for source in sources)


def _visits(source: SourceShards) -> int:
    whole = int(source.weight)
    return whole * source.num_samples + round((source.weight - whole) * source.num_samples)


def source_pieces(source: SourceShards, *, seed: int, epoch: int, first_source: bool) -> list[Segment]:
    """A source's shard pieces of the epoch, in its own reading order (module docstring)."""
    sizes, whole = source.shard_sizes, int(source.weight)
    pieces = []
    for copy in range(whole):
        key = epoch if first_source and copy == 0 else f"{epoch}/{source.name}/{copy}"
        pieces += [piece for s in shard_order(len(sizes), seed, key) for piece in source.shard_pieces(s)]
    part = round((source.weight - whole) * source.num_samples)
    if part:
        order = [piece for s in shard_order(len(sizes), seed, f"{epoch}/{source.name}/part")
                 for piece in source.shard_pieces(s)]
        start = random.Random(f"rehamot/part/{seed}/{epoch}/{source.name}").randrange(source.num_samples)
        pieces += _window(order, start, part)
    return pieces


def _window(pieces: Sequence[Segment], start: int, count: int) -> list[Segment]:
    """`count` positions of the pieces read in a cycle, from position `start` on."""
    out, position = [], 0
    for piece in [*pieces, *pieces]:
        first, stop = max(start, position), min(start + count, position + piece.size)
        if first < stop:
            out.append(Segment(piece.shard, piece.first + first - position, piece.first + stop - position))
        position += piece.size
    return out


def interleave(per_source: Sequence[list[Segment]], seed: int, epoch: int) -> list[Segment]:
    """The sources' pieces merged in a seeded order; each source's pieces keep their order."""
    turns = [i for i, pieces in enumerate(per_source) for _ in pieces]
    random.Random(f"rehamot/mix/{seed}/{epoch}").shuffle(turns)
    queues = [iter(pieces) for pieces in per_source]
    return [next(queues[i]) for i in turns]


def plan_mixture(
    sources: Sequence[SourceShards],
    *,
    seed: int,
    epoch: int,
    world_size: int,
    num_workers: int,
    batch_size: int,
) -> list[SlotPlan]:
    """plan_epoch over several weighted sources (module docstring), rank-major."""
    per_source = [source_pieces(source, seed=seed, epoch=epoch, first_source=i == 0)
                  for i, source in enumerate(sources)]
    return cut_slots(interleave(per_source, seed, epoch), world_size=world_size,
                     num_workers=num_workers, batch_size=batch_size)


def cut_slots(pieces: Sequence[Segment], *, world_size: int, num_workers: int, batch_size: int
              ) -> list[SlotPlan]:
    """The epoch's stream (pieces read in order) cut into W * max(num_workers, 1) slot ranges."""
    if world_size < 1 or batch_size < 1 or num_workers < 0:
        raise ValueError(f"bad sizes: world_size={world_size} batch_size={batch_size} "
                         f"num_workers={num_workers}")
    workers = max(num_workers, 1)  # num_workers=0 reads in the main process: one slot
    steps = steps_per_epoch(sum(p.size for p in pieces), world_size, batch_size)
    # Prefix positions of the concatenation, to cut it into slot ranges.
    starts, total = [], 0
    for piece in pieces:
        starts.append(total)
        total += piece.size

    plans, cursor = [], 0
    for rank in range(world_size):
        for worker in range(workers):
            batches = range(worker, steps, workers)
            end = cursor + len(batches) * batch_size
            segments = []
            for piece, start in zip(pieces, starts):
                first, stop = max(cursor, start), min(end, start + piece.size)
                if first < stop:
                    segments.append(Segment(piece.shard, piece.first + first - start, piece.first + stop - start))
            plans.append(SlotPlan(rank, worker, batches, tuple(segments)))
            cursor = end
    return plans
