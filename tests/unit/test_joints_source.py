"""The `joints` source on made-up motions: every conversion refusal is a skip with its reason,
other skeletons of the same body give the same features, and kitml refuses a native width
for the shared representation."""
from __future__ import annotations

import json

import numpy as np
from shard_fixtures import read_split, skips
from test_skeletons import smooth_motion

from rehamot.data import schema
from rehamot.kinematics import joints_to_features
from shards.make_shards import main


def walking(frames: int = 60) -> np.ndarray:
    """A (frames, 22, 3) body that moves forward: a smooth motion plus a root path."""
    body = smooth_motion(frames)
    body[..., 2] += np.linspace(0.0, 2.0, frames)[:, None]
    return body


def corpus(folder, motions: dict, **fields_of) -> str:
    (folder / "joints").mkdir()
    lines = []
    for motion_id, joints in motions.items():
        np.save(folder / "joints" / f"{motion_id}.npy", joints, allow_pickle=True)
        line = {"id": motion_id, "joints": f"joints/{motion_id}.npy", "skeleton": "smpl22",
                "fps": 20, "split": "train", "captions": [f"a person does {motion_id}"]}
        lines.append({**line, **fields_of.get(motion_id, {})})
    path = folder / "joints.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def test_conversion_refusals_are_skips_with_their_reason(tmp_path):
    body = walking()
    degenerate = body.copy()
    degenerate[:, 1] = degenerate[:, 0]  # the left hip on the pelvis: that bone has no direction
    motions = {"good": body, "hands": np.concatenate([body, smooth_motion(60, 30, seed=1)], 1),
               "unit": body, "axis": body, "flat": body[:, :, 0], "degenerate": degenerate,
               "pickled": np.array([{"x": 1}], dtype=object), "provenance": body}
    path = corpus(tmp_path, motions, hands={"skeleton": "smplh"}, unit={"unit": "inch"},
                  axis={"up": "x"}, provenance={"source": {"file": "a.npz", "start": 2, "end": 1}})
    out = tmp_path / "out"
    assert main(["joints", "--file", path, "--out", str(out)]) == 0
    manifest = json.loads((out / schema.MANIFEST_NAME).read_text())
    assert skips(manifest) == {
        ("unit", "motion"): "bad_unit", ("axis", "motion"): "bad_up_axis",
        ("flat", "motion"): "bad_shape", ("degenerate", "motion"): "degenerate_pose",
        ("pickled", "motion"): "pickled_motion", ("provenance", "motion"): "bad_record"}
    samples = {s["key"]: s["motion"] for s in read_split(out, "train")}
    assert sorted(samples) == ["good", "hands"]
    assert samples["hands"].tobytes() == samples["good"].tobytes()  # smplh keeps its first 22
    np.testing.assert_array_equal(samples["good"], joints_to_features(body))
    assert manifest["representation"]["skeletons"] == ["smpl22", "smplh"]
    assert manifest["provenance"] == {}  # no record named a source


def test_kitml_humanml3d_refuses_another_feature_width(tmp_path, capsys):
    (tmp_path / "new_joints").mkdir()
    (tmp_path / "texts").mkdir()
    assert main(["kitml", "--root", str(tmp_path), "--out", str(tmp_path / "out"),
                 "--representation", "humanml3d", "--feature-dim", "251"]) == 1
    assert "--feature-dim 251: --representation humanml3d writes HumanML3D's 263" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_every_kinematics_reason_is_a_shard_skip_reason() -> None:
    """A motion the kinematics refuse is skipped with the kinematics' own code."""
    from rehamot.data.schema import SKIP_REASONS
    from rehamot.motion.skeletons import REASONS

    assert set(REASONS) <= set(SKIP_REASONS)
