"""Physical measures of motions (rehamot/motion/physics.py): hand-built cases whose answers are
worked out here, and the real HumanML3D sample, clean, noised, lifted and with a dragged foot."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from rehamot.motion.kinematics import LAYOUTS
from rehamot.motion.physics import (
    GROUNDS,
    foot_skating,
    jitter,
    joint_measures,
    layout_for_width,
    measure_motions,
    motion_measures,
)

SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "humanml3d-sample"
LEFT_TOE = 10


def standing(frames: int, joints: int = 22, height: float = 0.5) -> np.ndarray:
    """Every joint still at `height` m above the floor."""
    return np.full((frames, joints, 3), [0.0, height, 0.0])


@pytest.fixture(scope="module")
def sample():
    if not (SAMPLE / "new_joint_vecs" / "012314.npy").is_file():
        pytest.skip("the shared HumanML3D sample is not beside this checkout")
    return {"features": np.load(SAMPLE / "new_joint_vecs" / "012314.npy", allow_pickle=False).astype(np.float64),
            "joints": np.load(SAMPLE / "new_joints" / "012314.npy", allow_pickle=False).astype(np.float64),
            "std": np.load(SAMPLE / "Std.npy", allow_pickle=False).astype(np.float64)}


# --------------------------------------------------------------------------- hand-built cases


def test_constant_jerk_is_the_jerk():
    # x(t) = j t³ / 6 sampled at 1/fps: its third difference is exactly j / fps³
    fps, jerk, frames = 20.0, 7.0, 12
    t = np.arange(frames) / fps
    joints = np.zeros((frames, 2, 3))
    joints[:, 0, 0] = jerk * t ** 3 / 6
    joints[:, 1, 2] = 3.0 * t ** 2  # constant acceleration: no jerk
    assert jitter(joints, fps) == pytest.approx(jerk / 2, rel=1e-9)  # mean over the two joints
    assert math.isnan(jitter(joints[:3], fps))  # three frames have no third difference


def test_a_foot_sliding_in_contact_in_4_of_10_steps_skates_0_4():
    # 11 frames = 10 steps; the left toe slides 3 cm/frame (0.6 m/s > 0.5) all along, but is
    # at 1 cm (contact) only in frames 3..7, i.e. in steps 3->4 .. 6->7; elsewhere at 20 cm
    joints = standing(11)
    joints[:, LEFT_TOE, 0] = 0.03 * np.arange(11)
    joints[:, LEFT_TOE, 1] = 0.20
    joints[3:8, LEFT_TOE, 1] = 0.01
    assert foot_skating(joints, 20.0, GROUNDS["humanml3d"].feet) == pytest.approx(0.4)
    assert joint_measures(joints)["foot_skating"] == pytest.approx(0.4)


def test_skating_needs_contact_speed_and_a_sustained_slide():
    feet = GROUNDS["humanml3d"].feet
    planted = standing(11)
    planted[:, LEFT_TOE, 1] = 0.01
    assert foot_skating(planted, 20.0, feet) == 0.0  # on the ground, still
    slow = planted.copy()
    slow[:, LEFT_TOE, 0] = 0.02 * np.arange(11)  # 0.4 m/s: under GMD's 0.5
    assert foot_skating(slow, 20.0, feet) == 0.0
    lifted = planted.copy()
    lifted[:, LEFT_TOE, 0] = 0.03 * np.arange(11)
    lifted[:, LEFT_TOE, 1] = 0.06  # above 5 cm: a swinging foot, not a skating one
    assert foot_skating(lifted, 20.0, feet) == 0.0
    one_step = planted.copy()
    one_step[6:, LEFT_TOE, 0] = 0.03  # a single 3 cm jump: the 5-step window mean is 0.12 m/s
    assert foot_skating(one_step, 20.0, feet) == 0.0
    assert math.isnan(foot_skating(planted[:1], 20.0, feet))  # one frame: no step


def test_skating_threshold_is_a_speed_and_kit_is_in_millimetres():
    # 12.5 fps: 3 cm/frame is 0.375 m/s (no skating), 5 cm/frame 0.625 m/s (skating)
    spec = LAYOUTS["kitml"]
    toe = GROUNDS["kitml"].feet[1]
    for step_mm, expected in ((30.0, 0.0), (50.0, 0.8)):
        joints = np.full((11, spec.joints, 3), [0.0, 500.0, 0.0])
        joints[:, toe, 1] = 10.0
        joints[:, toe, 0] = step_mm * np.arange(11)
        skating = joint_measures(joints, "kitml")["foot_skating"]
        # the 3-step window (0.25 s at 12.5 fps) is zero-padded: the first and last of the 10
        # steps see 2/3 of the speed (0.42 m/s), so 8 of 10 skate
        assert skating == pytest.approx(expected)
    joints = np.full((4, spec.joints, 3), [0.0, 500.0, 0.0])
    joints[:, 0, 1] = [20.0, -10.0, 20.0, -10.0]  # mm
    measures = joint_measures(joints, "kitml")
    assert measures["floating"] == pytest.approx(0.010) and measures["penetration"] == pytest.approx(0.005)


def test_penetration_and_floating_follow_the_lowest_joint():
    joints = standing(4)
    joints[:, 3, 1] = [-0.02, 0.04, -0.02, 0.04]  # the lowest joint alternates under and over the floor
    measures = joint_measures(joints)
    assert measures["penetration"] == pytest.approx(0.01)  # (0.02 + 0 + 0.02 + 0) / 4
    assert measures["floating"] == pytest.approx(0.02)     # (0 + 0.04 + 0 + 0.04) / 4


def test_sets_and_short_motions():
    still = np.zeros((10, 263))
    still[:, 3] = 0.9  # a pelvis 90 cm up, every other joint at the floor's origin
    result = measure_motions({"a": still, "b": still[:2]})
    assert set(result["per_motion"]) == {"a", "b"}
    assert result["per_motion"]["b"]["jitter"] is None  # two frames: no jerk
    assert result["jitter"] == 0.0  # the mean over the motions that have it
    assert measure_motions([still])["per_motion"]["0"]["floating"] == 0.0
    assert layout_for_width(263) == "humanml3d" and layout_for_width(251) == "kitml" and layout_for_width(7) is None
    with pytest.raises(ValueError, match="fps"):
        joint_measures(standing(5), fps=0)
    with pytest.raises(ValueError, match="shape"):
        joint_measures(np.zeros((5, 21, 3)))


# --------------------------------------------------------------------------- the real sample


def test_the_real_sample_stands_on_the_floor(sample):
    measures = motion_measures(sample["features"])
    assert measures["penetration"] == 0.0  # HumanML3D puts the floor at the motion's lowest joint
    assert round(measures["floating"], 5) == 0.01589  # its toe joints, ~1.6 cm above the sole
    assert joint_measures(sample["joints"]) == pytest.approx(measures, rel=1e-5)


def test_half_a_std_of_noise_multiplies_jitter(sample):
    clean = motion_measures(sample["features"])
    rng = np.random.default_rng(0)
    noised = sample["features"] + 0.5 * sample["std"] * rng.standard_normal(sample["features"].shape)
    dirty = motion_measures(noised)
    # measured: 113 m/s³ clean, 3,444 noised (x30); skating 0.14 -> 0.82
    assert 100 < clean["jitter"] < 130
    assert dirty["jitter"] > 20 * clean["jitter"]
    assert dirty["foot_skating"] > 3 * clean["foot_skating"]


def test_lifting_10_cm_floats_10_cm_more(sample):
    lifted = sample["features"].copy()
    lifted[:, 3] += 0.10          # root height
    lifted[:, 5:4 + 21 * 3:3] += 0.10  # every other joint's y (absolute in the ric channels)
    before, after = motion_measures(sample["features"]), motion_measures(lifted)
    assert after["floating"] - before["floating"] == pytest.approx(0.10, abs=1e-9)
    assert after["penetration"] == 0.0 and after["jitter"] == pytest.approx(before["jitter"])
    sunk = sample["features"].copy()
    sunk[:, 3] -= 0.10
    sunk[:, 5:4 + 21 * 3:3] -= 0.10
    assert motion_measures(sunk)["penetration"] > 0.08  # under the floor by 10 cm less the float


def test_dragging_a_planted_foot_skates(sample):
    joints = sample["joints"].copy()
    joints[:, 11, 0] += 0.03 * np.arange(len(joints))  # the right toe, planted in 89% of frames
    before, after = joint_measures(sample["joints"]), joint_measures(joints)
    # measured: 0.136 -> 0.757
    assert round(before["foot_skating"], 3) == 0.136
    assert after["foot_skating"] > 0.7


def test_the_evaluator_table_shows_the_physical_columns_once_measured():
    from rich.console import Console

    from rehamot.evaluation.generation_eval import format_scores, score_embeddings, with_physics

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(16, 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    result = score_embeddings(emb, [1] * 16, emb, emb, repeats=2, batch_size=8)

    def text() -> str:
        console = Console(record=True, width=300)
        console.print(format_scores(result))
        return console.export_text()

    assert "jitter" not in text() and result["real"]["jitter"] is None  # embeddings alone: no joints
    with_physics(result["generated"], {"jitter": 1234.5, "foot_skating": 0.25, "penetration": 0.0, "floating": 0.0159})
    generated = next(line for line in text().splitlines() if line.startswith("│ generated"))
    assert "1234.500 ± 0.000" in generated and "0.250 ± 0.000" in generated
    assert "1.590 ± 0.000" in generated  # floating shown in cm
    assert result["generated"]["floating_ci95"] == 0.0  # fixed motion sets: no replication moves them
