"""The training stream over real tar shards: order, resume, equal steps, crops, bad samples."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from data_fixtures import minilm_tokenizer, truncate_inside_sample, write_shard_set

from rehamot.data.pipeline import DataConfig, TrainStream
from rehamot.data.reading import BadSampleError, RateLimitedWarning
from rehamot.data.schema import ShardSetError

SIZES = [3, 11, 5, 17, 2, 9, 13]  # 60 samples in deliberately uneven shards
B = 4


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    return write_shard_set(tmp_path_factory.mktemp("shards"), {"train": SIZES})


def config(shard_set, **overrides) -> DataConfig:
    base = DataConfig(str(shard_set.root), batch_size=B, num_workers=0, seed=11,
                      shuffle_buffer=16)
    return replace(base, **overrides)


def run(stream: TrainStream, epoch: int = 0, start_step: int = 0) -> list[dict]:
    return list(stream.loader(epoch, start_step))


def id_at(shard_set, split="train"):
    """(shard, position) -> sample id, from the order the fixture wrote them in."""
    table, ids = {}, iter(shard_set.ids[split])
    for shard, size in enumerate(SIZES):
        for position in range(size):
            table[shard, position] = next(ids)
    return table


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["step"] == y["step"] and x["ids"] == y["ids"]
        assert x["caption_ids"] == y["caption_ids"]
        assert torch.equal(x["motion"], y["motion"]) and torch.equal(x["input_ids"], y["input_ids"])


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_every_rank_gets_the_same_full_batches_and_disjoint_samples(shard_set, world_size,
                                                                    num_workers):
    cfg = config(shard_set, num_workers=num_workers)
    streams = [TrainStream(cfg, None, rank, world_size) for rank in range(world_size)]
    steps = sum(SIZES) // (world_size * B)
    where = id_at(shard_set)
    seen = []
    for stream in streams:
        assert stream.steps_per_epoch == steps
        loader = stream.loader(epoch=1)
        assert len(loader) == steps
        batches = list(loader)
        assert [b["step"] for b in batches] == list(range(steps))
        assert all(len(b["ids"]) == B and b["motion"].shape[0] == B for b in batches)
        for slot in stream.plan(1):  # each worker delivered exactly its planned samples
            planned = {where[s.shard, p] for s in slot.segments for p in range(s.first, s.stop)}
            got = {i for b in batches if b["step"] in slot.batches for i in b["ids"]}
            assert got == planned
        seen += [i for b in batches for i in b["ids"]]
    assert len(seen) == len(set(seen)) == steps * world_size * B  # disjoint across ranks


def test_same_arguments_same_batches_and_epochs_differ(shard_set):
    cfg = config(shard_set, num_workers=2, min_len=8, max_len=30)
    first = run(TrainStream(cfg, minilm_tokenizer(), 1, 2), epoch=4)
    again = run(TrainStream(cfg, minilm_tokenizer(), 1, 2), epoch=4)
    assert_same_batches(first, again)
    other = run(TrainStream(cfg, minilm_tokenizer(), 1, 2), epoch=5)
    assert [b["ids"] for b in other] != [b["ids"] for b in first]


@pytest.mark.parametrize(("num_workers", "start"), [(2, 3), (2, 4), (2, 6), (0, 2), (1, 6)])
def test_resume_reproduces_the_tail(shard_set, num_workers, start):
    cfg = config(shard_set, num_workers=num_workers, min_len=8, max_len=30)
    stream = TrainStream(cfg, minilm_tokenizer(), 0, 2)
    full = run(stream, epoch=2)
    tail = stream.loader(2, start_step=start)
    assert len(tail) == len(full) - start
    assert_same_batches(list(tail), full[start:])
    assert run(stream, epoch=2, start_step=stream.steps_per_epoch) == []


def test_windows_are_normalised_crops_within_bounds(shard_set):
    cfg = config(shard_set, min_len=10, max_len=30)
    batches = run(TrainStream(cfg, None, 0, 1))
    rows = 0
    for batch in batches:
        for row, sample_id in enumerate(batch["ids"]):
            full = shard_set.normalized(sample_id)
            n = int(batch["lengths"][row])
            assert min(10, len(full)) <= n <= min(30, len(full))
            assert batch["motion_mask"][row].sum() == n
            assert (batch["motion"][row, n:] == 0).all()
            window = batch["motion"][row, :n].numpy()
            starts = [s for s in range(len(full) - n + 1)
                      if np.allclose(full[s : s + n], window, atol=1e-5)]
            assert starts, f"{sample_id}: not a window of the normalised motion"
            rows += 1
    assert rows == 60  # W=1, B=4: all 60 samples


def test_one_caption_per_visit_and_all_captions_over_epochs(shard_set):
    cfg = config(shard_set, batch_size=6)  # 60 = 10 x 6: every motion every epoch
    stream = TrainStream(cfg, None, 0, 1)
    drawn = Counter()
    for epoch in range(40):
        visits = Counter()
        for batch in run(stream, epoch):
            for sample_id, caption_id, text in zip(batch["ids"], batch["caption_ids"],
                                                   batch["texts"]):
                assert (caption_id, text) in shard_set.captions[sample_id]
                visits[sample_id] += 1
                drawn[caption_id] += 1
        assert set(visits.values()) == {1} and len(visits) == 60
    every_caption = {c for caps in shard_set.captions.values() for c, _ in caps}
    assert set(drawn) == every_caption
    # Uniform draw: each of a motion's k captions gets about 40 / k of its 40 visits.
    for caps in shard_set.captions.values():
        share = 40 / len(caps)
        assert all(0.3 * share <= drawn[c] <= 2.2 * share for c, _ in caps)


BAD = {1: "npy", 5: "pickle", 14: "json", 20: "dim", 33: "nan", 40: "no_motion",
       41: "no_captions"}


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    shards = write_shard_set(tmp_path_factory.mktemp("bad"), {"train": SIZES}, bad=BAD)
    truncate_inside_sample(shards.shard_paths("train")[3], 10)  # shard 3 keeps 10 of 17
    return shards


def expected_bad_and_taken(stream, shard_set, slot, quota):
    """Walk the slot's planned positions as the reader does (again from the start while the
    quota is not met) and count the bad reads on the way."""
    where = id_at(shard_set)
    lost = {where[3, p] for p in range(10, 17)} | {where[s, p] for (s, p) in where
                                                  if where[s, p] in shard_set.bad}
    flags = [where[s.shard, p] in lost for s in slot.segments for p in range(s.first, s.stop)]
    bad = taken = 0
    while taken < quota:
        for is_bad in flags:
            if taken == quota:
                break
            bad, taken = bad + is_bad, taken + (not is_bad)
    return bad, lost


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_skipped_counted_and_steps_unchanged(bad_shards, num_workers, caplog):
    cfg = config(bad_shards, num_workers=num_workers)
    stream = TrainStream(cfg, None, 0, 1)
    with caplog.at_level(logging.WARNING, logger="rehamot.data"):
        batches = run(stream, epoch=0)
    assert len(batches) == stream.steps_per_epoch == 15
    assert all(len(b["ids"]) == B for b in batches)
    expected, lost = 0, set()
    for slot in stream.plan(0):
        bad, lost = expected_bad_and_taken(stream, bad_shards, slot, len(slot.batches) * B)
        expected += bad
    assert sum(b["bad_samples"] for b in batches) == expected
    ids = [i for b in batches for i in b["ids"]]
    assert not set(ids) & lost
    assert len(ids) - len(set(ids)) == len(lost)  # one repeat per lost sample, no more
    if num_workers == 0:  # worker processes log to their own stderr
        assert "000005" in caplog.text and "pickle" in caplog.text


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_epoch_counts_each_bad_sample_once(bad_shards, num_workers):
    """A run's running total of bad samples (checkpointed with its position) stays exact
    across a resume: the batches a resumed loader emits carry the same counts as in the
    uninterrupted epoch, never those met while reading past the skipped batches again."""
    stream = TrainStream(config(bad_shards, num_workers=num_workers), None, 0, 1)
    full = run(stream, epoch=0)
    assert sum(b["bad_samples"] for b in full) > 0
    for start in (1, 5, 9):
        resumed = run(stream, epoch=0, start_step=start)
        assert [b["bad_samples"] for b in resumed] == [b["bad_samples"] for b in full[start:]]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_strict_mode_raises_with_shard_and_key(bad_shards, num_workers):
    cfg = config(bad_shards, num_workers=num_workers, strict=True)
    where = r"bad sample in \S+train-\d{6}\.tar, (\d{6}|samples \d+\.\.\d+): "
    with pytest.raises(BadSampleError, match=where):
        run(TrainStream(cfg, None, 0, 1))


def test_stream_preflight_and_missing_shard(shard_set, tmp_path):
    with pytest.raises(ValueError, match=r"7 shards, fewer than the 8 readers"):
        TrainStream(config(shard_set, num_workers=4), None, 0, 2)
    copy = write_shard_set(tmp_path / "copy", {"train": [2, 2]})
    copy.shard_paths("train")[1].unlink()
    with pytest.raises(ShardSetError, match=r"train-000001.tar is named in manifest.json but missing"):
        TrainStream(config(copy), None, 0, 1)


def test_rate_limited_warning_logs_first_then_one_per_interval(caplog):
    now = [0.0]
    warn = RateLimitedWarning(logging.getLogger("rehamot.test"), first=3, every_s=10.0,
                              clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="rehamot.test"):
        logged = [warn(f"m{i}") for i in range(8)]
        now[0] = 11.0
        logged.append(warn("late"))
    assert logged == [True] * 3 + [False] * 5 + [True]
    assert "late (5 similar messages suppressed)" in caplog.text
