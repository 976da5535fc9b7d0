"""Remembered token ids give the tokenizer's own batches, and later epochs use them."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from data_fixtures import minilm_tokenizer, write_shard_set

from rehamot.data.pipeline import DataConfig, TrainStream
from rehamot.data.token_memo import TokenMemo

TEXTS = ["a person walks forward", "someone jumps twice " + "very " * 30 + "high", "wave",
         "a person walks forward", "the man kneels, then stands up and bows"]


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_tokenizer()


@pytest.mark.parametrize("side", ["right", "left"])
def test_batches_equal_the_tokenizers_whether_remembered_or_not(tokenizer, side):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = side
    memo = TokenMemo(tokenizer, max_length=16)
    for batch in (TEXTS[:3], TEXTS, TEXTS[2:], ["unseen words here", "wave"]):
        ours = memo.tokenize(batch)
        theirs = tokenizer(batch, padding=True, truncation=True, max_length=16, return_tensors="np")
        assert np.array_equal(ours["input_ids"], theirs["input_ids"])
        assert np.array_equal(ours["attention_mask"], theirs["attention_mask"])
        assert ours["input_ids"].dtype == np.int64
    assert len(memo) == 5  # each distinct caption once


def test_recorded_captions_are_not_tokenised_again(tokenizer):
    memo = TokenMemo(tokenizer, max_length=16)
    made = tokenizer(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="np")
    memo.record(TEXTS, made["input_ids"], made["attention_mask"])
    memo.tokenizer = None  # a call now would fail: everything must come from the memo
    again = memo.tokenize(TEXTS[::-1])
    assert np.array_equal(again["input_ids"], made["input_ids"][::-1])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_later_epoch_uses_the_memo_and_gives_the_same_batches(tokenizer, tmp_path, num_workers):
    shards = write_shard_set(tmp_path, {"train": [10, 12, 9, 11]}, feature_dim=4)
    cfg = DataConfig(str(shards.root), batch_size=4, num_workers=num_workers, seed=3, max_text_len=12)
    warm = TrainStream(cfg, tokenizer)
    for epoch in range(3):
        list(warm.loader(epoch))
    remembered = len(warm.tokens)
    assert remembered > 30  # every caption the three epochs drew (the trainer's side records them)
    warm.tokens.tokenizer = None  # epoch 3 of the warm stream must not need the tokenizer for these
    cold = list(TrainStream(cfg, tokenizer).loader(2))
    hot = list(warm.loader(2))
    assert len(cold) == len(hot)
    for a, b in zip(cold, hot):
        assert a["texts"] == b["texts"]
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["attention_mask"], b["attention_mask"])
