"""Joint recovery from HumanML3D/KIT-ML features (rehamot/motion/kinematics.py): the real HumanML3D
sample, hand-derived cases of the root integration, a KIT-layout round trip, and refusals."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rehamot.motion.kinematics import LAYOUTS, features_to_joints, get_layout

SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "humanml3d-sample"


def test_real_humanml3d_sample_gives_humanml3d_own_joints():
    if not (SAMPLE / "new_joints" / "012314.npy").is_file():
        pytest.skip("the shared HumanML3D sample is not beside this checkout")
    features = np.load(SAMPLE / "new_joint_vecs" / "012314.npy", allow_pickle=False)
    expected = np.load(SAMPLE / "new_joints" / "012314.npy", allow_pickle=False)
    joints = features_to_joints(features)
    assert joints.shape == expected.shape == (170, 22, 3)
    np.testing.assert_allclose(joints, expected, rtol=0, atol=1e-4)
    assert np.abs(joints[-1, 0, [0, 2]]).max() > 0.05  # the sample does move: a real check


def test_layout_facts():
    humanml3d, kitml = LAYOUTS["humanml3d"], LAYOUTS["kitml"]
    assert (humanml3d.feature_dim, humanml3d.joints, humanml3d.fps) == (263, 22, 20.0)
    assert (kitml.feature_dim, kitml.joints, kitml.fps) == (251, 21, 12.5)
    for layout in LAYOUTS.values():
        chains = layout.kinematic_chain
        assert {j for chain in chains for j in chain} == set(range(layout.joints))
        sides = layout.left_chains + layout.right_chains + layout.centre_chains
        assert sorted(sides) == list(range(len(chains)))  # every chain gets exactly one colour
        assert len(layout.left_chains) == len(layout.right_chains) == 2  # a leg and an arm each
    # the subject's left (+x when facing +z): SMPL's left hip is 1, MMM's left shoulder is 5
    assert 1 in humanml3d.kinematic_chain[humanml3d.left_chains[0]]
    assert any(5 in kitml.kinematic_chain[i] for i in kitml.left_chains)
    assert get_layout("kitml") is kitml


def test_zero_velocities_keep_the_root_at_the_origin():
    features = np.zeros((12, 251))
    features[:, 3] = np.linspace(0.9, 1.0, 12)  # root height
    features[:, 4:64] = np.tile(np.arange(60) / 10.0, (12, 1))  # a fixed facing-frame pose
    joints = features_to_joints(features, layout="kitml")
    assert joints.shape == (12, 21, 3)
    np.testing.assert_array_equal(joints[:, 0, [0, 2]], 0.0)
    np.testing.assert_allclose(joints[:, 0, 1], features[:, 3])
    np.testing.assert_allclose(joints[:, 1:].reshape(12, 60), features[:, 4:64])  # no turn: ric as is


def test_a_quarter_turn_then_forward_walks_along_plus_x():
    """Feature 0 is half the heading change, negative towards +x (HumanML3D's convention)."""
    features = np.zeros((4, 263))
    features[:, 3] = 0.9
    features[0, 0] = -np.pi / 4  # frame 0 -> 1: turn from facing +z to facing +x
    features[1:, 2] = 0.5  # then 0.5 forward per frame
    features[:, 4:7] = [0.0, 1.5, 1.0]  # joint 1 one metre in front of the root
    joints = features_to_joints(features)
    np.testing.assert_allclose(joints[:, 0], [[0, 0.9, 0], [0, 0.9, 0], [0.5, 0.9, 0], [1.0, 0.9, 0]],
                               atol=1e-12)
    np.testing.assert_allclose(joints[0, 1], [0.0, 1.5, 1.0], atol=1e-12)  # facing +z
    np.testing.assert_allclose(joints[3, 1], [2.0, 1.5, 0.0], atol=1e-12)  # facing +x


def _yaw_matrix(angle: float) -> np.ndarray:
    """Rotation about +y taking +z towards +x by `angle` (right-handed, y up)."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _kitml_features(joints: np.ndarray, heading: np.ndarray) -> np.ndarray:
    """251-d KIT-ML features of joints (T, 21, 3) whose root faces `heading` (T,), heading[0] = 0,
    written from the definitions (velocities and ric in the facing frame); the unused
    rotation/velocity/contact channels stay zero."""
    frames = len(joints)
    features = np.zeros((frames, 251))
    features[:-1, 0] = -np.diff(heading) / 2.0
    for t in range(frames):
        to_facing = _yaw_matrix(heading[t]).T
        if t + 1 < frames:
            step = joints[t + 1, 0] - joints[t, 0]
            features[t, 1:3] = (_yaw_matrix(heading[t + 1]).T @ step)[[0, 2]]
        features[t, 3] = joints[t, 0, 1]
        rel = joints[t, 1:] - joints[t, 0] * [1.0, 0.0, 1.0]
        features[t, 4:64] = (rel @ to_facing.T).ravel()
    return features


def test_kitml_round_trip_from_known_joints():
    rng = np.random.default_rng(0)
    frames = 30
    heading = np.concatenate([[0.0], np.cumsum(rng.uniform(-0.3, 0.3, frames - 1))])
    joints = rng.normal(size=(frames, 21, 3))
    joints[:, 0, [0, 2]] = np.cumsum(rng.normal(scale=0.1, size=(frames, 2)), axis=0)
    joints[:, 0, [0, 2]] -= joints[0, 0, [0, 2]]  # the features start at the origin
    recovered = features_to_joints(_kitml_features(joints, heading), layout="kitml")
    np.testing.assert_allclose(recovered, joints, atol=1e-10)


GOOD = np.zeros((5, 263))


@pytest.mark.parametrize(
    ("features", "layout", "message"),
    [
        (np.zeros(263), "humanml3d", "shape"),
        (np.zeros((2, 5, 263)), "humanml3d", "shape"),
        (np.zeros((5, 251)), "humanml3d", "(frames, 263)"),
        (np.zeros((5, 263)), "kitml", "(frames, 251)"),
        (np.zeros((0, 263)), "humanml3d", "zero frames"),
        (np.where(np.arange(263) == 7, np.nan, GOOD), "humanml3d", "NaN"),
        (np.where(np.arange(263) == 7, np.inf, GOOD), "humanml3d", "infinite"),
        (GOOD, "smpl", "unknown layout"),
        (GOOD.astype(complex), "humanml3d", "real numeric"),
        (np.full((5, 263), "x"), "humanml3d", "real numeric"),
    ],
    ids=["1-D", "3-D", "kitml-width-as-humanml3d", "humanml3d-width-as-kitml", "zero-frames",
         "nan", "inf", "unknown-layout", "complex", "strings"],
)
def test_bad_input_is_a_one_line_value_error(features, layout, message):
    with pytest.raises(ValueError) as caught:
        features_to_joints(features, layout=layout)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
