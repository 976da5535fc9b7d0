"""Tiny corpora on disk, in the layouts `shards/make_shards.py` reads, plus shard read-back."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from rehamot.data import schema

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "shards" / "make_shards.py"
# shared/ lies beside the checkout (CI clones elsewhere and copies shared/ next to the clone)
REAL_SAMPLE = REPO_ROOT.parent / "shared" / "fixtures" / "humanml3d-sample"


def random_motion(rng: np.random.Generator, frames: int, dim: int = 263) -> np.ndarray:
    return rng.normal(size=(frames, dim)).astype(np.float32)


def caption_line(text: str, start: float = 0.0, end: float = 0.0) -> str:
    tokens = " ".join(f"{w}/X" for w in text.split())
    return f"{text}#{tokens}#{start}#{end}"


def write_layout(root: Path, motions: dict[str, np.ndarray | bytes],
                 captions: dict[str, str | bytes], splits: dict[str, list[str]],
                 mean_std: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
    """A HumanML3D-layout folder; bytes values are written verbatim (for broken files)."""
    (root / "new_joint_vecs").mkdir(parents=True, exist_ok=True)
    (root / "texts").mkdir(exist_ok=True)
    for motion_id, motion in motions.items():
        path = root / "new_joint_vecs" / f"{motion_id}.npy"
        if isinstance(motion, bytes):
            path.write_bytes(motion)
        else:
            np.save(path, motion, allow_pickle=True)  # object arrays are a test case
    for motion_id, text in captions.items():
        path = root / "texts" / f"{motion_id}.txt"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    for split, ids in splits.items():
        (root / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    if mean_std is not None:
        np.save(root / "Mean.npy", mean_std[0])
        np.save(root / "Std.npy", mean_std[1])
    return root


def clean_corpus(root: Path, n: int = 12, dim: int = 263, seed: int = 0,
                 frames: tuple[int, int] = (40, 80)) -> dict[str, Any]:
    """n motions of 40-80 frames, three distinct captions each, 8/2/2-ish split."""
    rng = np.random.default_rng(seed)
    ids = [f"{i:06d}" for i in range(n)]
    motions = {i: random_motion(rng, int(rng.integers(frames[0], frames[1] + 1)), dim)
               for i in ids}
    captions = {i: "\n".join(caption_line(f"person {i} does move {k}") for k in range(3)) + "\n"
                for i in ids}
    n_val = max(1, n // 6)
    splits = {"train": ids[: n - 2 * n_val], "val": ids[n - 2 * n_val: n - n_val],
              "test": ids[n - n_val:]}
    write_layout(root, motions, captions, splits)
    return {"ids": ids, "motions": motions, "splits": splits}


def read_split(out: Path, split: str) -> list[dict[str, Any]]:
    """Every sample of a split, read back with WebDataset in shard order."""
    manifest = json.loads((out / schema.MANIFEST_NAME).read_text())
    urls = [str(out / s["path"]) for s in manifest["splits"][split]["shards"]]
    if not urls:
        return []
    samples = []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        samples.append({"key": sample["__key__"],
                        "motion": schema.decode_motion(sample[schema.MOTION_MEMBER]),
                        "motion_bytes": bytes(sample[schema.MOTION_MEMBER]),
                        "meta": schema.decode_meta(sample[schema.META_MEMBER])})
    return samples


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def skips(manifest: dict[str, Any]) -> dict[tuple[str, str], str]:
    """(id, level) -> reason."""
    return {(s["id"], s["level"]): s["reason"] for s in manifest["skipped"]}
