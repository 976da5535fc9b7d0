"""The coarse keys of a shard set, computed as its samples are written (rehamot.data.leaks).

Per sample: the joints rehamot.motion.kinematics recovers from its features (HumanML3D's 263 or
KIT-ML's 251; KIT-ML's millimetres turned into metres), reduced to KEY_JOINTS at KEY_FPS. A
layout without joints (a JSONL corpus of another feature size) gets ids, splits and parents
only: its check is by provenance and ids. Stored in one .npz beside the manifest, which lists
it with its sha256.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rehamot.data import leaks, schema
from rehamot.motion.kinematics import LAYOUTS, features_to_joints
from shards.files import file_sha256

# KEY_JOINTS' indices in each layout's joints, and the layout's unit in metres
KEY_JOINT_INDICES = {
    "humanml3d": ((0, 15, 20, 21, 7, 8), 1.0),  # SMPL: pelvis, head, wrists, ankles
    "kitml": ((0, 4, 7, 10, 13, 18), 0.001),  # MMM (millimetres)
}


def layout_of(feature_dim: int) -> str | None:
    """The layout whose features give joints, by feature size; None if none does."""
    return next((name for name, layout in LAYOUTS.items()
                 if layout.feature_dim == feature_dim and name in KEY_JOINT_INDICES), None)


def features_key(features: np.ndarray, layout: str, fps: float):
    """The key of one sample's features, or None if they give no joints (not finite)."""
    try:
        joints = features_to_joints(features, layout)
    except ValueError:
        return None
    feats = np.asarray(features, np.float64)
    heading = np.zeros(len(feats))
    heading[1:] = -2.0 * np.cumsum(feats[:-1, 0])  # as features_to_joints turns the root
    indices, unit = KEY_JOINT_INDICES[layout]
    return leaks.motion_key(joints[:, list(indices)] * unit, heading, fps)


class KeyCollector:
    """Collects the keys of the samples written, in writing order, and writes the keys file."""

    def __init__(self, feature_dim: int, fps: float) -> None:
        self.layout, self.fps = layout_of(feature_dim), float(fps)
        self.ids: list[str] = []
        self.splits: list[str] = []
        self.parents: list[str] = []
        self.keys: list[Any] = []

    def add(self, split: str, sample: Any, parent: str | None) -> None:
        key = None
        if self.layout is not None and sample.motion is not None:
            key = features_key(schema.decode_motion(sample.motion), self.layout, self.fps)
        self.ids.append(sample.id)
        self.splits.append(split)
        self.parents.append(parent or sample.id)
        self.keys.append(key)

    def write(self, out: Path) -> dict[str, Any]:
        """Write the keys file into `out`; its manifest entry."""
        path = Path(out) / leaks.KEYS_NAME
        path.write_bytes(leaks.encode_keys(self.ids, self.splits, self.parents, self.keys))
        return {"path": path.name, "sha256": file_sha256(path), "version": leaks.KEYS_VERSION,
                "fps": leaks.KEY_FPS, "joints": list(leaks.KEY_JOINTS),
                "content": self.layout is not None, "layout": self.layout}
