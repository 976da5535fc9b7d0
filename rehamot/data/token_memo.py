"""Token ids of the training captions, remembered across epochs instead of re-tokenised.

Tokenising a caption costs ~30-50 µs (the Rust tokenizer and its Python wrapper), a fifth of a
loader worker's time per sample once the rest was made fast; the same captions come back every
epoch. A `TokenMemo` belongs to one training stream, so one tokenizer and one max length: it
maps a caption's text to its token ids as the tokenizer gives them for that text alone
(special tokens included, truncated to max_length). A batch is then those ids padded to the
longest, on the tokenizer's padding side with its pad id, with an attention mask of ones on the
real tokens: exactly what `tokenizer(texts, padding=True, truncation=True, max_length=...)`
returns for the batch (tested against it).

How it fills: loader workers are forked at each epoch's start and inherit the memo as it is;
what a worker tokenises is sent to the trainer inside its batches anyway, and the trainer's
side records it (`record`), so the next epoch's workers find it. Shards stay tokenizer-free and
any Hugging Face tokenizer works. Nothing is written to disk. The memo stops growing at
MAX_ENTRIES captions (~100 bytes each).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

MAX_ENTRIES = 4_000_000


class TokenMemo:
    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length
        self.pad_id = tokenizer.pad_token_id
        self.left = getattr(tokenizer, "padding_side", "right") == "left"
        self.ids: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """input_ids and attention_mask (B, L) int64, as the tokenizer pads and truncates them;
        captions not remembered yet are tokenised together, in one call."""
        known = self.ids
        missing = [text for text in dict.fromkeys(texts) if text not in known]
        fresh: dict[str, np.ndarray] = {}
        if missing:
            encoded = self.tokenizer(missing, padding=True, truncation=True, max_length=self.max_length,
                                     return_tensors="np")
            real = np.asarray(encoded["attention_mask"]).astype(bool)
            ids = np.asarray(encoded["input_ids"], dtype=np.int64)
            fresh = {text: ids[row][real[row]] for row, text in enumerate(missing)}
            self._remember(fresh)
        rows = [known.get(text) if text in known else fresh[text] for text in texts]
        return self.pad(rows)

    def pad(self, rows: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        width = max(len(row) for row in rows)
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            cols = slice(width - len(row), width) if self.left else slice(0, len(row))
            input_ids[i, cols] = row
            attention_mask[i, cols] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def record(self, texts: Sequence[str], input_ids: Any, attention_mask: Any) -> None:
        """Remember the captions of a batch made elsewhere (a loader worker's)."""
        if len(self.ids) >= MAX_ENTRIES or all(text in self.ids for text in texts):
            return
        ids, real = np.asarray(input_ids), np.asarray(attention_mask).astype(bool)
        self._remember({text: ids[row][real[row]] for row, text in enumerate(texts)
                        if text not in self.ids})

    def _remember(self, rows: dict[str, np.ndarray]) -> None:
        room = MAX_ENTRIES - len(self.ids)
        if room > 0:
            self.ids.update(rows if len(rows) <= room else dict(list(rows.items())[:room]))
