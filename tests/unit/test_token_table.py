"""The split's captions tokenised once, up front: a batch looked up in the table is the
tokenizer's own batch, and the loader workers never call the tokenizer."""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from data_fixtures import minilm_tokenizer, write_shard_set

from rehamot.data.collate import TokenTable
from rehamot.data.pipeline import DataConfig, TrainStream

TEXTS = ["a person walks forward", "someone jumps twice " + "very " * 30 + "high", "wave",
         "a person walks forward", "the man kneels, then stands up and bows"]


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_tokenizer()


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_batch_equals_the_tokenizers(tokenizer, side):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = side
    table = TokenTable.build(tokenizer, TEXTS, max_length=16)
    assert len(table) == len(TEXTS) and table.ids.dtype == np.int32
    assert len(table.ids) == sum(len(tokenizer(t, truncation=True, max_length=16)["input_ids"])
                                 for t in dict.fromkeys(TEXTS))  # each distinct text once
    for rows in ([0, 1, 2], [0, 1, 2, 3, 4], [4, 3, 2], [2, 2, 0]):
        ours = table.batch(rows)
        theirs = tokenizer([TEXTS[r] for r in rows], padding=True, truncation=True, max_length=16,
                           return_tensors="np")
        assert np.array_equal(ours["input_ids"], theirs["input_ids"])
        assert np.array_equal(ours["attention_mask"], theirs["attention_mask"])
        assert ours["input_ids"].dtype == np.int64


def test_the_table_is_built_in_chunks_and_travels_pickled(tokenizer, monkeypatch):
    monkeypatch.setattr(TokenTable, "CHUNK", 2)  # several tokenizer calls
    table = pickle.loads(pickle.dumps(TokenTable.build(tokenizer, TEXTS, max_length=16)))  # a spawned worker's
    theirs = tokenizer(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="np")
    assert np.array_equal(table.batch(range(len(TEXTS)))["input_ids"], theirs["input_ids"])


class Counting:
    """The real tokenizer, counting the texts it is asked for."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.texts = tokenizer, 0
        self.pad_token_id, self.padding_side = tokenizer.pad_token_id, tokenizer.padding_side

    def __call__(self, texts, **kwargs):
        self.texts += len(texts)
        return self.tokenizer(texts, **kwargs)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_stream_tokenises_its_split_once_and_its_batches_are_the_tokenizers(tokenizer, tmp_path,
                                                                                num_workers):
    shards = write_shard_set(tmp_path, {"train": [10, 12, 9, 11]}, feature_dim=4)
    cfg = DataConfig(str(shards.root), batch_size=4, num_workers=num_workers, seed=3, max_text_len=12)
    counting = Counting(tokenizer)
    stream = TrainStream(cfg, counting)
    captions = sum(len(c) for c in shards.captions.values())
    assert counting.texts == captions and len(stream.tokens) == captions  # all of them, at start-up
    for epoch in range(2):
        for batch in stream.loader(epoch):
            theirs = tokenizer(batch["texts"], padding=True, truncation=True, max_length=12, return_tensors="pt")
            assert torch.equal(batch["input_ids"], theirs["input_ids"])
            assert torch.equal(batch["attention_mask"], theirs["attention_mask"])
    assert counting.texts == captions  # the loader never tokenised again
