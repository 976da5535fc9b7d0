"""Length bucketing of the training stream (data.length_buckets), on real tar shards."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from data_fixtures import write_shard_set

from rehamot.data.pipeline import DataConfig, TrainStream

SIZES = [23, 17, 31, 9, 40]  # 120 samples, uneven shards, lengths 20..60 frames
B = 4


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    return write_shard_set(tmp_path_factory.mktemp("buckets"), {"train": SIZES}, frames=(20, 60))


def config(shard_set, **overrides) -> DataConfig:
    base = DataConfig(str(shard_set.root), batch_size=B, num_workers=0, seed=5, shuffle_buffer=32)
    return replace(base, **overrides)


def run(cfg: DataConfig, epoch: int = 0, start_step: int = 0, rank: int = 0, world: int = 1) -> list[dict]:
    return list(TrainStream(cfg, None, rank, world).loader(epoch, start_step))


def padded_and_real(batches: list[dict]) -> tuple[int, int]:
    return (sum(b["motion"].shape[0] * b["motion"].shape[1] for b in batches),
            sum(int(b["lengths"].sum()) for b in batches))


def windows(batches: list[dict]) -> dict[str, torch.Tensor]:
    """sample id -> its (unpadded) normalised window, as delivered."""
    return {i: b["motion"][row, : int(b["lengths"][row])]
            for b in batches for row, i in enumerate(b["ids"])}


def test_padding_drops_to_the_sorted_pools_amount(shard_set):
    n = 4
    plain, bucketed = run(config(shard_set)), run(config(shard_set, length_buckets=n))
    assert len(plain) == len(bucketed) == sum(SIZES) // B  # 30 batches, the last pool has 2
    # What sorting each pool of n stream batches by length must give, from the plain stream.
    expected = 0
    for first in range(0, len(plain), n):
        lengths = sorted(int(x) for b in plain[first : first + n] for x in b["lengths"])
        expected += sum(B * max(lengths[i : i + B]) for i in range(0, len(lengths), B))
    padded_plain, real = padded_and_real(plain)
    padded_bucketed, real_bucketed = padded_and_real(bucketed)
    assert real_bucketed == real and padded_bucketed == expected
    assert padded_bucketed / real < padded_plain / real - 0.15  # 20..60 frames: ~1.5 -> ~1.1


def test_pools_hold_the_same_samples_and_crops_cut_by_length(shard_set):
    n = 4
    plain, bucketed = run(config(shard_set, min_len=10)), run(config(shard_set, min_len=10, length_buckets=n))
    for first in range(0, len(plain), n):
        pool_plain, pool = plain[first : first + n], bucketed[first : first + n]
        assert {i for b in pool for i in b["ids"]} == {i for b in pool_plain for i in b["ids"]}
        ranges = sorted((int(b["lengths"].min()), int(b["lengths"].max())) for b in pool)
        assert all(hi <= lo for (_, hi), (lo, _) in zip(ranges, ranges[1:]))  # disjoint length bands
    # The same sample gets the same window and caption with and without bucketing.
    got, want = windows(bucketed), windows(plain)
    assert got.keys() == want.keys() and all(torch.equal(got[i], want[i]) for i in want)
    captions = lambda bs: {i: c for b in bs for i, c in zip(b["ids"], b["caption_ids"])}  # noqa: E731
    assert captions(bucketed) == captions(plain)
    # Batches leave a pool in a seeded random order, not always shortest first.
    firsts = [int(bucketed[first]["lengths"].max()) == min(int(b["lengths"].max()) for b in bucketed[first : first + n])
              for first in range(0, len(bucketed) - n + 1, n)]
    assert not all(firsts)


def test_one_bucket_is_the_plain_stream_and_runs_repeat(shard_set):
    plain = run(config(shard_set))
    one = run(config(shard_set, length_buckets=1))
    assert [b["ids"] for b in one] == [b["ids"] for b in plain]
    first = run(config(shard_set, length_buckets=3), epoch=2)
    again = run(config(shard_set, length_buckets=3), epoch=2)
    assert [b["ids"] for b in first] == [b["ids"] for b in again]
    assert all(torch.equal(a["motion"], b["motion"]) for a, b in zip(first, again))
    assert [b["ids"] for b in run(config(shard_set, length_buckets=3), epoch=3)] != [b["ids"] for b in first]


@pytest.mark.parametrize(("world", "workers", "n"), [(1, 0, 4), (2, 2, 3), (2, 1, 5)])
def test_every_motion_once_and_equal_batch_counts_per_rank(shard_set, world, workers, n):
    cfg = config(shard_set, num_workers=workers, length_buckets=n)
    steps = sum(SIZES) // (world * B)
    seen: list[str] = []
    for rank in range(world):
        batches = run(cfg, epoch=1, rank=rank, world=world)
        assert [b["step"] for b in batches] == list(range(steps))
        assert all(len(b["ids"]) == B for b in batches)
        plain = run(replace(cfg, length_buckets=0), epoch=1, rank=rank, world=world)
        assert sorted(i for b in batches for i in b["ids"]) == sorted(i for b in plain for i in b["ids"])
        seen += [i for b in batches for i in b["ids"]]
    assert len(seen) == len(set(seen)) == steps * world * B


@pytest.mark.parametrize(("workers", "start"), [(0, 1), (0, 6), (0, 29), (2, 3), (2, 9)])
def test_resume_inside_a_pool_gives_the_same_later_batches(shard_set, workers, start):
    cfg = config(shard_set, num_workers=workers, length_buckets=4, min_len=10, max_len=40)
    full = run(cfg, epoch=3)
    tail = run(cfg, epoch=3, start_step=start)
    assert len(tail) == len(full) - start
    for a, b in zip(tail, full[start:]):
        assert a["step"] == b["step"] and a["ids"] == b["ids"] and a["caption_ids"] == b["caption_ids"]
        assert torch.equal(a["motion"], b["motion"]) and torch.equal(a["motion_mask"], b["motion_mask"])


def test_config_key_reaches_the_stream_and_is_validated():
    from rehamot.config import load_config
    from rehamot.data import data_config

    cfg = load_config(None, ["data.length_buckets=8"])
    assert data_config(cfg, "train").length_buckets == 8
    with pytest.raises(ValueError, match="invalid DataConfig"):
        DataConfig("x", length_buckets=-1)
