"""Joint arrays from other skeletons, rates, axes and units onto HumanML3D's joints.

`to_humanml3d_joints(joints, skeleton, fps, up="y", unit="m")` returns (T', 22, 3) float64:
SMPL's first 22 joints in HumanML3D's order (`SMPL22_JOINTS`), Y up, metres, 20 fps: what
`features.joints_to_features` takes. Bad input raises `BadMotion` (a ValueError) whose
`reason` is a short code from `REASONS`, so a data tool can skip the motion and say why.
Numpy only; imports nothing else of rehamot's.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Real

import numpy as np

# Stable codes for BadMotion.reason (the sharding script records them for skipped motions).
REASONS = {
    "bad_shape": "the joints are not a real (frames, joints, 3) array",
    "bad_joint_count": "the joint count differs from the named skeleton's",
    "unknown_skeleton": "the skeleton name is not one of SKELETONS",
    "not_finite": "the joints contain NaN or inf",
    "bad_fps": "the frame rate is not a finite number in [1, 1000]",
    "bad_unit": "the unit is not m, cm or mm",
    "bad_up_axis": "the up axis is not y or z",
    "too_short": "fewer than 2 frames at 20 fps",
    "degenerate_pose": "two joints joined by a bone coincide, so the bone has no direction",
}


class BadMotion(ValueError):
    """A joint array that cannot become HumanML3D joints or features.

    `reason` is a REASONS code and `detail` the one-line explanation; str() is "reason: detail".
    """

    def __init__(self, detail: str, reason: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown motion reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


SMPL22_JOINTS = (
    "pelvis", "L_hip", "R_hip", "spine1", "L_knee", "R_knee", "spine2", "L_ankle", "R_ankle",
    "spine3", "L_foot", "R_foot", "neck", "L_collar", "R_collar", "head", "L_shoulder",
    "R_shoulder", "L_elbow", "R_elbow", "L_wrist", "R_wrist",
)

HUMANML3D_FPS = 20.0
MIN_FPS, MAX_FPS = 1.0, 1000.0
UNITS = {"m": 1.0, "cm": 0.01, "mm": 0.001}
# A z-up point (x, y, z) as HumanML3D turns AMASS: swap y and z, then negate x; a rotation.
UP_AXES = {"y": (np.array([0, 1, 2]), np.array([1.0, 1.0, 1.0])),
           "z": (np.array([0, 2, 1]), np.array([-1.0, 1.0, 1.0]))}


@dataclass(frozen=True)
class Skeleton:
    """An input skeleton: its joint count and, for each of SMPL22_JOINTS, the input joints
    whose mean stands for it."""

    name: str
    joints: int
    sources: tuple[tuple[int, ...], ...]

    def weights(self) -> np.ndarray:
        """(22, joints) matrix taking this skeleton's joints to SMPL's first 22."""
        matrix = np.zeros((len(SMPL22_JOINTS), self.joints))
        for target, source in enumerate(self.sources):
            matrix[target, list(source)] = 1.0 / len(source)
        return matrix


def _first_22(name: str, joints: int) -> Skeleton:
    """An SMPL-family skeleton whose first 22 joints are SMPL's body joints."""
    return Skeleton(name, joints, tuple((j,) for j in range(len(SMPL22_JOINTS))))


# KIT-ML's 21 MMM joints (order of its new_joints; x+ is the body's left): 0 root, 1..4 spine
# to head, 5..7 left arm, 8..10 right arm, 11..15 left leg, 16..20 right leg (14 and 19 are
# mid-foot and unused). Spine2 and the collars have no MMM joint: midpoints stand for them.
KIT21 = Skeleton("kit21", 21, (
    (0,), (11,), (16,), (1,), (12,), (17,), (1, 2), (13,), (18,), (2,), (15,), (20,),
    (3,), (3, 5), (3, 8), (4,), (5,), (8,), (6,), (9,), (7,), (10,),
))

SKELETONS: dict[str, Skeleton] = {
    "smpl22": _first_22("smpl22", 22),
    "smpl24": _first_22("smpl24", 24),   # SMPL's body model joints (22 + two hands)
    "smplh": _first_22("smplh", 52),     # SMPL+H: 22 body + 30 finger joints (AMASS)
    "smplx": _first_22("smplx", 55),     # SMPL-X: 22 body + jaw, eyes + 30 finger joints
    "kit21": KIT21,
}


