"""The evaluation set: every motion and caption exactly once, stable order, rank shares."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from data_fixtures import minilm_tokenizer, write_shard_set

from rehamot.data.collate import motion_index
from rehamot.data.eval_set import EvalSet
from rehamot.data.pipeline import DataConfig


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    # Uneven test shards after a train split, so test indices do not start at the first id.
    return write_shard_set(tmp_path_factory.mktemp("eval"), {"train": [4], "test": [5, 1, 8, 3]},
                           frames=(20, 60))


def config(shard_set) -> DataConfig:
    return DataConfig(str(shard_set.root), split="test", max_len=30)


def test_single_rank_sees_every_motion_and_caption_once_in_order(shard_set):
    evs = EvalSet(config(shard_set), minilm_tokenizer())
    ids = shard_set.ids["test"]
    assert evs.ids == sorted(ids) and evs.num_motions == 17
    expected = [(cid, ids.index(i), text) for i in sorted(ids) for cid, text in
                shard_set.captions[i]]
    assert [(c.caption_id, c.motion, c.text) for c in evs.captions] == expected
    batches = list(evs.motion_batches(batch_size=5))
    assert [len(b["ids"]) for b in batches] == [5, 5, 5, 2]
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(17))
    for batch in batches:
        assert batch["motion_index"].tolist() == [motion_index(i) for i in batch["ids"]]
        for row, sample_id in enumerate(batch["ids"]):
            full = shard_set.normalized(sample_id)
            n = min(len(full), 30)  # the first max_len frames, never a random window
            assert int(batch["lengths"][row]) == n == int(batch["motion_mask"][row].sum())
            np.testing.assert_allclose(batch["motion"][row, :n].numpy(), full[:n], atol=1e-5)
    captions = list(evs.caption_batches(batch_size=8))
    assert torch.cat([b["index"] for b in captions]).tolist() == list(range(evs.num_captions))
    assert torch.cat([b["motion"] for b in captions]).tolist() == [c.motion for c in evs.captions]
    first = captions[0]
    assert torch.equal(first["input_ids"], evs.tokenize(first["texts"])["input_ids"])


def test_two_ranks_split_motions_and_captions_without_overlap(shard_set):
    shares = [EvalSet(config(shard_set), None, rank, 2) for rank in range(2)]
    motions = [torch.cat([b["index"] for b in s.motion_batches(4)]).tolist() for s in shares]
    captions = [torch.cat([b["index"] for b in s.caption_batches(4)]).tolist() for s in shares]
    assert motions == [list(range(0, 17, 2)), list(range(1, 17, 2))]
    assert sorted(motions[0] + motions[1]) == list(range(17))
    total = shares[0].num_captions
    assert sorted(captions[0] + captions[1]) == list(range(total))
    assert not set(captions[0]) & set(captions[1])


def test_a_bad_sample_stops_evaluation(tmp_path):
    broken = write_shard_set(tmp_path, {"test": [3, 3]}, bad={4: "dim"})
    evs = EvalSet(DataConfig(str(broken.root), split="test"))
    with pytest.raises(ValueError, match=r"test-000001\.tar: sample 000004: motion shape"):
        list(evs.motion_batches(2))
    unreadable = write_shard_set(tmp_path / "json", {"test": [3]}, bad={1: "json"})
    with pytest.raises(ValueError, match=r"sample 000001: unreadable json"):
        EvalSet(DataConfig(str(unreadable.root), split="test"))
