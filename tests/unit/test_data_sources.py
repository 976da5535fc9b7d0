"""Several weighted sources in one epoch (plan_mixture, TrainStream over data.sources)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from data_fixtures import write_shard_set

from rehamot.config import ConfigError, load_config
from rehamot.data import schema
from rehamot.data.pipeline import DataConfig, Source, TrainStream
from rehamot.data.plan import SourceShards, mixture_samples, plan_epoch, plan_mixture, steps_per_epoch

# a: 16 samples, weight 2 -> 32 visits; b: 12, weight 1 -> 12; c: 24, weight 0.5 -> 12.
# 56 visits = 14 steps of 2 ranks x 2: nothing is left out, so every count is exact.
SOURCES = [SourceShards("a", (5, 7, 4), 0, 2.0), SourceShards("b", (6, 6), 3, 1.0),
           SourceShards("c", (3,) * 8, 5, 0.5)]
WORLD, WORKERS, B = 2, 2, 2


def plan(epoch: int, sources=SOURCES, **sizes):
    sizes = {"world_size": WORLD, "num_workers": WORKERS, "batch_size": B, **sizes}
    return plan_mixture(sources, seed=5, epoch=epoch, **sizes)


def visits(plans) -> Counter:
    """(global shard, position) -> visits in the epoch."""
    return Counter((seg.shard, p) for slot in plans for seg in slot.segments for p in range(seg.first, seg.stop))


def source_visits(counts: Counter, source: SourceShards) -> dict[tuple[int, int], int]:
    return {(source.offset + s, p): counts[(source.offset + s, p)]
            for s, size in enumerate(source.shard_sizes) for p in range(size)}


def test_each_source_is_visited_in_proportion_to_its_weight():
    assert mixture_samples(SOURCES) == 56
    counts = visits(plan(0))
    a, b, c = (source_visits(counts, s) for s in SOURCES)
    assert set(a.values()) == {2}  # every sample twice
    assert set(b.values()) == {1}
    assert sorted(c.values()) == [0] * 12 + [1] * 12  # half of them, once


def test_a_half_weight_visits_a_different_half_each_epoch():
    halves = [frozenset(k for k, n in source_visits(visits(plan(epoch)), SOURCES[2]).items() if n)
              for epoch in range(4)]
    assert all(len(half) == 12 for half in halves)
    assert all(x != y for x, y in zip(halves, halves[1:]))  # seeded by the epoch
    assert len(set(halves)) >= 3
    other = [SOURCES[0], SOURCES[1], SourceShards("d", (3,) * 8, 5, 0.5)]  # the same shards as another source
    assert frozenset(k for k, n in source_visits(visits(plan(0, other)), other[2]).items() if n) != halves[0]


def test_sources_are_interleaved_deterministically():
    order = [seg.shard for slot in plan(0) for seg in slot.segments]
    source_of = [next(i for i, s in enumerate(SOURCES) if s.offset <= shard < s.offset + len(s.shard_sizes))
                 for shard in order]
    changes = sum(1 for x, y in zip(source_of, source_of[1:]) if x != y)
    assert changes > 2 * len(SOURCES)  # mixed through the epoch, not one source after the other
    assert plan(0) == plan(0) and plan(0) != plan(1)


@pytest.mark.parametrize(("world", "workers", "batch"), [(1, 0, 4), (2, 2, 2), (3, 1, 5), (4, 3, 3)])
def test_every_rank_gets_the_same_steps(world, workers, batch):
    plans = plan(2, world_size=world, num_workers=workers, batch_size=batch)
    steps = steps_per_epoch(mixture_samples(SOURCES), world, batch)
    for rank in range(world):
        mine = [p for p in plans if p.rank == rank]
        assert sorted(b for p in mine for b in p.batches) == list(range(steps))
        assert all(p.num_samples == len(p.batches) * batch for p in mine)


@pytest.mark.parametrize("epoch", [0, 1, 7])
@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 1), (2, 3)])
def test_one_source_of_weight_one_is_the_plan_of_one_shard_set(epoch, world, workers):
    sizes = [9, 14, 6, 17, 11, 8]
    one = plan_mixture([SourceShards("x", tuple(sizes), 0, 1.0)], seed=5, epoch=epoch, world_size=world,
                       num_workers=workers, batch_size=4)
    assert one == plan_epoch(sizes, seed=5, epoch=epoch, world_size=world, num_workers=workers, batch_size=4)


def test_mixture_moments_are_those_of_the_weighted_pool():
    rng = np.random.default_rng(0)
    xa, xb = rng.normal(1.0, 2.0, (30, 3)), rng.normal(-2.0, 0.5, (10, 3))

    def manifest(x):
        return {"splits": {"train": {"motions": len(x)}}, "mean": x.mean(0).tolist(), "std": x.std(0).tolist()}

    mean, std = schema.mixture_mean_std([manifest(xa), manifest(xb)], [0.5, 2.0], "train")
    pooled = np.concatenate([xa[:15], xb, xb])  # weight 0.5: half of a; weight 2: b twice
    expected_std = np.sqrt(0.5 * 30 / 35 * (xa.var(0) + xa.mean(0) ** 2) + 20 / 35 * (xb.var(0) + xb.mean(0) ** 2)
                           - (0.5 * 30 * xa.mean(0) + 20 * xb.mean(0)) ** 2 / 35**2)
    np.testing.assert_allclose(mean, (15 * xa.mean(0) + 20 * xb.mean(0)) / 35, rtol=1e-5)
    np.testing.assert_allclose(std, expected_std, rtol=1e-5)
    assert pooled.shape[0] == 35


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("corpus-a"), tmp_path_factory.mktemp("corpus-b")
    write_shard_set(a, {"train": [5, 7]}, feature_dim=6, seed=1)
    write_shard_set(b, {"train": [4, 4]}, feature_dim=6, seed=2)
    return str(a), str(b)


def test_a_stream_of_two_sources_counts_each_sources_samples(two_sets):
    a, b = two_sets
    cfg = DataConfig(shards=a, sources=(Source("a", a, 2.0), Source("b", b, 0.5)), batch_size=4, num_workers=0,
                     seed=3, shuffle_buffer=0)
    stream = TrainStream(cfg, None)
    assert stream.steps_per_epoch == 7  # (2 x 12 + 0.5 x 8) / 4
    batches = list(stream.loader(0))
    drawn = sum(batch["source_samples"] for batch in batches).tolist()
    assert drawn == [24, 4]
    ids = [i for batch in batches for i in batch["ids"]]
    assert Counter(i.split("/")[0] for i in ids) == {"a": 24, "b": 4}  # an id names its source
    assert all(Counter(ids)[i] == 2 for i in ids if i.startswith("a/"))


def test_one_listed_source_reads_the_batches_of_data_shards(two_sets):
    a, _ = two_sets
    plain = DataConfig(shards=a, batch_size=4, num_workers=0, seed=3)
    listed = DataConfig(shards=a, sources=(Source("a", a, 1.0),), batch_size=4, num_workers=0, seed=3)
    for epoch in (0, 1):
        x, y = list(TrainStream(plain, None).loader(epoch)), list(TrainStream(listed, None).loader(epoch))
        assert [b.keys() for b in x] == [b.keys() for b in y] and "source_samples" not in x[0]
        assert all((bx["motion"] == by["motion"]).all() and bx["ids"] == by["ids"] for bx, by in zip(x, y))


def test_config_refuses_shards_and_sources_together_and_duplicate_names():
    with pytest.raises(ConfigError, match="data.shards or data.sources, not both"):
        load_config(None, ["data.shards=x", "data.sources=[{shards: y}]"])
    with pytest.raises(ConfigError, match="two sources are named 'x'"):
        load_config(None, ["data.sources=[{shards: a/x}, {shards: b/x, weight: 2}]"])
    with pytest.raises(ConfigError, match="eval_source='z' names no source"):
        load_config(None, ["data.sources=[{shards: a/x}]", "data.eval_source=z"])
    cfg = load_config(None, ["data.sources=[{shards: a/x}, {shards: b/x, name: other}]"])
    assert [s.name for s in cfg.data.sources] == ["x", "other"]
