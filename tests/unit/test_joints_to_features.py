"""Joint positions to HumanML3D's 263-d features (rehamot/motion/features.py): the real HumanML3D
sample both ways, invariance to where the motion stands and faces, a standing skeleton worked by
hand, and refusals."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rehamot.kinematics import BadMotion, features_to_joints, joints_to_features, yaw_rotate
from rehamot.motion.features import PARENTS, T2M_RAW_OFFSETS, TARGET_BONE_LENGTHS

SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "humanml3d-sample"
CONTINUOUS = slice(0, 259)  # everything but the 4 foot contacts
CONTACTS = slice(259, 263)


def sample(kind: str) -> np.ndarray:
    path = SAMPLE / kind / "012314.npy"
    if not path.is_file():
        pytest.skip("the shared HumanML3D sample is not beside this checkout")
    return np.load(path, allow_pickle=False)


def rest_pose() -> np.ndarray:
    """(22, 3) HumanML3D's target skeleton in its rest pose: every bone along its rest direction
    (x left, y up, z forward), so it stands facing +z."""
    lengths = np.concatenate([[0.0], TARGET_BONE_LENGTHS.astype(np.float64)])
    pose = np.zeros((22, 3))
    for joint in range(1, 22):
        pose[joint] = pose[PARENTS[joint]] + lengths[joint] * T2M_RAW_OFFSETS[joint]
    return pose


def walking_forward(step: float, frames: int = 3, scale: float = 1.0) -> np.ndarray:
    """The rest pose, scaled, gliding `step` metres per frame along +z."""
    motion = np.repeat(rest_pose()[None] * scale, frames, axis=0)
    motion[..., 2] += step * np.arange(frames)[:, None]
    return motion


def test_sample_joints_round_trip_through_features():
    joints = sample("new_joints")
    features = joints_to_features(joints)
    assert features.shape == (len(joints) - 1, 263) and features.dtype == np.float32
    # new_joints stand on the floor at the origin facing +z: features_to_joints gives them back
    # up to float32 round-off (measured 1.3e-6 m)
    np.testing.assert_allclose(features_to_joints(features), joints[:-1], rtol=0, atol=1e-5)


def test_sample_joints_give_humanml3d_own_features():
    """HumanML3D made new_joint_vecs from a motion one frame longer than new_joints (its last
    feature row needs that frame): the rows agree to round-off except within ~3 sigma of the
    Gaussian heading smoothing (60 frames) of the end, which sees the missing frame."""
    joints, expected = sample("new_joints"), sample("new_joint_vecs")[:-1]
    features = joints_to_features(joints)
    assert features.shape == expected.shape == (169, 263)
    far_from_end = slice(0, len(features) - 60)
    np.testing.assert_allclose(features[far_from_end, CONTINUOUS], expected[far_from_end, CONTINUOUS],
                               rtol=0, atol=5e-5)  # measured 2.4e-5
    np.testing.assert_allclose(features[:, CONTINUOUS], expected[:, CONTINUOUS], rtol=0, atol=2e-2)  # 1.3e-2
    np.testing.assert_array_equal(features[:, CONTACTS], expected[:, CONTACTS])
    assert 0 < expected[:, CONTACTS].mean() < 1  # the sample has both contacts and swings


def test_features_ignore_where_the_motion_stands_and_faces():
    joints = sample("new_joints").astype(np.float64)
    turned = yaw_rotate(joints, np.full(joints.shape[:2], 2.0)) + np.array([3.0, 0.5, -7.0])
    reference = joints_to_features(joints)
    np.testing.assert_allclose(joints_to_features(turned), reference, rtol=0, atol=2e-5)
    assert not np.allclose(joints_to_features(joints[::-1]), reference[::-1], atol=1e-2)  # not a blind check


def test_a_standing_skeleton_gliding_forward_by_hand():
    """Rest pose facing +z, 0.04 m per frame along +z: no turn, velocity (0, 0.04) in the facing
    frame, the root as high as the longer leg (left thigh + shin: the left foot is the floor),
    identity joint rotations, and feet that move 0.04^2 = 0.0016 < 0.002 m^2: in contact."""
    features = joints_to_features(walking_forward(0.04))
    assert features.shape == (2, 263)
    height = float(TARGET_BONE_LENGTHS[3] + TARGET_BONE_LENGTHS[6])  # bones into L_knee, L_ankle
    np.testing.assert_allclose(features[:, 0:4], [[0.0, 0.0, 0.04, height]] * 2, atol=1e-6)
    ric = rest_pose()[1:] - [0.0, rest_pose()[:, 1].min(), 0.0]
    np.testing.assert_allclose(features[:, 4:67], np.tile(ric.ravel(), (2, 1)), atol=1e-6)
    np.testing.assert_allclose(features[:, 67:193], np.tile([1.0, 0, 0, 0, 1, 0], (2, 21)), atol=1e-6)
    np.testing.assert_allclose(features[:, 193:259], np.tile([0.0, 0.0, 0.04], (2, 22)), atol=1e-6)
    np.testing.assert_array_equal(features[:, CONTACTS], 1.0)
    # 0.05 m per frame: 0.0025 m^2 > 0.002, no contact
    np.testing.assert_array_equal(joints_to_features(walking_forward(0.05))[:, CONTACTS], 0.0)


def test_a_taller_skeleton_is_retargeted_and_its_path_scaled_by_the_leg():
    """1.25 times as tall, gliding 1.25 * 0.04 per frame: the same features as the target
    skeleton gliding 0.04 (every bone takes the target length, the root path scales by the legs)."""
    tall = joints_to_features(walking_forward(0.05, frames=4, scale=1.25))
    np.testing.assert_allclose(tall, joints_to_features(walking_forward(0.04, frames=4)), atol=1e-6)


def test_the_heading_takes_the_hips_the_wrong_way_round_as_humanml3d_does():
    """HumanML3D's root heading adds (left hip - right hip) to (right shoulder - left shoulder):
    with both shoulders on the mid-line, its facing frame is half a turn round from frame 1 on
    (frame 0's is forced to none), while the frame-0 facing (hips the right way round) is +z."""
    pose = rest_pose()
    for arm in ([13, 16, 18, 20], [14, 17, 19, 21]):  # collar bones up instead of sideways
        pose[arm] += [-pose[arm[0], 0], abs(pose[arm[0], 0]), 0.0]
    features = joints_to_features(np.repeat(pose[None], 30, axis=0))
    left_hip_x = features[:, 4]
    np.testing.assert_allclose(left_hip_x[0], TARGET_BONE_LENGTHS[0], atol=1e-6)  # +x: not turned
    np.testing.assert_allclose(left_hip_x[1:], -TARGET_BONE_LENGTHS[0], atol=1e-6)  # half a turn
    # the root turns by half a turn from frame 0 to 1 (feature 0 is half the angle), then no more
    np.testing.assert_allclose(np.abs(features[:, 0]), [np.pi / 2] + [0.0] * 28, atol=1e-6)


@pytest.mark.parametrize("joints, reason", [
    (np.zeros((5, 21, 3)), "bad_joint_count"),
    (np.zeros((5, 22, 2)), "bad_shape"),
    (np.full((5, 22, 3), np.nan), "not_finite"),
    (walking_forward(0.04, frames=1), "too_short"),
    (np.zeros((5, 22, 3)), "degenerate_pose"),
])
def test_bad_joints_are_refused_with_a_reason(joints, reason):
    with pytest.raises(BadMotion) as caught:
        joints_to_features(joints)
    assert caught.value.reason == reason and isinstance(caught.value, ValueError)
    assert "\n" not in str(caught.value) and str(caught.value).startswith(reason + ":")


def test_only_the_humanml3d_layout_is_made():
    with pytest.raises(ValueError, match="humanml3d"):
        joints_to_features(walking_forward(0.04), layout="kitml")
