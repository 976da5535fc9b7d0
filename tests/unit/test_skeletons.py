"""Other skeletons, frame rates, up axes and units onto HumanML3D's joints
(rehamot/motion/skeletons.py), and the one-line refusals with a reason a data tool can record."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rehamot.kinematics import SKELETONS, BadMotion, features_to_joints, joints_to_features, to_humanml3d_joints
from rehamot.motion.skeletons import REASONS

SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "humanml3d-sample"


def smooth_motion(frames: int, joints: int = 22, seed: int = 0) -> np.ndarray:
    """A made-up (frames, joints, 3) motion: every coordinate a slow sine."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames)[:, None, None]
    return rng.normal(size=(1, joints, 3)) + 0.3 * np.sin(0.05 * t + rng.uniform(0, 6, (1, joints, 3)))


def kit_from_smpl(joints: np.ndarray) -> np.ndarray:
    """(T, 21, 3) KIT-ML's MMM joints placed on SMPL joints (T, 22, 3); mid-foot between ankle and toe."""
    def mid(a, b):
        return (joints[:, a] + joints[:, b]) / 2

    smpl_of_kit = {0: 0, 1: 3, 2: 9, 3: 12, 4: 15, 5: 16, 6: 18, 7: 20, 8: 17, 9: 19, 10: 21,
                   11: 1, 12: 4, 13: 7, 15: 10, 16: 2, 17: 5, 18: 8, 20: 11}
    kit = [joints[:, smpl_of_kit[k]] if k in smpl_of_kit else None for k in range(21)]
    kit[14], kit[19] = mid(7, 10), mid(8, 11)
    return np.stack(kit, axis=1)


def test_smpl_family_skeletons_keep_their_first_22_joints():
    body = smooth_motion(10)
    np.testing.assert_array_equal(to_humanml3d_joints(body, "smpl22", 20), body)
    for name, count in (("smplh", 52), ("smplx", 55)):
        extra = np.concatenate([body, smooth_motion(10, count - 22, seed=1)], axis=1)
        assert SKELETONS[name].joints == count
        np.testing.assert_array_equal(to_humanml3d_joints(extra, name, 20), body)


def test_kit21_joints_map_onto_smpl_joints_and_midpoints():
    body = smooth_motion(4)
    mapped = to_humanml3d_joints(kit_from_smpl(body), "kit21", 20)
    same = [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 15, 16, 17, 18, 19, 20, 21]
    np.testing.assert_allclose(mapped[:, same], body[:, same], atol=1e-12)
    np.testing.assert_allclose(mapped[:, 6], (body[:, 3] + body[:, 9]) / 2)    # spine2
    np.testing.assert_allclose(mapped[:, 13], (body[:, 12] + body[:, 16]) / 2)  # left collar
    np.testing.assert_allclose(mapped[:, 14], (body[:, 12] + body[:, 17]) / 2)  # right collar


def test_a_kit_shaped_motion_keeps_its_root_path_through_features():
    """The HumanML3D sample as KIT joints: only the spine and collars are guessed, so after
    joints_to_features -> features_to_joints the root path is within a few centimetres of the
    sample's (measured 1.3 mm over a 2.3 m path) and so are the legs."""
    path = SAMPLE / "new_joints" / "012314.npy"
    if not path.is_file():
        pytest.skip("the shared HumanML3D sample is not beside this checkout")
    joints = np.load(path, allow_pickle=False).astype(np.float64)
    kit = kit_from_smpl(joints) * 1000.0  # KIT-ML's raw MMM joints are in millimetres
    back = features_to_joints(joints_to_features(to_humanml3d_joints(kit, "kit21", 20, unit="mm")))
    np.testing.assert_allclose(back[:, 0], joints[:-1, 0], rtol=0, atol=0.01)
    np.testing.assert_allclose(back[:, [1, 2, 4, 5, 7, 8, 10, 11]], joints[:-1, [1, 2, 4, 5, 7, 8, 10, 11]], atol=0.01)
    assert np.abs(joints[:, 0, [0, 2]]).max() > 1.0  # the sample walks: a real path


