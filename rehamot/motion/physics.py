"""What a viewer sees in a motion and an embedding misses: jitter, foot skating, penetration, floating.

Every measure is taken on joint positions in metres, y up, floor at y = 0 (HumanML3D puts
the floor at the lowest joint of the whole motion; KIT-ML's millimetres are converted).

    jitter        mean over joints and frames of the jerk magnitude |d³p/dt³| in m/s³: the
                  third finite difference of positions times fps³, as DNO's `compute_jitter`
                  (Karunratanakul et al., CVPR 2024, "Optimizing Diffusion Noise Can Serve As
                  Universal Motion Priors").
    foot_skating  GMD's skating ratio (Karunratanakul et al., ICCV 2023, "Guided Motion
                  Diffusion", `calculate_skating_ratio`): the share of frame steps t -> t+1
                  in which some foot joint is in contact (below 5 cm in both frames) and
                  slides, its horizontal speed above 0.5 m/s (2.5 cm per frame at 20 fps)
                  both in that step and as the mean over a 0.25 s window (5 steps at 20 fps,
                  zero-padded at the ends, as GMD's uniform filter). GMD watches the two toe
                  joints (HumanML3D 10, 11); here the ankles count too (7/10 left, 8/11 right;
                  KIT-ML 13/15 and 18/20), so a planted heel that slides is caught as well.
    penetration   PhysDiff's "Penetrate": mean over frames of the depth below the floor of
                  the lowest joint (0 in a frame where it is above).
    floating      PhysDiff's "Float": mean over frames of the height above the floor of the
                  lowest joint (0 in a frame where it is below).
                  PhysDiff's code (as ported in CLoSD, Tevet et al., ICLR 2025) allows 5 mm
                  either way before counting either; none is allowed here.

Joints, not a mesh: PhysDiff measures the lowest SMPL mesh vertex. A joint centre sits inside
the body, above the sole (in the real HumanML3D sample the ankle joints never come within
4.7 cm of the floor), so on joints a standing motion floats by that offset (the sample: 1.6 cm,
by its toe joints) and penetration only counts once a joint centre, not the skin, is below
the floor: compare these numbers between motion sets on the same skeleton, not with the
mesh-based ones published.

Numpy only; imports nothing of rehamot's outside motion/.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from rehamot.motion.kinematics import LAYOUTS, features_to_joints, get_layout

MEASURES = ("jitter", "foot_skating", "penetration", "floating")
UNITS = {"jitter": "m/s³", "foot_skating": "share of frame steps", "penetration": "m", "floating": "m"}
CONTACT_HEIGHT = 0.05     # m: a foot joint lower than this is on the ground (GMD)
SKATE_SPEED = 0.5         # m/s: 2.5 cm per frame at GMD's 20 fps
SKATE_WINDOW_S = 0.25     # s: GMD's 5-frame moving average at 20 fps


@dataclass(frozen=True)
class Ground:
    """How a layout stands on the floor: its length unit in metres and its foot joints."""

    metres_per_unit: float
    feet: tuple[int, ...]


GROUNDS = {
    # SMPL: 7/10 left ankle/foot, 8/11 right (HumanML3D's foot-contact joints)
    "humanml3d": Ground(1.0, (7, 10, 8, 11)),
    # MMM, in millimetres: 13 ankle, 15 toe of the left leg (11..15), 18/20 of the right
    "kitml": Ground(0.001, (13, 15, 18, 20)),
}


def layout_for_width(feature_dim: int) -> str | None:
    """The layout whose features are `feature_dim` wide (263: humanml3d, 251: kitml), or None."""
    return next((name for name, spec in LAYOUTS.items() if spec.feature_dim == int(feature_dim)), None)


# --------------------------------------------------------------------------- the measures


def jitter(joints: np.ndarray, fps: float) -> float:
    """Mean jerk magnitude (m/s³) of joints (T, J, 3) in metres; NaN under 4 frames."""
    if len(joints) < 4:
        return math.nan
    jerk = np.diff(joints, n=3, axis=0) * fps ** 3
    return float(np.linalg.norm(jerk, axis=-1).mean())


def _window_mean(values: np.ndarray, size: int) -> np.ndarray:
    """Centred moving mean over the last axis, zeros beyond the ends (an odd `size`)."""
    half = size // 2
    padded = np.pad(values, [(0, 0)] * (values.ndim - 1) + [(half + 1, half)])
    sums = np.cumsum(padded, axis=-1)
    return (sums[..., size:] - sums[..., :-size]) / size


def foot_skating(joints: np.ndarray, fps: float, feet: Sequence[int]) -> float:
    """GMD's skating ratio of joints (T, J, 3) in metres: the share of the T-1 frame steps in
    which any of the `feet` joints skates; NaN for a single frame."""
    if len(joints) < 2:
        return math.nan
    foot = joints[:, list(feet)].transpose(1, 0, 2)  # (feet, T, 3)
    speed = np.linalg.norm(np.diff(foot[..., [0, 2]], axis=1), axis=-1) * fps  # (feet, T-1) m/s
    window = 2 * round((SKATE_WINDOW_S * fps - 1) / 2) + 1  # the nearest odd: 5 at 20 fps, 3 at 12.5
    low = foot[..., 1] < CONTACT_HEIGHT
    contact = low[:, :-1] & low[:, 1:]  # on the ground in both frames of the step
    skating = contact & (speed > SKATE_SPEED) & (_window_mean(speed, window) > SKATE_SPEED)
    return float(skating.any(axis=0).mean())


def _lowest(joints: np.ndarray) -> np.ndarray:
    return joints[..., 1].min(axis=-1)


def penetration(joints: np.ndarray) -> float:
    """Mean over frames of the depth (m) of the lowest joint below y = 0."""
    return float(np.maximum(-_lowest(joints), 0.0).mean())


def floating(joints: np.ndarray) -> float:
    """Mean over frames of the height (m) of the lowest joint above y = 0."""
    return float(np.maximum(_lowest(joints), 0.0).mean())


# --------------------------------------------------------------------------- motions and sets


def joint_measures(joints: np.ndarray, layout: str = "humanml3d", fps: float | None = None) -> dict[str, float]:
    """The four measures of joints (T, J, 3) in the layout's units, at `fps` (default: the layout's)."""
    spec = get_layout(layout)
    ground = GROUNDS[spec.name]
    metres = np.asarray(joints, dtype=np.float64) * ground.metres_per_unit
    if metres.ndim != 3 or metres.shape[1:] != (spec.joints, 3) or len(metres) == 0:
        raise ValueError(f"{layout} joints must have shape (frames >= 1, {spec.joints}, 3), got {metres.shape}")
    rate = spec.fps if fps is None else float(fps)
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    return {"jitter": jitter(metres, rate), "foot_skating": foot_skating(metres, rate, ground.feet),
            "penetration": penetration(metres), "floating": floating(metres)}


def motion_measures(features: np.ndarray, layout: str = "humanml3d", fps: float | None = None) -> dict[str, float]:
    """The four measures of one motion's raw (un-normalised) features (T, D)."""
    return joint_measures(features_to_joints(features, layout), layout, fps)


def set_means(per_motion: Mapping[str, Mapping[str, float]]) -> dict[str, float | None]:
    """Each measure's mean over the motions that have it (a motion too short for jitter or
    skating has NaN there), None when none has it."""
    means: dict[str, float | None] = {}
    for name in MEASURES:
        values = np.array([m[name] for m in per_motion.values()], dtype=np.float64)
        values = values[np.isfinite(values)]
        means[name] = float(values.mean()) if values.size else None
    return means


def measure_motions(motions: Mapping[str, np.ndarray] | Sequence[np.ndarray], layout: str = "humanml3d",
                    fps: float | None = None) -> dict:
    """{measure: mean over the set, ..., "per_motion": {id: {measure: value}}} of raw feature
    arrays, a dict id -> (T, D) or a list (ids "0", "1", ...); NaN per motion shows as None."""
    items = motions.items() if isinstance(motions, Mapping) else ((str(i), m) for i, m in enumerate(motions))
    per_motion = {str(key): motion_measures(m, layout, fps) for key, m in items}
    means = set_means(per_motion)
    clean = {key: {k: (v if math.isfinite(v) else None) for k, v in values.items()} for key, values in per_motion.items()}
    return {**means, "per_motion": clean}
