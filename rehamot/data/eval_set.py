"""The evaluation set: every motion and every caption of a split exactly once, stable order.

Motions are indexed 0..M-1 by sorted sample id and captions 0..C-1 in (motion, caption) order;
rank r of W owns the motions and captions whose index % W == r. Construction reads only the
JSON members (ids and captions); motion_batches streams this rank's motions on demand, so a
rank never holds the split's motions in memory.

Evaluation is exact or nothing: a bad sample raises (never skipped), whatever `strict` says;
that includes a sample whose members differ from its shard index's digests (digest_mismatch).
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
    check_digests,
    decode_meta_member,
    decode_motion_member,
    load_indexes,
    member_url,
    read_manifest,
    read_members,
    split_shards,
)

_META_ONLY = frozenset({schema.META_MEMBER})
_MOTION_ONLY = frozenset({schema.MOTION_MEMBER})


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

        metas: dict[str, dict[str, Any]] = {}
        for url, index in zip(self.shard_urls, self.indexes):
            for raw in read_members(url, _META_ONLY, max_member=schema.member_cap(self.feature_dim)):
                _checked(url, raw["__key__"], check_digests, index, raw)
                meta = _checked(url, raw["__key__"], decode_meta_member, raw)
                if meta["id"] in metas:
                    raise ValueError(f"{url}: sample {meta['id']} appears twice in split "
                                     f"{cfg.split!r}")
                metas[meta["id"]] = meta
        expected = sum(int(r["samples"]) for r in records)
        if len(metas) != expected:
            raise ValueError(f"split {cfg.split!r}: read {len(metas)} samples, the manifest "
                             f"says {expected}")
        self.ids: list[str] = sorted(metas)
        self.index_of = {sample_id: i for i, sample_id in enumerate(self.ids)}
        self.captions: list[EvalCaption] = [
            EvalCaption(c["caption_id"], i, c["text"])
            for i, sample_id in enumerate(self.ids) for c in metas[sample_id]["captions"]
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
        def mine(key: str) -> bool:
            index = self.index_of.get(key)
            return index is not None and index % self.world_size == self.rank

        pending: list[tuple[int, Any]] = []
        delivered = 0
        for url, index in zip(self.shard_urls, self.indexes):
            for raw in read_members(url, _MOTION_ONLY, want_key=mine,
                                    max_member=schema.member_cap(self.feature_dim)):
                key = raw["__key__"]
                if schema.MOTION_MEMBER not in raw:
                    raise ValueError(f"{url}: sample {key} has no motion member")
                _checked(url, key, check_digests, index, raw)
                motion = _checked(url, key, decode_motion_member, raw[schema.MOTION_MEMBER],
                                  self.feature_dim)
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


def _checked(url: str, key: str, decode: Any, *args: Any) -> Any:
    try:
        return decode(*args)
    except BadSample as exn:
        raise ValueError(f"{url}: sample {key}: {exn} (evaluation needs every sample)") from exn
