"""The shard contract: what `shards/make_shards.py` writes and `rehamot.data` reads.

One WebDataset sample per motion (a captioned sub-clip is its own motion):

    <key>.motion.npy   float32 (or float16) array (T, F), saved with allow_pickle=False
    <key>.json         SampleMeta below, UTF-8 JSON

Keys contain no dots (WebDataset splits member names at the first dot).

`DIR/manifest.json` describes one shard set; see `Manifest` keys below. Everything here is
plain data (JSON, .npy without pickle) so that shards handed to us by others are never
unpickled.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MOTION_MEMBER = "motion.npy"
META_MEMBER = "json"
SHARD_PATTERN = "{split}-%06d.tar"
SPLITS = ("train", "val", "test")
STD_FLOOR = 1e-3  # constant channels must not divide by zero when normalising

# Stable reason codes for manifest["skipped"][i]["reason"].
SKIP_REASONS = {
    "non_finite": "motion contains NaN or inf",
    "bad_feature_dim": "feature dimension differs from the corpus's",
    "too_few_frames": "fewer frames than --min-frames",
    "unreadable_motion": "the .npy is truncated or unreadable",
    "pickled_motion": "the .npy holds Python objects (would need pickle)",
    "missing_caption_file": "no caption file for this motion",
    "empty_caption": "caption text is empty",
    "bad_encoding": "caption file is not valid UTF-8",
    "missing_motion": "a split names an id with no motion file",
    "duplicate_id": "the id appears more than once",
    "no_captions": "no usable caption is left for this motion",
    "bad_caption_span": "caption start/end lies outside the motion or is empty",
    "bad_caption_index": "a split's caption index does not exist in the caption file",
    "mirror_excluded": "mirrored (M...) id excluded by --mirrors exclude",
    "bad_record": "a manifest line is not a valid record",
    "bad_id": "the id is not a valid shard key (letters, digits, '_' and '-' only)",
}

# SampleMeta (the sample's JSON member):
# {
#   "id": "000123_1",            # the sample key (== __key__), no dots
#   "parent_id": "000123",       # the source motion id (== id for whole clips)
#   "split": "train",
#   "fps": 20.0,
#   "frames": 118,               # T of motion.npy
#   "captions": [{"caption_id": "000123_1:0", "text": "a person ...",
#                 "start": 0.0, "end": 0.0}, ...],   # start/end in seconds of the parent
#   "source": {"corpus": "humanml3d", "file": "new_joint_vecs/000123.npy",
#              "crop": [first_frame, last_frame_exclusive] of the parent}
# }


def caption_id(sample_id: str, index: int) -> str:
    return f"{sample_id}:{index}"


def load_manifest(shard_dir: str | Path) -> dict[str, Any]:
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in {shard_dir}: build shards first, e.g. "
            f"`python shards/make_shards.py demo --motions 2000 --out {shard_dir}`"
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r}, this rehamot reads {FORMAT_VERSION}")
    return manifest


def mean_std(manifest: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    mean = np.asarray(manifest["mean"], dtype=np.float32)
    std = np.maximum(np.asarray(manifest["std"], dtype=np.float32), STD_FLOOR)
    return mean, std


def encode_motion(motion: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, motion, allow_pickle=False)
    return buf.getvalue()


def decode_motion(data: bytes) -> np.ndarray:
    """Decode a motion member; never unpickles (raises ValueError on object arrays)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_meta(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")


def decode_meta(data: bytes) -> dict[str, Any]:
    return json.loads(data.decode("utf-8"))
