"""The embedding index of a trained model: text -> top motions, motion -> top captions.

`build_index` encodes every motion and caption of a split once with the run's exported
bundle and writes RUN_DIR/index/: motion_emb.npy and caption_emb.npy (float32 unit rows,
memory-mappable) and index.json (motion ids, each motion's captions and caption ids, the
split, the bundle's text-model fingerprint). A query is encoded with the bundle's text
tower; the search itself is one matrix-vector product over unit embeddings (cosine) and a
partial sort. In Python:

    from rehamot.search_index import SearchIndex
    index = SearchIndex.load("runs/demo")
    index.query_text("a person jumps twice", k=5)      # -> [MotionHit, ...]
    index.query_motion("000123", k=5)                  # -> [CaptionHit, ...]
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

INDEX_DIR = "index"
MOTION_FILE = "motion_emb.npy"
CAPTION_FILE = "caption_emb.npy"
META_FILE = "index.json"
INDEX_FORMAT = "rehamot-index/1"


class SearchError(ValueError):
    """A query the index cannot answer (empty text, unknown id, stale or missing index)."""


@dataclass(frozen=True)
class MotionHit:
    rank: int  # 1 = best
    motion_id: str
    score: float  # cosine similarity
    captions: list[str]


@dataclass(frozen=True)
class CaptionHit:
    rank: int
    caption_id: str
    motion_id: str  # the motion this caption describes
    text: str
    score: float
    own: bool  # a caption of the query motion itself


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, best first; equal scores in ascending index order
    (the same as a stable descending argsort, at O(N) instead of O(N log N))."""
    n = scores.shape[0]
    k = min(k, n)
    if k <= 0:
        return np.empty(0, dtype=np.intp)
    if k < n:
        kth = scores[np.argpartition(scores, n - k)[n - k]]  # the k-th largest value
        candidates = np.flatnonzero(scores >= kth)  # every tie at the boundary, then cut
    else:
        candidates = np.arange(n)
    order = np.lexsort((candidates, -scores[candidates]))
    return candidates[order[:k]]


def _weights_sha256(path: Path) -> str:
    from rehamot.models.text_encoder import sha256_file  # torch-heavy: only when indexing

    return sha256_file(path)


def _bundle_identity(bundle: Path, info: dict[str, Any]) -> dict[str, Any]:
    """What an index must match to be searched with this bundle's text tower."""
    from rehamot.export import WEIGHTS_FILE

    return {"step": info.get("step"), "text_model": info.get("text_model"),
            "weights_sha256": _weights_sha256(bundle / WEIGHTS_FILE)}


# --------------------------------------------------------------------------- building


