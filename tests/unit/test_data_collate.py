"""Collation: padding, masks, ids, and tokenisation with the real MiniLM tokenizer."""
from __future__ import annotations

import numpy as np
import torch
from data_fixtures import minilm_tokenizer

from rehamot.data.collate import collate_pairs, motion_index, pad_motions


def test_pad_motions_masks_and_lengths():
    motions = [np.full((n, 3), n, dtype=np.float32) for n in (4, 7, 1)]
    batch = pad_motions(motions)
    assert batch["motion"].shape == (3, 7, 3) and batch["motion"].dtype == torch.float32
    assert batch["lengths"].tolist() == [4, 7, 1] and batch["lengths"].dtype == torch.int64
    assert batch["motion_mask"].dtype == torch.bool
    assert batch["motion_mask"].sum(1).tolist() == [4, 7, 1]
    for row, n in enumerate((4, 7, 1)):
        assert (batch["motion"][row, :n] == n).all()
        assert (batch["motion"][row, n:] == 0).all()  # padding is zero and masked out
        assert not batch["motion_mask"][row, n:].any()


def test_motion_index_is_a_stable_63_bit_hash():
    # Pinned: a change here silently breaks same-motion masking between old and new runs.
    assert motion_index("000123_1") == 2380855106416453587
    values = {motion_index(f"{i:06d}") for i in range(2000)}
    assert len(values) == 2000
    assert all(0 <= v < 2**63 for v in values)


def test_collate_pairs_keeps_ids_and_tokenizes_each_text():
    tokenizer = minilm_tokenizer()
    texts = ["a person walks forward", "someone jumps twice " + "very " * 30 + "high", "wave"]
    items = [{"motion": np.ones((n, 4), np.float32), "id": f"m{n}", "caption_id": f"m{n}:0",
              "text": t} for n, t in zip((5, 9, 2), texts)]
    batch = collate_pairs(items, tokenizer, max_text_len=16)
    assert batch["ids"] == ["m5", "m9", "m2"]
    assert batch["caption_ids"] == ["m5:0", "m9:0", "m2:0"]
    assert batch["texts"] == texts
    assert batch["motion_index"].tolist() == [motion_index(i) for i in batch["ids"]]
    assert batch["input_ids"].dtype == torch.int64 and batch["attention_mask"].dtype == torch.int64
    assert batch["input_ids"].shape == (3, 16)  # the long text is truncated to max_text_len
    for row, text in enumerate(texts):
        alone = tokenizer(text, truncation=True, max_length=16)["input_ids"]
        n = len(alone)
        assert batch["attention_mask"][row].sum() == n
        assert batch["input_ids"][row, :n].tolist() == alone
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()


def test_collate_without_tokenizer_keeps_texts_only():
    items = [{"motion": np.ones((3, 2), np.float32), "id": "a", "caption_id": "a:1", "text": "x"}]
    batch = collate_pairs(items, None, 8)
    assert "input_ids" not in batch and batch["caption_ids"] == ["a:1"]
