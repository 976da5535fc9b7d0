"""HumanML3D's 22-joint skeleton (SMPL joint order, y up, facing +z, left = +x) and its
forward kinematics, for the procedural demo corpus.

Bone lengths follow the real HumanML3D sample (`new_joints/012314.npy`: thigh 0.39 m,
shin 0.43 m, upper arm 0.26 m ...); the rest pose stands upright with the arms hanging,
which is also the rest pose HumanML3D's rotation features are measured against.

Pose parameters (the `POSE_*` channels) are joint angles in radians; `forward_kinematics`
turns a (T, NUM_CHANNELS) track into joint positions with the root on the floor.
"""
from __future__ import annotations

import numpy as np

FPS = 20.0
NUM_JOINTS = 22
JOINT_NAMES = (
    "pelvis", "l_hip", "r_hip", "spine1", "l_knee", "r_knee", "spine2", "l_ankle",
    "r_ankle", "spine3", "l_foot", "r_foot", "neck", "l_collar", "r_collar", "head",
    "l_shoulder", "r_shoulder", "l_elbow", "r_elbow", "l_wrist", "r_wrist",
)
PARENTS = (-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19)
# Left/right joint pairs; HumanML3D mirrors a motion by swapping these and negating x.
MIRROR_PERMUTATION = (0, 2, 1, 3, 5, 4, 6, 8, 7, 9, 11, 10, 12, 14, 13, 15, 17, 16, 19, 18, 21, 20)
FOOT_JOINTS = (7, 8, 10, 11)  # l_ankle, r_ankle, l_foot, r_foot

# Rest offsets of each joint from its parent, metres (left side; right side mirrored).
_LEFT_OFFSETS = {
    1: (0.060, -0.085, 0.000),   # pelvis -> l_hip
    3: (0.000, 0.130, -0.020),   # pelvis -> spine1
    4: (0.045, -0.388, 0.005),   # l_hip -> l_knee (legs splay a little, as in SMPL)
    6: (0.000, 0.140, 0.020),    # spine1 -> spine2
    7: (-0.010, -0.430, -0.030), # l_knee -> l_ankle
    9: (0.000, 0.055, 0.010),    # spine2 -> spine3
    10: (0.030, -0.060, 0.125),  # l_ankle -> l_foot (ball of the foot)
    12: (0.000, 0.215, -0.030),  # spine3 -> neck
    13: (0.075, 0.115, -0.010),  # spine3 -> l_collar
    15: (0.000, 0.090, 0.050),   # neck -> head
    16: (0.125, -0.030, -0.010), # l_collar -> l_shoulder
    18: (0.020, -0.260, -0.020), # l_shoulder -> l_elbow
    20: (0.000, -0.265, 0.010),  # l_elbow -> l_wrist
}


def _rest_offsets() -> np.ndarray:
    offsets = np.zeros((NUM_JOINTS, 3))
    for joint, offset in _LEFT_OFFSETS.items():
        offsets[joint] = offset
        twin = MIRROR_PERMUTATION[joint]
        if twin != joint:
            offsets[twin] = (-offset[0], offset[1], offset[2])
    return offsets


REST_OFFSETS = _rest_offsets()

# Pose channels: torso first, then the same 8 channels per side (left block, right block).
TORSO_CHANNELS = ("lean", "side_bend", "twist", "neck_pitch", "head_yaw")
SIDE_CHANNELS = ("hip_flex", "hip_abd", "knee", "ankle", "sh_flex", "sh_abd", "elbow", "collar")
ROOT_CHANNELS = ("vel_fwd", "vel_side", "yaw_rate", "air")  # m/s, m/s (+left), rad/s (+left), m
CHANNELS = (
    TORSO_CHANNELS
    + tuple(f"l_{c}" for c in SIDE_CHANNELS)
    + tuple(f"r_{c}" for c in SIDE_CHANNELS)
    + ROOT_CHANNELS
)
NUM_CHANNELS = len(CHANNELS)
CH = {name: i for i, name in enumerate(CHANNELS)}
ARM_CHANNELS = ("sh_flex", "sh_abd", "elbow", "collar")  # what a gesture takes over


def side_channel(side: str, name: str) -> int:
    """Index of a per-side channel; side is "left" or "right"."""
    return CH[f"{side[0]}_{name}"]


