"""Batch assembly: pad motions to the batch maximum, build masks, keep ids, tokenise captions.

Tokenisation runs here, i.e. inside the loader workers, not in the model's forward pass.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

Tokenizer = Callable[..., Any]  # a Hugging Face tokenizer, or anything called the same way


def motion_index(sample_id: str) -> int:
    """A stable int64 for a sample id (63 bits of blake2b), the same in every process and run.

    The loss uses it to mask pairs of the same motion across ranks; Python's hash() would differ
    between processes.
    """
    digest = hashlib.blake2b(sample_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def pad_motions(motions: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
    """Zero-pad (T_i, F) motions to (B, T_max, F); motion_mask is True on real frames."""
    if not motions:
        raise ValueError("cannot collate an empty batch")
    lengths = torch.tensor([m.shape[0] for m in motions], dtype=torch.int64)
    feature_dim = motions[0].shape[1]
    padded = np.zeros((len(motions), int(lengths.max()), feature_dim), dtype=np.float32)
    for row, motion in enumerate(motions):
        padded[row, : motion.shape[0]] = motion
    mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
    return {"motion": torch.from_numpy(padded), "motion_mask": mask, "lengths": lengths}


def tokenize(tokenizer: Tokenizer, texts: Sequence[str], max_length: int
             ) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask (B, L) int64, padded to the longest text, truncated."""
    encoded = tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {
        "input_ids": torch.as_tensor(encoded["input_ids"], dtype=torch.int64),
        "attention_mask": torch.as_tensor(encoded["attention_mask"], dtype=torch.int64),
    }


def collate_pairs(
    items: Sequence[dict[str, Any]], tokenizer: Tokenizer | None, max_text_len: int
) -> dict[str, Any]:
    """Items {motion (T,F) float32, id, caption_id, text[, shard]} -> one training batch dict.

    Keys: motion, motion_mask, lengths, motion_index, ids, caption_ids, texts, shards (each
    item's shard file name, None when not given) and, when a tokenizer is given, input_ids and
    attention_mask. Without one (precomputed text features) the caption ids identify the texts.
    """
    batch: dict[str, Any] = pad_motions([item["motion"] for item in items])
    ids = [item["id"] for item in items]
    batch["motion_index"] = torch.tensor([motion_index(i) for i in ids], dtype=torch.int64)
    batch["ids"] = ids
    batch["caption_ids"] = [item["caption_id"] for item in items]
    batch["texts"] = [item["text"] for item in items]
    batch["shards"] = [item.get("shard") for item in items]
    if tokenizer is not None:
        batch.update(tokenize(tokenizer, batch["texts"], max_text_len))
    return batch
