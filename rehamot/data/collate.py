"""Batch assembly: pad motions to the batch maximum, build masks, keep ids, tokenise captions.

The training stream tokenises every caption of its split once, at start-up (`TokenTable`, from
the shard indexes' captions); its loader workers look a batch's captions up there and pad them,
never calling the tokenizer. Evaluation tokenises per batch (`tokenize`).
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


class TokenTable:
    """Token ids of a list of captions, tokenised once in batched calls: row r's ids are
    those of its text alone (as the tokenizer gives them for that text alone: special
    tokens included, truncated to max_length): `spans[r]` is (start, end) in `ids`. Unique texts are tokenised once; the arrays
    (int32 ids, int64 offsets) are read-only and shared with forked loader workers as they are
    (a spawned worker gets them pickled with the stream). `batch(rows)` pads like the
    tokenizer: `tokenizer(texts, padding=True, truncation=True, max_length=...)` of those rows'
    texts (tested against it)."""

    CHUNK = 4096  # texts per tokenizer call

    def __init__(self, ids: np.ndarray, spans: np.ndarray, pad_id: int, left: bool) -> None:
        self.ids, self.spans, self.pad_id, self.left = ids, spans, pad_id, left

    @classmethod
    def build(cls, tokenizer: Tokenizer, texts: Sequence[str], max_length: int) -> TokenTable:
        unique = list(dict.fromkeys(texts))
        lengths, parts = [], []
        for at in range(0, len(unique), cls.CHUNK):
            encoded = tokenizer(unique[at:at + cls.CHUNK], padding=False, truncation=True, max_length=max_length)
            for row in encoded["input_ids"]:
                lengths.append(len(row))
                parts.append(np.asarray(row, dtype=np.int32))
        flat = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        ends = np.cumsum(np.asarray(lengths, dtype=np.int64))
        of_unique = {text: i for i, text in enumerate(unique)}
        rows = np.fromiter((of_unique[t] for t in texts), dtype=np.int64, count=len(texts))
        starts = np.concatenate([[0], ends]).astype(np.int64)
        # per caption row: (start, end) of its unique text's ids
        spans = np.stack([starts[rows], starts[rows + 1]], axis=1) if len(texts) else np.zeros((0, 2), np.int64)
        left = getattr(tokenizer, "padding_side", "right") == "left"
        return cls(flat, spans, int(tokenizer.pad_token_id), left)

    def __len__(self) -> int:
        return len(self.spans)

    def batch(self, rows: Sequence[int]) -> dict[str, np.ndarray]:
        """input_ids and attention_mask (B, L) int64 of these caption rows, padded to the longest."""
        spans = self.spans[np.asarray(rows, dtype=np.int64)]
        lengths = spans[:, 1] - spans[:, 0]
        width = int(lengths.max())
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, (start, end) in enumerate(spans):
            cols = slice(width - (end - start), width) if self.left else slice(0, end - start)
            input_ids[i, cols] = self.ids[start:end]
            attention_mask[i, cols] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


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
