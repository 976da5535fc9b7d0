"""Joint positions from HumanML3D-style motion features, and the skeleton facts to draw them.

HumanML3D (263-d, 22 SMPL joints, 20 fps) and KIT-ML (251-d, 21 MMM joints, 12.5 fps)
store a motion as per-frame features whose first 4 + (J-1)*3 channels are enough to
recover every joint position (HumanML3D's `recover_from_ric`):

    [0]                    root angular velocity about +y: *half* the per-frame heading
                           change (HumanML3D builds its yaw quaternion from this angle
                           directly, and a unit quaternion of angle a turns by 2a)
    [1:3]                  root linear velocity (x, z) per frame, in the root's facing frame
    [3]                    root height (y, floor at 0)
    [4 : 4 + (J-1)*3]      joints 1..J-1 in the facing frame ("ric"): x, z relative to the
                           root, y absolute

The remaining channels (6D rotations, joint velocities, foot contacts) are redundant for
positions and ignored here. Coordinates are y-up; at frame 0 the root is at the xz origin
facing +z, and the subject's left is +x. Numpy only, so data tools and renderers can use it
without torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Chain = tuple[int, ...]


@dataclass(frozen=True)
class Layout:
    """One skeleton/feature layout: joint count, frame rate and the chains to draw."""

    name: str
    joints: int
    fps: float
    kinematic_chain: tuple[Chain, ...]
    left_chains: tuple[int, ...]   # indices into kinematic_chain (the subject's left limbs)
    right_chains: tuple[int, ...]

    @property
    def feature_dim(self) -> int:
        """root (4) + ric (J-1)*3 + 6D rotations (J-1)*6 + joint velocities J*3 + contacts (4)."""
        return 4 + (self.joints - 1) * 9 + self.joints * 3 + 4

    @property
    def ric_slice(self) -> slice:
        return slice(4, 4 + (self.joints - 1) * 3)

    @property
    def centre_chains(self) -> tuple[int, ...]:
        """Chains that are neither left nor right (the spine and head)."""
        sided = set(self.left_chains) | set(self.right_chains)
        return tuple(i for i in range(len(self.kinematic_chain)) if i not in sided)


LAYOUTS: dict[str, Layout] = {
    # SMPL joints: 1 = left hip, 2 = right hip, 13 = left collar, 14 = right collar
    "humanml3d": Layout(
        name="humanml3d",
        joints=22,
        fps=20.0,
        kinematic_chain=((0, 2, 5, 8, 11), (0, 1, 4, 7, 10), (0, 3, 6, 9, 12, 15),
                         (9, 14, 17, 19, 21), (9, 13, 16, 18, 20)),
        left_chains=(1, 4),
        right_chains=(0, 3),
    ),
    # MMM joints: 5..7 = left shoulder/elbow/wrist, 8..10 right; 11..15 left leg, 16..20 right
    "kitml": Layout(
        name="kitml",
        joints=21,
        fps=12.5,
        kinematic_chain=((0, 11, 12, 13, 14, 15), (0, 16, 17, 18, 19, 20), (0, 1, 2, 3, 4),
                         (3, 5, 6, 7), (3, 8, 9, 10)),
        left_chains=(0, 3),
        right_chains=(1, 4),
    ),
}


def get_layout(name: str) -> Layout:
    """The layout called `name`, or a ValueError listing the known ones."""
    try:
        return LAYOUTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown layout {name!r} (known: {', '.join(LAYOUTS)})") from None


def yaw_rotate(points: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Rotate points (..., T, [J,] 3) about +y by angle (..., T) radians (+z turns towards +x)."""
    shape = angle.shape + (1,) * (points.ndim - angle.ndim - 1)
    cos, sin = np.cos(angle).reshape(shape), np.sin(angle).reshape(shape)
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    return np.stack([cos * x + sin * z, y, cos * z - sin * x], axis=-1)


def features_to_joints(features: np.ndarray, layout: str = "humanml3d") -> np.ndarray:
    """Joint positions (T, J, 3) float64 from features (T, D), as HumanML3D's `recover_from_ric`.

    Frame t's root step and heading change (features[t, 0:3]) take it to frame t+1, so the
    last frame's velocities are unused and frame 0 sits at the origin facing +z.
    """
    spec = get_layout(layout)
    try:
        feats = np.asarray(features)
        if np.iscomplexobj(feats):
            raise TypeError
        feats = feats.astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError("features must be a real numeric array") from None
    if feats.ndim != 2 or feats.shape[1] != spec.feature_dim:
        raise ValueError(
            f"{layout} features must have shape (frames, {spec.feature_dim}), got {feats.shape}"
        )
    if len(feats) == 0:
        raise ValueError("features have zero frames")
    if not np.isfinite(feats).all():
        raise ValueError("features contain NaN or infinite values")

    frames = len(feats)
    # heading[t] rotates the facing frame back to the world; twice the summed half-angles
    heading = np.zeros(frames)
    heading[1:] = -2.0 * np.cumsum(feats[:-1, 0])
    step = np.zeros((frames, 3))
    step[1:, [0, 2]] = feats[:-1, 1:3]
    root = np.cumsum(yaw_rotate(step, heading), axis=0)
    root[:, 1] = feats[:, 3]
    ric = feats[:, spec.ric_slice].reshape(frames, spec.joints - 1, 3)
    others = yaw_rotate(ric, heading)
    others[..., [0, 2]] += root[:, None, [0, 2]]
    return np.concatenate([root[:, None], others], axis=1)