def build_index(run_dir: str | Path, shards: str | None = None, split: str = "test",
                batch_size: int = 128) -> Path:
    """Encode the split with the run's bundle and write RUN_DIR/index/ (rank 0; atomic)."""
    import torch.distributed as dist

    from rehamot.data import EvalSet
    from rehamot.data import data_config
    from rehamot.distributed import init_distributed, local_device
    from rehamot.evaluation import encode_split
    from rehamot.export import find_bundle, load_bundle
    from rehamot.model_factory import build_tokenizer

    run_dir = Path(run_dir)
    world = init_distributed()
    device = local_device()
    bundle = find_bundle(run_dir)
    model, cfg, info = load_bundle(bundle, device)
    if shards:
        cfg.data.shards = shards
    eval_set = EvalSet(data_config(cfg, split), build_tokenizer(cfg), world.rank, world.world_size)
    enc = encode_split(model, eval_set, device, batch_size)
    out = run_dir / INDEX_DIR
    if world.rank == 0:
        motions: list[dict[str, Any]] = [{"id": motion_id, "captions": []} for motion_id in enc["motion_ids"]]
        for owner, caption_id, text in zip(enc["caption_motion"], enc["caption_ids"], enc["texts"]):
            motions[int(owner)]["captions"].append({"id": caption_id, "text": text})
        meta = {"format": INDEX_FORMAT, "split": split, "shards": str(cfg.data.shards),
                "num_motions": len(motions), "num_captions": len(enc["texts"]),
                "dim": int(enc["motion_emb"].shape[1]),
                "bundle": os.path.relpath(bundle, run_dir),  # "best", "final", or "." for a bundle folder
                **_bundle_identity(bundle, info), "motions": motions}
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.save(tmp / MOTION_FILE, np.ascontiguousarray(enc["motion_emb"], dtype=np.float32), allow_pickle=False)
        np.save(tmp / CAPTION_FILE, np.ascontiguousarray(enc["caption_emb"], dtype=np.float32), allow_pickle=False)
        (tmp / META_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    if dist.is_initialized():
        dist.barrier()
    return out


# --------------------------------------------------------------------------- searching


class SearchIndex:
    """Unit motion and caption embeddings with their ids and captions; answers top-k queries.

    Build one with `SearchIndex.load(run_dir)` (what `search.py index` wrote) or directly from
    arrays. Text queries need a text encoder: `load` uses the bundle's text tower, loaded on the
    first text query.
    """

    def __init__(self, motion_emb: np.ndarray, caption_emb: np.ndarray, motions: Sequence[dict[str, Any]],
                 meta: dict[str, Any] | None = None, bundle_dir: Path | None = None) -> None:
        if motion_emb.ndim != 2 or caption_emb.ndim != 2 or motion_emb.shape[1] != caption_emb.shape[1]:
            raise SearchError(f"embeddings must be (N, D) with one D, got {motion_emb.shape} and {caption_emb.shape}")
        if len(motions) != motion_emb.shape[0]:
            raise SearchError(f"{len(motions)} motions in the metadata, {motion_emb.shape[0]} embeddings")
        self.motion_emb, self.caption_emb = motion_emb, caption_emb
        self.meta = meta or {}
        self.motion_ids = [str(m["id"]) for m in motions]
        self.motion_captions = [[c["text"] for c in m["captions"]] for m in motions]
        self.caption_ids = [str(c["id"]) for m in motions for c in m["captions"]]
        self.caption_texts = [text for texts in self.motion_captions for text in texts]
        self.caption_motion = np.repeat(np.arange(len(motions)), [len(m["captions"]) for m in motions])
        if len(self.caption_ids) != caption_emb.shape[0]:
            raise SearchError(f"{len(self.caption_ids)} captions in the metadata, {caption_emb.shape[0]} embeddings")
        self.position = {motion_id: i for i, motion_id in enumerate(self.motion_ids)}
        self.bundle_dir = bundle_dir
        self._text_tower: tuple[Any, Any, int] | None = None

    @classmethod
    def load(cls, run_dir: str | Path, mmap: bool = True) -> SearchIndex:
        """RUN_DIR/index/ as written by `search.py index`; embeddings memory-mapped by default."""
        folder = Path(run_dir) / INDEX_DIR
        if not (folder / META_FILE).is_file():
            raise SearchError(f"no search index in {run_dir}: build it with "
                              f"`python rehamot/search.py index {run_dir}`")
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != INDEX_FORMAT:
            raise SearchError(f"{folder}: index format {meta.get('format')!r}, this rehamot reads {INDEX_FORMAT}")
        mode = "r" if mmap else None
        motion_emb = np.load(folder / MOTION_FILE, mmap_mode=mode, allow_pickle=False)
        caption_emb = np.load(folder / CAPTION_FILE, mmap_mode=mode, allow_pickle=False)
        return cls(motion_emb, caption_emb, meta["motions"], meta, bundle_dir=Path(run_dir) / meta["bundle"])

    @property
    def num_motions(self) -> int:
        return len(self.motion_ids)

    # -- text tower ---------------------------------------------------------------------------
    def _tower(self) -> tuple[Any, Any, int]:
        if self._text_tower is None:
            if self.bundle_dir is None:
                raise SearchError("this index has no bundle to encode text with: pass embeddings "
                                  "to search_motions instead")
            from rehamot.export import load_bundle
            from rehamot.model_factory import build_tokenizer

            model, cfg, info = load_bundle(self.bundle_dir)
            identity = _bundle_identity(self.bundle_dir, info)
            for key in ("text_model", "weights_sha256"):
                if identity[key] != self.meta.get(key):
                    raise SearchError(f"the index was built with another {self.bundle_dir.name} bundle "
                                      f"({key} differs): rebuild it with `search.py index`")
            self._text_tower = (model, build_tokenizer(cfg), cfg.data.max_text_len)
        return self._text_tower

    def encode_text(self, text: str) -> np.ndarray:
        """The query's unit embedding (D,) from the bundle's text tower."""
        import torch

        from rehamot.data import tokenize

        text = _checked_text(text)
        model, tokenizer, max_length = self._tower()
        tokens = tokenize(tokenizer, [text], max_length)
        with torch.no_grad():
            emb = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
        return emb[0].float().numpy()

    # -- queries ------------------------------------------------------------------------------
    def search_motions(self, query_emb: np.ndarray, k: int = 5) -> list[MotionHit]:
        """Top-k motions for a unit query embedding (D,)."""
        k = _checked_k(k)
        scores = self.motion_emb @ np.asarray(query_emb, dtype=self.motion_emb.dtype)
        return [MotionHit(rank, self.motion_ids[i], float(scores[i]), self.motion_captions[i])
                for rank, i in enumerate(top_k(scores, k), start=1)]

    def query_text(self, text: str, k: int = 5) -> list[MotionHit]:
        """Top-k motions for a caption-like text."""
        _checked_k(k)
        return self.search_motions(self.encode_text(text), k)

    def query_motion(self, motion_id: str, k: int = 5) -> list[CaptionHit]:
        """Top-k captions of the index for one of its motions; `own` marks its own captions."""
        k = _checked_k(k)
        if motion_id not in self.position:
            split = f" {self.meta['split']}-split" if "split" in self.meta else ""
            raise SearchError(f"unknown motion id {motion_id!r}: the index holds {self.num_motions}{split} "
                              f"motions (e.g. {', '.join(self.motion_ids[:3])})")
        motion = self.position[motion_id]
        scores = self.caption_emb @ np.asarray(self.motion_emb[motion])
        return [CaptionHit(rank, self.caption_ids[i], self.motion_ids[self.caption_motion[i]],
                           self.caption_texts[i], float(scores[i]), bool(self.caption_motion[i] == motion))
                for rank, i in enumerate(top_k(scores, k), start=1)]


def _checked_text(text: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise SearchError("empty query: give a description to search for, e.g. \"a person jumps twice\"")
    return text.strip()


def _checked_k(k: int) -> int:
    if int(k) < 1:
        raise SearchError(f"top-k must be at least 1, got {k}")
    return int(k)


# --------------------------------------------------------------------------- CLI