def checked_joints(joints: object, count: int | None = None) -> np.ndarray:
    """joints as a float64 (T, J, 3) array of finite values, or BadMotion saying what is wrong."""
    try:
        array = np.asarray(joints)
        if np.iscomplexobj(array) or array.dtype == bool:
            raise TypeError
        array = array.astype(np.float64)
    except (TypeError, ValueError):
        raise BadMotion("joints must be a real numeric array", "bad_shape") from None
    if array.ndim != 3 or array.shape[2] != 3:
        raise BadMotion(f"joints must have shape (frames, joints, 3), got {array.shape}", "bad_shape")
    if count is not None and array.shape[1] != count:
        raise BadMotion(f"expected {count} joints, got {array.shape[1]}", "bad_joint_count")
    if not np.isfinite(array).all():
        raise BadMotion("joints contain NaN or infinite values", "not_finite")
    return array


def _checked_fps(fps: object) -> float:
    try:
        rate = float(fps) if isinstance(fps, Real) and not isinstance(fps, bool) else np.nan
    except OverflowError:  # an int too large for a float
        rate = np.inf
    if not MIN_FPS <= rate <= MAX_FPS:
        raise BadMotion(f"fps must be a number in [{MIN_FPS:g}, {MAX_FPS:g}], got {fps!r}", "bad_fps")
    return rate


def _lookup(table: dict, key: object, what: str, reason: str):
    if not isinstance(key, str) or key not in table:
        raise BadMotion(f"unknown {what} {key!r} (known: {', '.join(table)})", reason)
    return table[key]


def resample_to_20fps(joints: np.ndarray, fps: float) -> np.ndarray:
    """Frames at 20 fps over the same span: every n-th frame when fps is exactly n * 20,
    else linear interpolation between the two nearest frames."""
    step = fps / HUMANML3D_FPS
    if step.is_integer():
        return joints[::int(step)]
    return resample(joints, fps, HUMANML3D_FPS)


def resample(joints: np.ndarray, fps_in: float, fps_out: float) -> np.ndarray:
    """Frames at `fps_out` over the same span (frame 0 kept), linearly interpolated between the
    two nearest frames."""
    if fps_in == fps_out:
        return joints
    step = fps_in / fps_out
    count = int(np.floor((len(joints) - 1) / step + 1e-9)) + 1
    position = np.minimum(np.arange(count) * step, len(joints) - 1)
    before = np.floor(position).astype(int)
    after = np.minimum(before + 1, len(joints) - 1)
    weight = (position - before)[:, None, None]
    return joints[before] * (1.0 - weight) + joints[after] * weight


def to_humanml3d_joints(joints: object, skeleton: str, fps: float, up: str = "y",
                        unit: str = "m") -> np.ndarray:
    """(T', 22, 3) float64 joints as HumanML3D's pipeline wants them: SMPL's first 22 joints
    (SMPL22_JOINTS), Y up, metres, 20 fps.

    joints: (T, J, 3) positions of the named skeleton (SKELETONS: smpl22, smpl24, smplh, smplx
    keep their first 22 joints; kit21 maps KIT-ML's MMM joints, see KIT21). up: "y", or "z"
    for AMASS's convention, turned as HumanML3D turns AMASS ((x, y, z) -> (-x, z, y)).
    unit: "m", "cm" or "mm". fps in [1, 1000]: an exact multiple of 20 keeps every n-th frame
    as HumanML3D does; any other rate is interpolated linearly to 20 fps. (HumanML3D keeps
    every int(fps / 20)-th frame whatever the rate, so there 30 fps stays 30 and 50 becomes
    25.) Raises BadMotion (a ValueError with a `reason`) on bad input or fewer than 2 frames
    at 20 fps.
    """
    spec = _lookup(SKELETONS, skeleton, "skeleton", "unknown_skeleton")
    scale = _lookup(UNITS, unit, "unit", "bad_unit")
    order, signs = _lookup(UP_AXES, up, "up axis", "bad_up_axis")
    rate = _checked_fps(fps)
    array = checked_joints(joints, spec.joints)
    mapped = np.einsum("sj,tjc->tsc", spec.weights(), array)
    turned = mapped[..., order] * signs * scale
    out = resample_to_20fps(turned, rate)
    if len(out) < 2:
        raise BadMotion(f"{len(array)} frames at {rate:g} fps make {len(out)} at 20 fps; "
                        "at least 2 are needed", "too_short")
    return out
