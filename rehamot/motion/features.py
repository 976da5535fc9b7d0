"""HumanML3D's 263-d features from joint positions, computed as HumanML3D computes them.

`joints_to_features(joints)` takes (T, 22, 3) positions (SMPL's first 22 joints, Y up,
metres, 20 fps; `skeletons.to_humanml3d_joints` makes them from other skeletons) and returns
the (T-1, 263) features of HumanML3D's `motion_representation.ipynb` (`process_file(positions,
0.002)`); `kinematics.features_to_joints` is its inverse. The steps, in HumanML3D's order:

1. retarget to HumanML3D's skeleton (`uniform_skeleton`): every bone keeps its direction and
   takes the target length (TARGET_BONE_LENGTHS); the root path is scaled by the ratio of the
   target's right leg (thigh + shin) to the input's at frame 0;
2. put the lowest joint of the whole motion on the floor (y = 0), the frame-0 root at the xz
   origin, and turn the motion about y so that frame 0 faces +z (facing: up x across, across
   = (right hip - left hip) + (right shoulder - left shoulder));
3. foot contacts: a foot joint's squared displacement to the next frame below 0.002 m^2;
4. the root heading of `inverse_kinematics_np(..., smooth_forward=True)`: its across takes
   the hips the other way round, (left hip - right hip) + (right shoulder - left shoulder),
   the facing is smoothed over time (Gaussian, sigma 20 frames, edges repeated) and frame 0's
   heading is forced to none;
5. from that heading: root angular velocity, linear velocity and height, joint positions in
   the facing frame, local joint rotations as continuous 6D, joint velocities.

Each bone's global rotation is the shortest arc from its rest direction (T2M_RAW_OFFSETS) to
its direction; a bone's local rotation is relative to the previous bone of its kinematic
chain, or to the root heading for a chain's first bone. The output agrees with HumanML3D's own
code (with target offsets from these lengths) up to its float32 round-off; the README ("Your
own data") gives the measured agreement. One input differs by design: a motion of exactly 3
frames, where HumanML3D's `qbetween` calls `torch.cross` without a dim, which for (3, 3) inputs
crosses over the frames instead of x, y, z. Numpy and scipy only.
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter1d

from rehamot.motion.kinematics import get_layout, yaw_rotate
from rehamot.motion.skeletons import BadMotion, checked_joints

KINEMATIC_CHAIN = get_layout("humanml3d").kinematic_chain
JOINTS = 22


def _parents() -> tuple[int, ...]:
    parents = [-1] * JOINTS
    for chain in KINEMATIC_CHAIN:
        for parent, child in zip(chain, chain[1:]):
            parents[child] = parent
    return tuple(parents)


PARENTS = _parents()

# Rest direction of the bone into each joint (HumanML3D's t2m_raw_offsets): x left, y up, z forward.
T2M_RAW_OFFSETS = np.array([
    [0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, -1, 0], [0, 1, 0], [0, -1, 0],
    [0, -1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [0, 1, 0], [1, 0, 0], [-1, 0, 0], [0, 0, 1],
    [0, -1, 0], [0, -1, 0], [0, -1, 0], [0, -1, 0], [0, -1, 0], [0, -1, 0],
], dtype=np.float64)

# Length (m) of the bone into joints 1..21 of HumanML3D's target skeleton: those of every
# file of its new_joints (constant there to 2e-6 m). float32, as HumanML3D keeps its offsets.
TARGET_BONE_LENGTHS = np.array([
    0.10307397, 0.10988336, 0.13156823, 0.39362319, 0.39018822, 0.14319022, 0.43243300,
    0.42564340, 0.05736474, 0.14338179, 0.14941905, 0.21936005, 0.13748679, 0.14338281,
    0.10303921, 0.13161396, 0.12298439, 0.25683989, 0.26309186, 0.26601182, 0.26987629,
], dtype=np.float32)

LEG_JOINTS = (5, 8)                      # right knee and ankle: thigh + shin set the scale
RIGHT_HIP, LEFT_HIP, RIGHT_SHOULDER, LEFT_SHOULDER = 2, 1, 17, 16
LEFT_FOOT, RIGHT_FOOT = (7, 10), (8, 11)  # ankle and toe joints
CONTACT_THRESHOLD = 0.002                 # squared metres per frame
HEADING_SIGMA = 20.0                      # frames


def _unit(vectors: np.ndarray) -> np.ndarray:
    """Unit vectors along the last axis; a zero vector stays zero (HumanML3D would give NaN)."""
    norm = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.divide(vectors, norm, out=np.zeros_like(vectors), where=norm > 0)


def retarget(joints: np.ndarray) -> np.ndarray:
    """HumanML3D's `uniform_skeleton`: its inverse then forward kinematics keep each bone's
    direction and give it the target length; the root path scales with the right leg."""
    bones = joints[:, 1:] - joints[:, PARENTS[1:]]
    lengths = np.linalg.norm(bones, axis=-1)
    if not (lengths > 0).all():
        frame, bone = np.argwhere(~(lengths > 0))[0]
        raise BadMotion(f"joints {bone + 1} and {PARENTS[bone + 1]} coincide at frame {frame}",
                        "degenerate_pose")
    target = TARGET_BONE_LENGTHS.astype(np.float64)
    leg = [j - 1 for j in LEG_JOINTS]
    out = np.empty_like(joints)
    out[:, 0] = joints[:, 0] * (target[leg].sum() / lengths[0, leg].sum())
    for joint in range(1, JOINTS):  # parents come first
        out[:, joint] = out[:, PARENTS[joint]] + target[joint - 1] * bones[:, joint - 1] / lengths[:, joint - 1, None]
    return out


def _facing(joints: np.ndarray, right_hip: int, left_hip: int) -> np.ndarray:
    """Horizontal facing (T, 3): up x unit(across), across from hips and shoulders."""
    across = _unit(joints[:, right_hip] - joints[:, left_hip]
                   + joints[:, RIGHT_SHOULDER] - joints[:, LEFT_SHOULDER])
    return np.stack([across[:, 2], np.zeros(len(across)), -across[:, 0]], axis=-1)


def _heading(facing: np.ndarray) -> np.ndarray:
    """Angle (T,) about +y, in (-pi, pi], that turns the facing onto +z (a yaw_rotate angle)."""
    return np.arctan2(-facing[:, 0], facing[:, 2])


def to_floor_origin_facing_z(joints: np.ndarray) -> np.ndarray:
    """Lowest joint on y = 0, frame-0 root at the xz origin, frame 0 facing +z."""
    placed = joints.copy()
    placed[..., 1] -= joints[..., 1].min()
    placed[..., [0, 2]] -= joints[0, 0, [0, 2]]
    angle = _heading(_facing(placed[:1], RIGHT_HIP, LEFT_HIP))[0]
    return yaw_rotate(placed, np.full(placed.shape[:2], angle))


def foot_contacts(joints: np.ndarray) -> np.ndarray:
    """(T-1, 4) 1.0 where a foot joint (left ankle, left toe, right ankle, right toe) moves
    less than the threshold, squared, to the next frame."""
    feet = list(LEFT_FOOT + RIGHT_FOOT)
    moved = ((joints[1:, feet] - joints[:-1, feet]) ** 2).sum(axis=-1)
    return (moved < CONTACT_THRESHOLD).astype(np.float64)


def root_heading(joints: np.ndarray) -> np.ndarray:
    """HumanML3D's root heading (T,) from `inverse_kinematics_np(..., smooth_forward=True)`:
    its across takes the hips the other way round, the facing is smoothed, frame 0 is 0."""
    facing = gaussian_filter1d(_facing(joints, LEFT_HIP, RIGHT_HIP), HEADING_SIGMA, axis=0, mode="nearest")
    heading = _heading(facing)
    heading[0] = 0.0
    return heading


def _yaw_matrices(angle: np.ndarray) -> np.ndarray:
    """(T, 3, 3) rotations about +y by angle (as yaw_rotate turns points)."""
    cos, sin, zero, one = np.cos(angle), np.sin(angle), np.zeros_like(angle), np.ones_like(angle)
    return np.stack([np.stack([cos, zero, sin], -1), np.stack([zero, one, zero], -1),
                     np.stack([-sin, zero, cos], -1)], axis=-2)


def _shortest_arc(rest: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """(T, 3, 3) rotation taking the unit `rest` (3,) onto unit `direction` (T, 3) by the
    shortest arc (HumanML3D's qbetween); exactly opposite, a half turn about an axis
    perpendicular to `rest` (HumanML3D would give NaN)."""
    w = 1.0 + direction @ rest
    axis = np.cross(rest, direction)
    opposite = np.sqrt(w * w + (axis * axis).sum(-1)) < 1e-9
    if opposite.any():
        helper = np.array([0.0, 0.0, 1.0]) if abs(rest[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
        w = np.where(opposite, 0.0, w)
        axis[opposite] = _unit(np.cross(rest, helper))
    quat = _unit(np.concatenate([w[:, None], axis], axis=-1))
    return _quaternion_matrices(quat)


def _quaternion_matrices(quat: np.ndarray) -> np.ndarray:
    """(T, 3, 3) rotation matrices of unit quaternions (T, 4) given as (w, x, y, z)."""
    w, x, y, z = np.moveaxis(quat, -1, 0)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], axis=-2)


def local_rotations_6d(joints: np.ndarray, heading: np.ndarray) -> np.ndarray:
    """(T, 21, 6) local rotations of joints 1..21 as the first two columns of their matrices."""
    directions = _unit(joints[:, 1:] - joints[:, PARENTS[1:]])
    root = _yaw_matrices(heading)
    local = np.empty((len(joints), JOINTS - 1, 3, 3))
    for chain in KINEMATIC_CHAIN:
        frame = root
        for joint in chain[1:]:
            bone = _shortest_arc(T2M_RAW_OFFSETS[joint], directions[:, joint - 1])
            local[:, joint - 1] = np.swapaxes(frame, -1, -2) @ bone
            frame = bone
    return np.concatenate([local[..., 0], local[..., 1]], axis=-1)


def joints_to_features(joints: object, layout: str = "humanml3d") -> np.ndarray:
    """HumanML3D's (T-1, 263) float32 features of joint positions (T, 22, 3), T >= 2.

    joints: SMPL's first 22 joints in HumanML3D's order, Y up, metres, 20 fps, any size, place
    or facing. Raises BadMotion (a ValueError with a `reason`) on a wrong shape, NaN/inf,
    fewer than 2 frames, or two joints of a bone at the same place; ValueError for a layout
    other than humanml3d.
    """
    if get_layout(layout).name != "humanml3d":
        raise ValueError(f"joints_to_features makes humanml3d features only, not {layout!r}")
    positions = checked_joints(joints, JOINTS)
    if len(positions) < 2:
        raise BadMotion(f"{len(positions)} frame(s): features need at least 2", "too_short")
    world = to_floor_origin_facing_z(retarget(positions))
    heading = root_heading(world)
    half_turn = heading / 2.0
    # HumanML3D takes arcsin of the y part of q[t+1] * q[t]^-1: a step across +-180 deg folds
    angular = np.arcsin(np.clip(np.sin(half_turn[1:] - half_turn[:-1]), -1.0, 1.0))
    linear = yaw_rotate(world[1:, 0] - world[:-1, 0], heading[1:])[:, [0, 2]]
    facing_frame = world.copy()
    facing_frame[..., [0, 2]] -= world[:, :1, [0, 2]]
    facing_frame = yaw_rotate(facing_frame, heading)
    velocities = yaw_rotate(world[1:] - world[:-1], heading[:-1])
    frames = len(world) - 1
    features = np.concatenate([
        angular[:, None], linear, facing_frame[:-1, 0, 1:2],
        facing_frame[:-1, 1:].reshape(frames, -1),
        local_rotations_6d(world, heading)[:-1].reshape(frames, -1),
        velocities.reshape(frames, -1),
        foot_contacts(world),
    ], axis=-1)
    return features.astype(np.float32)
