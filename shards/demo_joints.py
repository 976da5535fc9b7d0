"""Demo motions written as another corpus would hold them: joint positions in a named
skeleton, frame rate, up axis and unit, for the joints source (`make_shards.py joints`).

The demo skeleton is SMPL's first 22 joints, Y up, metres, 20 fps. `export_joints` turns such
a motion into one of `SKELETON_CHOICES` at any rate, up axis and unit: each step is the inverse
of what `rehamot.motion.skeletons.to_humanml3d_joints` does on the way in, so sharding the
result recovers the motion (exactly for smpl22 at 20 fps; for kit21 up to the midpoints that
stand for spine2 and the collars, and the resampling).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rehamot.motion.skeletons import HUMANML3D_FPS, MAX_FPS, MIN_FPS, UNITS, UP_AXES, resample

# KIT-ML's 21 MMM joints from SMPL's 22 (HumanML3D order), the inverse of skeletons.KIT21:
# each KIT joint is the mean of these SMPL joints. KIT's mid-foot joints (14, 19), which the
# way in leaves unused, lie halfway between ankle and foot.
KIT21_FROM_SMPL22 = (
    (0,), (3,), (9,), (12,), (15,),          # root, spine1, spine3, neck, head
    (16,), (18,), (20,),                     # left shoulder, elbow, wrist
    (17,), (19,), (21,),                     # right shoulder, elbow, wrist
    (1,), (4,), (7,), (7, 10), (10,),        # left hip, knee, ankle, mid-foot, foot
    (2,), (5,), (8,), (8, 11), (11,),        # right hip, knee, ankle, mid-foot, foot
)
SKELETON_CHOICES = ("smpl22", "kit21")


@dataclass(frozen=True)
class JointsFormat:
    """How the demo corpus writes its joints (the JSONL record's skeleton, fps, up, unit)."""

    skeleton: str = "smpl22"
    fps: float = HUMANML3D_FPS
    up: str = "y"
    unit: str = "m"

    def __post_init__(self) -> None:
        if self.skeleton not in SKELETON_CHOICES:
            raise ValueError(f"skeleton {self.skeleton!r}: expected one of {', '.join(SKELETON_CHOICES)}")
        if not MIN_FPS <= self.fps <= MAX_FPS:
            raise ValueError(f"fps {self.fps}: expected a number in [{MIN_FPS:g}, {MAX_FPS:g}]")
        if self.up not in UP_AXES:
            raise ValueError(f"up {self.up!r}: expected one of {', '.join(UP_AXES)}")
        if self.unit not in UNITS:
            raise ValueError(f"unit {self.unit!r}: expected one of {', '.join(UNITS)}")

    def record(self) -> dict[str, object]:
        """The JSONL keys that say how to read the joints."""
        fps = int(self.fps) if float(self.fps).is_integer() else self.fps
        return {"skeleton": self.skeleton, "fps": fps, "up": self.up, "unit": self.unit}


def smpl22_to_kit21(joints: np.ndarray) -> np.ndarray:
    """(..., 21, 3) KIT-ML MMM joints from (..., 22, 3) SMPL joints (KIT21_FROM_SMPL22)."""
    matrix = np.zeros((len(KIT21_FROM_SMPL22), 22))
    for target, sources in enumerate(KIT21_FROM_SMPL22):
        matrix[target, list(sources)] = 1.0 / len(sources)
    return np.einsum("kj,...jc->...kc", matrix, joints)


def from_y_up(joints: np.ndarray, up: str) -> np.ndarray:
    """Y-up points in the `up` convention: the inverse of the turn `to_humanml3d_joints` applies."""
    order, signs = UP_AXES[up]
    out = np.empty_like(joints)
    out[..., order] = joints / signs
    return out


def export_joints(joints: np.ndarray, fmt: JointsFormat) -> np.ndarray:
    """(T', J, 3) float32 in `fmt` from (T, 22, 3) SMPL joints, Y up, metres, 20 fps."""
    positions = np.asarray(joints, dtype=np.float64)
    if fmt.skeleton == "kit21":
        positions = smpl22_to_kit21(positions)
    positions = resample(positions, HUMANML3D_FPS, float(fmt.fps))
    positions = from_y_up(positions, fmt.up) / UNITS[fmt.unit]
    return positions.astype(np.float32)
