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


def pad_motions(motions: Sequence[np.ndarray], mean: np.ndarray | None = None,
                std: np.ndarray | None = None, out: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
    """Zero-pad (T_i, F) motions to (B, T_max, F) float32; motion_mask is True on real frames.

    With `mean` and `std` (float32, F) each motion is z-normalised on its way into the padded
    buffer: the same float32 operations as motion.normalize, without a temporary per motion.
    `out`: the (B, T_max, F) float32 tensor to fill, every element written (a loader worker's
    shared-memory slot); a new one when None.
    """
    if not motions:
        raise ValueError("cannot collate an empty batch")
    lengths = torch.tensor([m.shape[0] for m in motions], dtype=torch.int64)
    shape = (len(motions), int(lengths.max()), motions[0].shape[1])
    if out is None:
        out = torch.zeros(shape, dtype=torch.float32)
    elif tuple(out.shape) != shape or out.dtype != torch.float32:
        raise ValueError(f"out is {out.dtype} {tuple(out.shape)}, the batch needs float32 {shape}")
    padded = out.numpy()
    for row, motion in enumerate(motions):
        frames = motion.shape[0]
        rows = padded[row, :frames]
        if mean is None or std is None:
            rows[...] = motion
        else:
            np.subtract(motion.astype(np.float32, copy=False), mean, out=rows)
            np.divide(rows, std, out=rows)
        padded[row, frames:] = 0.0
    mask = torch.arange(shape[1])[None, :] < lengths[:, None]
    return {"motion": out, "motion_mask": mask, "lengths": lengths}


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
    items: Sequence[dict[str, Any]], tokenizer: Tokenizer | None, max_text_len: int,
    mean: np.ndarray | None = None, std: np.ndarray | None = None, out: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Items {motion (T,F), id, caption_id, text[, shard]} -> one training batch dict.

    Keys: motion, motion_mask, lengths, motion_index, ids, caption_ids, texts, shards (each
    item's shard file name, None when not given) and, when a tokenizer is given, input_ids and
    attention_mask. Without one (precomputed text features) the caption ids identify the texts.
    With `mean` and `std` the motions are normalised as they are padded, into `out` when given
    (pad_motions).
    """
    batch: dict[str, Any] = pad_motions([item["motion"] for item in items], mean, std, out)
    ids = [item["id"] for item in items]
    batch["motion_index"] = torch.tensor([motion_index(i) for i in ids], dtype=torch.int64)
    batch["ids"] = ids
    batch["caption_ids"] = [item["caption_id"] for item in items]
    batch["texts"] = [item["text"] for item in items]
    batch["shards"] = [item.get("shard") for item in items]
    if tokenizer is not None:
        batch.update(tokenize(tokenizer, batch["texts"], max_text_len))
    return batch
