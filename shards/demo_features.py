"""HumanML3D's 263-dim motion features, computed from 22 joint positions (y up).

Follows `process_file` of HumanML3D's motion_representation (EricGuo5513/HumanML3D), on a
skeleton that needs no retargeting. From T joint frames it writes T-1 feature frames:

    [0]        root angular velocity about y, *half* the per-frame heading change (radians),
               sign as in HumanML3D (turning left, towards +x, is negative)
    [1:3]      root linear velocity (x, z) per frame, in the root's facing frame of frame t+1
    [3]        root height (the pelvis y, floor at 0)
    [4:67]     joints 1..21 relative to the root: x, z in the facing frame minus the root's
               x, z; y is the absolute height (HumanML3D's "ric")
    [67:193]   6D joint rotations of joints 1..21 (see below)
    [193:259]  velocities of all 22 joints per frame, rotated into the facing frame
    [259:263]  foot contacts (l_ankle, l_foot, r_ankle, r_foot): squared per-frame
               displacement below 0.002 m^2, as in HumanML3D

Preprocessing as HumanML3D: the lowest joint of the whole clip sits on the floor, the root
starts at the xz origin, and the (smoothed) initial facing direction is +z. Facing comes from
the hips and shoulders (across = r_hip - l_hip + r_shoulder - l_shoulder, forward = up x
across). We smooth the unwrapped heading angle with a Gaussian of sigma 4 frames, so gait
sway averages out; HumanML3D smooths the forward vector with sigma 20, which lags through
turns and can flip by 180 degrees in a fast spin.

Rotations (our documented choice). Joint positions do not determine joint rotations (twist
about a bone is invisible), so, like HumanML3D's inverse kinematics, we use *swing*
rotations: S_j is the smallest rotation taking joint j's rest bone direction (HumanML3D's
`t2m_raw_offsets`: legs and arms hang down, spine up, feet forward) to its current bone
direction (parent -> j). Unlike HumanML3D, the bone directions are first expressed in the
root's facing frame, so the channel does not depend on the heading. The stored rotation is
local along HumanML3D's kinematic chains, R_j = S_parent^T S_j, where a chain's first bone
(the hips, spine1 and the collars) is relative to the facing frame itself. 6D = the first
two columns of R_j, as in HumanML3D's `quaternion_to_cont6d`.
"""
from __future__ import annotations

import numpy as np

from rehamot.motion.kinematics import yaw_rotate
from shards.demo_skeleton import PARENTS