def _rotation(first: str, a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """R_first(a) @ R_x(b) as (3, 3, ...): matrix axes first, so that every component is
    one contiguous array (numpy is slow on stacks of tiny matrices); first is "x", "y" or
    "z"; b = None means no x rotation."""
    ca, sa = np.cos(a), np.sin(a)
    cb, sb = (1.0, 0.0) if b is None else (np.cos(b), np.sin(b))
    r = np.zeros((3, 3) + a.shape)
    if first == "z":
        r[0, 0], r[0, 1], r[0, 2] = ca, -sa * cb, sa * sb
        r[1, 0], r[1, 1], r[1, 2] = sa, ca * cb, -ca * sb
        r[2, 1], r[2, 2] = sb, cb
    elif first == "y":
        r[0, 0], r[0, 1], r[0, 2] = ca, sa * sb, sa * cb
        r[1, 1], r[1, 2] = cb, -sb
        r[2, 0], r[2, 1], r[2, 2] = -sa, ca * sb, ca * cb
    else:  # x then x: one rotation by a + b
        angle = a if b is None else a + b
        c, s = np.cos(angle), np.sin(angle)
        r[0, 0], r[1, 1], r[1, 2], r[2, 1], r[2, 2] = 1.0, c, -s, s, c
    return r


def _compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Matrix product of (3, 3, ...) stacks."""
    return np.einsum("ik...,kj...->ij...", a, b)


def _local_rotations(track: np.ndarray, heading: np.ndarray) -> dict[int, np.ndarray]:
    """Per-joint local rotation matrices (3, 3, ..., T); joints not listed stay at rest.

    Sign conventions: positive flexion swings a hanging limb forward (+z), positive
    abduction swings it outwards, positive knee flexion bends the shin backwards.
    Mirroring a rotation across x keeps x-angles and negates y- and z-angles, so the right
    side uses negated abduction/collar angles.
    """
    ch = lambda name: track[..., CH[name]]  # noqa: E731 - local shorthand
    spine = _compose(_rotation("y", ch("twist") / 3, ch("lean") / 3), _rotation("z", ch("side_bend") / 3))
    rots = {
        0: _rotation("y", heading),
        3: spine, 6: spine, 9: spine,
        12: _rotation("y", ch("head_yaw"), ch("neck_pitch")),
    }
    for prefix, sign, hip, knee, ankle, collar, shoulder, elbow in (
        ("l_", 1.0, 1, 4, 7, 13, 16, 18),
        ("r_", -1.0, 2, 5, 8, 14, 17, 19),
    ):
        rots[hip] = _rotation("z", sign * ch(prefix + "hip_abd"), -ch(prefix + "hip_flex"))
        rots[knee] = _rotation("x", ch(prefix + "knee"))
        rots[ankle] = _rotation("x", -ch(prefix + "ankle"))  # positive = toes up
        rots[collar] = _rotation("z", sign * ch(prefix + "collar"))
        rots[shoulder] = _rotation("z", sign * ch(prefix + "sh_abd"), -ch(prefix + "sh_flex"))
        rots[elbow] = _rotation("x", -ch(prefix + "elbow"))
    return rots


def _integrate(rate: np.ndarray, dt: float) -> np.ndarray:
    """Value at frame t = sum of rate over frames < t (frame 0 at zero), along the last axis."""
    out = np.zeros_like(rate)
    np.cumsum(rate[..., :-1] * dt, axis=-1, out=out[..., 1:])
    return out


def forward_kinematics(track: np.ndarray, fps: float = FPS) -> np.ndarray:
    """Joint positions (..., T, 22, 3) for pose tracks (..., T, NUM_CHANNELS).

    The root's xz path integrates the body-frame velocities along the integrated heading;
    its height puts the lowest foot joint on the floor (y = 0) plus the `air` channel, so
    squats, sits and kicks keep a foot planted without solving IK. Leading axes batch
    motions of equal length.
    """
    dt = 1.0 / fps
    heading = _integrate(track[..., CH["yaw_rate"]], dt)
    fwd, side = track[..., CH["vel_fwd"]], track[..., CH["vel_side"]]
    root_x = _integrate(np.cos(heading) * side + np.sin(heading) * fwd, dt)
    root_z = _integrate(-np.sin(heading) * side + np.cos(heading) * fwd, dt)

    local = _local_rotations(track, heading)
    glob: list[np.ndarray] = [local[0]] * NUM_JOINTS
    pos = np.zeros((NUM_JOINTS, 3) + track.shape[:-1])  # joint and xyz axes first, as above
    for joint in range(1, NUM_JOINTS):  # parents precede children in SMPL order
        parent_rot = glob[PARENTS[joint]]
        pos[joint] = pos[PARENTS[joint]] + np.einsum("ik...,k->i...", parent_rot, REST_OFFSETS[joint])
        glob[joint] = _compose(parent_rot, local[joint]) if joint in local else parent_rot
    lowest = pos[list(FOOT_JOINTS), 1].min(axis=0)
    pos[:, 1] += track[..., CH["air"]] - lowest
    pos[:, 0] += root_x
    pos[:, 2] += root_z
    return np.ascontiguousarray(np.moveaxis(pos, (0, 1), (-2, -1)))


def mirror_joints(joints: np.ndarray) -> np.ndarray:
    """HumanML3D's left/right mirror: swap left and right joints, negate x."""
    mirrored = joints[..., MIRROR_PERMUTATION, :].copy()
    mirrored[..., 0] *= -1.0
    return mirrored
