"""The evaluation set: every motion and every caption of a split exactly once, stable order.

Motions are indexed 0..M-1 by sorted sample id and captions 0..C-1 in (motion, caption) order;
rank r of W owns the motions and captions whose index % W == r. Construction reads only the
shard indexes (ids and captions); motion_batches reads this rank's samples on demand, so a
rank never holds the split's motions in memory.

Evaluation is exact or nothing: a bad sample raises (never skipped), whatever `strict` says;
that includes a sample whose members differ from its shard index's digests (digest_mismatch:
every member of a sample read is checked, its JSON too).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rehamot.data import schema
from rehamot.data.collate import Tokenizer, motion_index, pad_motions, tokenize
from rehamot.data.motion import eval_crop, normalize
from rehamot.data.pipeline import DataConfig
from rehamot.data.reading import (
    BadSample,
    decode_indexed,
    load_indexes,
    member_url,
    read_manifest,
    read_samples,
    split_shards,
)


@dataclass(frozen=True)
class EvalCaption:
    caption_id: str
    motion: int  # index of its motion in the split
    text: str


class EvalSet:
    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer | None = None, rank: int = 0,
                 world_size: int = 1, mean_std: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """mean_std: the normalisation the model was trained with (a bundle's, a mixture's);
        None: the shard set's own."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.cfg, self.tokenizer, self.rank, self.world_size = cfg, tokenizer, rank, world_size
        manifest = read_manifest(cfg.shards)
        records = split_shards(manifest, cfg.split)
        schema.check_shard_files(cfg.shards, manifest, [cfg.split])
        self.shard_urls = [member_url(cfg.shards, r["path"]) for r in records]
        self.indexes = load_indexes(cfg.shards, records)
        self.feature_dim = int(manifest["feature_dim"])
        self.mean, self.std = schema.mean_std(manifest) if mean_std is None else mean_std

        captions: dict[str, list[list[str]]] = {}
        for url, index in zip(self.shard_urls, self.indexes):
            for key, texts in zip(index.keys, index.captions):
                if isinstance(texts, str):
                    raise ValueError(f"{url}: sample {key}: {texts} (evaluation needs every sample)")
                if key in captions:
                    raise ValueError(f"{url}: sample {key} appears twice in split {cfg.split!r}")
                captions[key] = texts
        self.ids: list[str] = sorted(captions)
        self.index_of = {sample_id: i for i, sample_id in enumerate(self.ids)}
        self.captions: list[EvalCaption] = [
            EvalCaption(caption_id, i, text)
            for i, sample_id in enumerate(self.ids) for caption_id, text in captions[sample_id]
        ]

    @property
    def num_motions(self) -> int:
        return len(self.ids)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def motion_indices(self) -> list[int]:
        """This rank's share of the motions (global indices, ascending)."""
        return list(range(self.rank, self.num_motions, self.world_size))

    def caption_indices(self) -> list[int]:
        return list(range(self.rank, self.num_captions, self.world_size))

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise ValueError("EvalSet was built without a tokenizer")
        return tokenize(self.tokenizer, texts, self.cfg.max_text_len)

    def motion_batches(self, batch_size: int) -> Iterator[dict[str, Any]]:
        """This rank's motions, normalised, first max_len frames, padded per batch.

        Keys: motion, motion_mask, lengths, index (global motion index), ids, motion_index
        (the stable hash, as in training). Batches come in shard order; shards written by
        make_shards hold their samples sorted by id, so that is ascending index order.
        """
        pending: list[tuple[int, Any]] = []
        delivered = 0
        for url, index in zip(self.shard_urls, self.indexes):
            mine = [p for p, key in enumerate(index.keys) if self.index_of[key] % self.world_size == self.rank]
            for raw in _read(url, index, mine, self.feature_dim):
                key = raw["__key__"]
                motion = _checked(url, key, decode_indexed, index, raw, self.feature_dim)[1]
                window = normalize(eval_crop(motion, self.cfg.max_len), self.mean, self.std)
                pending.append((self.index_of[key], window))
                delivered += 1
                if len(pending) == batch_size:
                    yield self._motion_batch(pending)
                    pending = []
        if pending:
            yield self._motion_batch(pending)
        if delivered != len(self.motion_indices()):
            raise ValueError(f"split {self.cfg.split!r}: rank {self.rank} found "
                             f"{delivered} of its {len(self.motion_indices())} motions")

    def _motion_batch(self, pending: list[tuple[int, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = pad_motions([window for _, window in pending])
        batch["index"] = torch.tensor([i for i, _ in pending], dtype=torch.int64)
        batch["ids"] = [self.ids[i] for i, _ in pending]
        batch["motion_index"] = torch.tensor([motion_index(s) for s in batch["ids"]],
                                             dtype=torch.int64)
        return batch

    def caption_batches(self, batch_size: int) -> Iterator[dict[str, Any]]:
        """This rank's captions in index order. Keys: index (global caption index), motion
        (index of its motion), caption_ids, texts and, with a tokenizer, input_ids and
        attention_mask."""
        indices = self.caption_indices()
        for start in range(0, len(indices), batch_size):
            chunk = [self.captions[i] for i in indices[start : start + batch_size]]
            batch: dict[str, Any] = {
                "index": torch.tensor(indices[start : start + batch_size], dtype=torch.int64),
                "motion": torch.tensor([c.motion for c in chunk], dtype=torch.int64),
                "caption_ids": [c.caption_id for c in chunk],
                "texts": [c.text for c in chunk],
            }
            if self.tokenizer is not None:
                batch.update(self.tokenize(batch["texts"]))
            yield batch


def _read(url: str, index: schema.ShardIndex, positions: list[int], feature_dim: int
          ) -> Iterator[dict[str, Any]]:
    try:
        yield from read_samples(url, index, positions, None, schema.member_cap(feature_dim))
    except (OSError, ValueError) as exn:  # cut short, unreachable: evaluation needs every sample
        raise ValueError(f"{url}: shard unreadable ({exn}); evaluation needs every sample") from exn


def _checked(url: str, key: str, decode: Any, *args: Any) -> Any:
    try:
        return decode(*args)
    except BadSample as exn:
        raise ValueError(f"{url}: sample {key}: {exn} (evaluation needs every sample)") from exn
