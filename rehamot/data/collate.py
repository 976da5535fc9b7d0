"""Batch assembly: pad motions to the batch maximum, build masks, keep ids, tokenise captions.

Tokenisation runs here, i.e. inside the loader workers, not in the model's forward pass.
"""
from __future__ import annotations

import hashlib
import math
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


def shared_zeros(shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 tensor of zeros allocated in shared memory.

    A loader worker hands its batches to the trainer through shared memory; a tensor built in
    private memory is copied into a fresh segment on the way (one more pass over ~200 KB per
    sample, and the fresh segment's page faults). Built there directly, it is written once. A
    new segment is zero-filled by the kernel; `share_memory_` is the public fallback.
    """
    count = math.prod(shape)
    try:
        storage = torch.UntypedStorage._new_shared(count * 4)
        return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape)
    except (AttributeError, TypeError, RuntimeError):
        return torch.zeros(shape, dtype=torch.float32).share_memory_()


def pad_motions(motions: Sequence[np.ndarray], mean: np.ndarray | None = None,
                std: np.ndarray | None = None, shared: bool = False) -> dict[str, torch.Tensor]:
    """Zero-pad (T_i, F) motions to (B, T_max, F) float32; motion_mask is True on real frames.

    With `mean` and `std` (float32, F) each motion is z-normalised on its way into the padded
    buffer: the same float32 operations as motion.normalize, without a temporary per motion.
    `shared`: the buffer is allocated in shared memory (a loader worker's batch).
    """
    if not motions:
        raise ValueError("cannot collate an empty batch")
    lengths = torch.tensor([m.shape[0] for m in motions], dtype=torch.int64)
    shape = (len(motions), int(lengths.max()), motions[0].shape[1])
    out = shared_zeros(shape) if shared else torch.zeros(shape, dtype=torch.float32)
    padded = out.numpy()
    for row, motion in enumerate(motions):
        rows = padded[row, : motion.shape[0]]
        if mean is None or std is None:
            rows[...] = motion
        else:
            np.subtract(motion.astype(np.float32, copy=False), mean, out=rows)
            np.divide(rows, std, out=rows)
    mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
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
    mean: np.ndarray | None = None, std: np.ndarray | None = None, shared: bool = False,
) -> dict[str, Any]:
    """Items {motion (T,F), id, caption_id, text[, shard]} -> one training batch dict.

    Keys: motion, motion_mask, lengths, motion_index, ids, caption_ids, texts, shards (each
    item's shard file name, None when not given) and, when a tokenizer is given, input_ids and
    attention_mask. Without one (precomputed text features) the caption ids identify the texts.
    With `mean` and `std` the motions are normalised as they are padded, into shared memory
    with `shared` (pad_motions).
    """
    batch: dict[str, Any] = pad_motions([item["motion"] for item in items], mean, std, shared)
    ids = [item["id"] for item in items]
    batch["motion_index"] = torch.tensor([motion_index(i) for i in ids], dtype=torch.int64)
    batch["ids"] = ids
    batch["caption_ids"] = [item["caption_id"] for item in items]
    batch["texts"] = [item["text"] for item in items]
    batch["shards"] = [item.get("shard") for item in items]
    if tokenizer is not None:
        batch.update(tokenize(tokenizer, batch["texts"], max_text_len))
    return batch