FEATURE_DIM = 263
FOOT_CONTACT_THRESHOLD = 0.002
FACING_SIGMA = 4.0
FEATURE_GROUPS = {  # HumanML3D's Std is averaged within these groups
    "root_rot_vel": (0, 1),
    "root_lin_vel": (1, 3),
    "root_height": (3, 4),
    "ric": (4, 67),
    "rot6d": (67, 193),
    "local_vel": (193, 259),
    "foot_contact": (259, 263),
}
_RAW_OFFSETS = np.array(
    [[0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, -1, 0], [0, 1, 0],
     [0, -1, 0], [0, -1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [0, 1, 0], [1, 0, 0],
     [-1, 0, 0], [0, 0, 1], [0, -1, 0], [0, -1, 0], [0, -1, 0], [0, -1, 0], [0, -1, 0],
     [0, -1, 0]],
    dtype=np.float64,
)
_FACE_JOINTS = (2, 1, 17, 16)  # r_hip, l_hip, r_shoulder, l_shoulder
_FEET = (7, 10, 8, 11)


def gaussian_smooth(x: np.ndarray, sigma: float, axis: int = 0) -> np.ndarray:
    """Gaussian filter along `axis` with edge replication (scipy's mode="nearest").

    A plain weighted sum in a fixed order (no BLAS), so results never depend on threads.
    """
    radius = int(4 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    x = np.moveaxis(x, axis, 0)
    padded = np.concatenate([np.repeat(x[:1], radius, 0), x, np.repeat(x[-1:], radius, 0)])
    out = taps[0] * padded[: len(x)]
    for k in range(1, 2 * radius + 1):
        out += taps[k] * padded[k : k + len(x)]
    return np.moveaxis(out, 0, axis)


def facing_heading(joints: np.ndarray) -> np.ndarray:
    """Unwrapped heading per frame (..., T) (radians, 0 = facing +z, positive towards +x)."""
    r_hip, l_hip, r_sdr, l_sdr = _FACE_JOINTS
    across = joints[..., r_hip, :] - joints[..., l_hip, :] + joints[..., r_sdr, :] - joints[..., l_sdr, :]
    raw = np.unwrap(np.arctan2(across[..., 2], -across[..., 0]), axis=-1)  # forward = up x across
    return gaussian_smooth(raw, FACING_SIGMA, axis=-1)


def min_rotation(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Smallest rotations (..., 3, 3) taking unit vectors u to unit vectors v (Rodrigues:
    R = cos I + [w]_x + w w^T / (1 + cos), w = u x v), written out per component because
    numpy is slow on stacks of tiny matrices.

    Opposite vectors (a raised arm against its hanging rest direction) have no unique
    smallest rotation: they get the half turn about u x (1, 0, 0), or u x (0, 0, 1) when u
    lies along x, so the result is still a proper rotation.
    """
    u, v = np.broadcast_arrays(u, v)
    w = np.cross(u, v)
    cos = (u * v).sum(-1)
    near_opposite = cos < -1.0 + 1e-6
    scale = 1.0 / np.where(near_opposite, 1.0, 1.0 + cos)
    rot = np.empty(u.shape + (3,))
    for i in range(3):
        scaled = w[..., i] * scale
        for j in range(3):
            rot[..., i, j] = scaled * w[..., j]
        rot[..., i, i] += cos
    rot[..., 0, 1] -= w[..., 2]
    rot[..., 0, 2] += w[..., 1]
    rot[..., 1, 0] += w[..., 2]
    rot[..., 1, 2] -= w[..., 0]
    rot[..., 2, 0] -= w[..., 1]
    rot[..., 2, 1] += w[..., 0]
    if near_opposite.any():
        uu = u[near_opposite]
        ref = np.where(np.abs(uu[:, :1]) > 0.9, [[0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0]])
        half_axis = np.cross(uu, ref)
        half_axis /= np.linalg.norm(half_axis, axis=-1, keepdims=True)
        rot[near_opposite] = 2.0 * half_axis[:, :, None] * half_axis[:, None, :] - np.eye(3)
    return rot


_PARENT_BONE = np.array([0 if j in {1, 2, 3, 13, 14} else PARENTS[j] for j in range(1, 22)])


def _rotations_6d(local_joints: np.ndarray) -> np.ndarray:
    """(..., T, 21*6) rotations from joint positions (..., T, 22, 3) in the facing frame.

    Computes the two columns R e_0, R e_1 of R = S_parent^T S with Rodrigues written out
    per component (S x = c x + w x x + w (w.x) / (1 + c)), never building 3x3 matrices:
    numpy is slow on stacks of tiny ones. Near-opposite swings fall back to `min_rotation`.
    """
    bones = local_joints[..., 1:, :] - local_joints[..., list(PARENTS[1:]), :]
    bones /= np.maximum(np.linalg.norm(bones, axis=-1, keepdims=True), 1e-9)
    dx, dy, dz = np.moveaxis(bones, -1, 0)
    ux, uy, uz = _RAW_OFFSETS[1:].T
    cos = ux * dx + uy * dy + uz * dz
    wx, wy, wz = uy * dz - uz * dy, uz * dx - ux * dz, ux * dy - uy * dx  # u x d
    opposite = cos < -1.0 + 1e-6
    inv = 1.0 / np.where(opposite, 1.0, 1.0 + cos)

    def parent_of(x: np.ndarray, identity: float) -> np.ndarray:  # slot 0: the facing frame
        return np.concatenate([np.full(x[..., :1].shape, identity), x], axis=-1)[..., _PARENT_BONE]

    pc, pi = parent_of(cos, 1.0), parent_of(inv, 0.5)
    px, py, pz = parent_of(wx, 0.0), parent_of(wy, 0.0), parent_of(wz, 0.0)
    out = []
    for sx, sy, sz in (  # S e_0 and S e_1
        (cos + wx * wx * inv, wz + wy * wx * inv, wz * wx * inv - wy),
        (wx * wy * inv - wz, cos + wy * wy * inv, wx + wz * wy * inv),
    ):
        f = (px * sx + py * sy + pz * sz) * pi  # S_p^T s = c s - w x s + w (w.s) / (1 + c)
        out += [pc * sx - (py * sz - pz * sy) + px * f,
                pc * sy - (pz * sx - px * sz) + py * f,
                pc * sz - (px * sy - py * sx) + pz * f]
    cont6d = np.stack(out, axis=-1)
    bad = opposite | parent_of(opposite, False).astype(bool)
    if bad.any():
        frames = bad.any(axis=-1)
        cont6d[bad] = _matrix_6d(bones[frames], bad[frames])
    return cont6d.reshape(cont6d.shape[:-2] + (-1,))


def _matrix_6d(bones: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """The same 6D through full matrices, for frames (N, 21, 3) holding a near-opposite swing."""
    swing = min_rotation(_RAW_OFFSETS[1:], bones)
    frame = np.broadcast_to(np.eye(3), swing[:, :1].shape)
    parent = np.concatenate([frame, swing], axis=1)[:, _PARENT_BONE]
    local = np.swapaxes(parent, -1, -2) @ swing
    return np.concatenate([local[..., 0], local[..., 1]], axis=-1)[bad]


def joints_to_features(joints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HumanML3D features (..., T-1, 263) float32 and the normalised joints (..., T, 22, 3).

    The returned joints (float64) are the ones the features describe (floor at 0, root
    starting at the origin, initially facing +z); frame t of them matches feature frame t.
    Leading axes batch motions; pad a shorter motion by repeating its last frame and its
    features are unchanged (every step is per frame, or edge-replicating like the padding).
    """
    pos = np.array(joints, dtype=np.float64)
    pos[..., 1] -= pos[..., 1].min(axis=(-2, -1), keepdims=True)
    pos[..., [0, 2]] -= pos[..., :1, :1, [0, 2]]
    heading = facing_heading(pos)
    pos = yaw_rotate(pos, np.broadcast_to(-heading[..., :1], heading.shape))  # face +z at frame 0
    heading = heading - heading[..., :1]

    diff = pos[..., 1:, :, :] - pos[..., :-1, :, :]
    root_rot_vel = -(heading[..., 1:] - heading[..., :-1])[..., None] / 2.0
    root_lin_vel = yaw_rotate(diff[..., 0, :], -heading[..., 1:])[..., [0, 2]]
    root_height = pos[..., :-1, 0, 1:2]
    rel = pos.copy()
    rel[..., [0, 2]] -= pos[..., :1, [0, 2]]
    rel = yaw_rotate(rel, -heading)[..., :-1, :, :]  # world -> facing frame
    flat = rel.shape[:-2] + (-1,)
    ric = rel[..., 1:, :].reshape(flat)
    rot = _rotations_6d(rel)
    local_vel = yaw_rotate(diff, -heading[..., :-1]).reshape(flat)
    contacts = (np.square(diff[..., _FEET, :]).sum(-1) < FOOT_CONTACT_THRESHOLD).astype(np.float64)
    feats = np.concatenate(
        [root_rot_vel, root_lin_vel, root_height, ric, rot, local_vel, contacts], axis=-1
    )
    return feats.astype(np.float32), pos