def test_z_up_is_turned_as_humanml3d_turns_amass():
    """HumanML3D's raw_pose_processing: points times [[1,0,0],[0,0,1],[0,1,0]] (y and z
    swapped), then x negated. Two reflections: a rotation, so the body's left stays left."""
    z_up = smooth_motion(6)
    swap_y_z = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    expected = np.dot(z_up, swap_y_z) * [-1.0, 1.0, 1.0]
    np.testing.assert_allclose(to_humanml3d_joints(z_up, "smpl22", 20, up="z"), expected)
    assert np.linalg.det(swap_y_z * [[-1.0], [1.0], [1.0]]) == pytest.approx(1.0)
    head_above_pelvis = np.zeros((2, 22, 3))
    head_above_pelvis[:, 15, 2] = 1.7
    assert to_humanml3d_joints(head_above_pelvis, "smpl22", 20, up="z")[0, 15, 1] == pytest.approx(1.7)


@pytest.mark.parametrize("unit, scale", [("m", 1.0), ("cm", 0.01), ("mm", 0.001)])
def test_units_become_metres(unit, scale):
    motion = smooth_motion(3)
    np.testing.assert_allclose(to_humanml3d_joints(motion, "smpl22", 20, unit=unit), motion * scale)


@pytest.mark.parametrize("fps", [20, 40, 60, 120, 1000])
def test_multiples_of_20_fps_keep_every_nth_frame(fps):
    motion = smooth_motion(2001)
    np.testing.assert_array_equal(to_humanml3d_joints(motion, "smpl22", fps), motion[::fps // 20])


@pytest.mark.parametrize("fps, frames, expected_frames", [(30, 31, 21), (12.5, 26, 41), (50, 11, 5), (1, 3, 41)])
def test_other_rates_are_interpolated_linearly_to_20_fps(fps, frames, expected_frames):
    """A motion moving at constant speed: after resampling, frame k is where it was at k / 20 s."""
    seconds = np.arange(frames) / fps
    motion = np.zeros((frames, 22, 3))
    motion[..., 0] = 0.7 * seconds[:, None]
    resampled = to_humanml3d_joints(motion, "smpl22", fps)
    assert resampled.shape == (expected_frames, 22, 3)
    expected = np.broadcast_to(0.7 * np.arange(expected_frames)[:, None] / 20, (expected_frames, 22))
    np.testing.assert_allclose(resampled[..., 0], expected, atol=1e-12)


@pytest.mark.parametrize("kwargs, reason", [
    ({"skeleton": "mixamo"}, "unknown_skeleton"),
    ({"skeleton": "smplh"}, "bad_joint_count"),
    ({"joints": np.full((8, 22, 3), np.inf)}, "not_finite"),
    ({"joints": np.zeros((8, 22))}, "bad_shape"),
    ({"fps": 0.5}, "bad_fps"),
    ({"fps": 1001}, "bad_fps"),
    ({"fps": float("nan")}, "bad_fps"),
    ({"fps": "30"}, "bad_fps"),
    ({"unit": "inch"}, "bad_unit"),
    ({"up": "x"}, "bad_up_axis"),
    ({"joints": smooth_motion(2), "fps": 60}, "too_short"),  # 2 frames at 60 fps: 1 at 20
])
def test_bad_input_is_refused_with_a_one_line_reason(kwargs, reason):
    args = {"joints": smooth_motion(8), "skeleton": "smpl22", "fps": 20, **kwargs}
    with pytest.raises(BadMotion) as caught:
        to_humanml3d_joints(**args)
    error = caught.value
    assert isinstance(error, ValueError) and error.reason == reason and reason in REASONS
    assert "\n" not in str(error) and str(error).startswith(f"{reason}: ")
