"""`make_shards.py joints` and `kitml --representation humanml3d`: joint positions of other
skeletons, axes, units and rates sharded as HumanML3D's 263 features at 20 fps, through the
command a user runs."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import REPO, run_cli
from unit.shard_fixtures import caption_line, read_split, skips, write_layout
from unit.test_skeletons import kit_from_smpl, smooth_motion

from rehamot.data import schema
from rehamot.kinematics import joints_to_features, to_humanml3d_joints

SAMPLE = REPO.parent / "shared" / "fixtures" / "humanml3d-sample" / "new_joints" / "012314.npy"
SCRIPT = "shards/make_shards.py"


def shards(*args: str, check: bool = True):
    return run_cli([sys.executable, SCRIPT, *map(str, args)], timeout=120, check=check)


def sample_joints() -> np.ndarray:
    if not SAMPLE.is_file():
        pytest.skip("the shared HumanML3D sample is not beside this checkout")
    return np.load(SAMPLE, allow_pickle=False).astype(np.float64)


def z_up_cm(joints: np.ndarray) -> np.ndarray:
    """The Y-up metres motion as an AMASS-style Z-up one in centimetres: the inverse of
    HumanML3D's turn (x, y, z) -> (-x, z, y)."""
    return np.stack([-joints[..., 0], joints[..., 2], joints[..., 1]], axis=-1) * 100.0


def resampled(joints: np.ndarray, fps: float) -> np.ndarray:
    """The 20 fps motion at `fps`, linearly interpolated over the same span."""
    times = np.arange(0.0, (len(joints) - 1) / 20.0 + 1e-9, 1.0 / fps)
    position = times * 20.0
    before = np.floor(position).astype(int)
    after = np.minimum(before + 1, len(joints) - 1)
    weight = (position - before)[:, None, None]
    return joints[before] * (1.0 - weight) + joints[after] * weight


GOOD = {  # id -> (split, skeleton, fps, up, unit)
    "walk": ("train", "smpl22", 20, "y", "m"),
    "walk_zcm": ("train", "smpl22", 20, "z", "cm"),
    "walk_60": ("val", "smpl22", 60, "y", "m"),
    "walk_kit": ("test", "kit21", 12.5, "y", "mm"),
}
BAD = {  # id -> the reason it is skipped for
    "bad_skeleton": "unknown_skeleton",
    "nan": "not_finite",
    "outside": "outside_root",
    "fps_zero": "bad_fps",
    "one_frame": "too_short",
    "brief": "too_few_frames",  # 30 frames: 29 feature rows < the humanml3d layout's 40
    "joint_count": "bad_joint_count",
}


def joints_of(motion_id: str, walk: np.ndarray) -> np.ndarray:
    made = {"walk": walk, "walk_zcm": z_up_cm(walk), "walk_60": resampled(walk, 60),
            "walk_kit": kit_from_smpl(resampled(walk, 12.5)) * 1000.0,
            "bad_skeleton": walk, "nan": np.where(np.arange(len(walk))[:, None, None] == 5,
                                                  np.nan, walk),
            "fps_zero": walk, "one_frame": walk[:1], "brief": walk[:30],
            "joint_count": walk[:, :21]}
    return made[motion_id]


def record(motion_id: str, **fields) -> dict:
    line = {"id": motion_id, "joints": f"joints/{motion_id}.npy", "skeleton": "smpl22",
            "fps": 20, "split": "train", "captions": [f"a person does {motion_id}"]}
    return {**line, **fields}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    walk = sample_joints()
    base = tmp_path_factory.mktemp("joints")
    root = base / "src"
    (root / "joints").mkdir(parents=True)
    np.save(base / "outside.npy", walk)  # a real motion, but outside the root
    lines = []
    for motion_id, (split, skeleton, fps, up, unit) in GOOD.items():
        np.save(root / "joints" / f"{motion_id}.npy", joints_of(motion_id, walk))
        lines.append(record(motion_id, split=split, skeleton=skeleton, fps=fps, up=up, unit=unit))
    lines[0]["captions"].append({"text": "the first steps", "start": 0.5, "end": 3.0})
    lines[0]["source"] = {"file": "HumanML3D/012314.npy", "start": 0.0, "end": 8.45}
    for motion_id in BAD:
        if motion_id != "outside":
            np.save(root / "joints" / f"{motion_id}.npy", joints_of(motion_id, walk))
    lines += [record("bad_skeleton", skeleton="mixamo"), record("nan"),
              record("outside", joints="../outside.npy"), record("fps_zero", fps=0),
              record("one_frame"), record("brief"), record("joint_count")]
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    one, two = base / "w1", base / "w2"
    shards("joints", "--file", root / "corpus.jsonl", "--out", one)
    shards("joints", "--file", root / "corpus.jsonl", "--out", two, "--workers", "2")
    return {"walk": walk, "one": one, "two": two,
            "manifest": json.loads((one / schema.MANIFEST_NAME).read_text())}


def test_joints_shards_verify_and_say_what_they_hold(corpus):
    assert "verify: ok" in shards("verify", corpus["one"]).stdout
    manifest = corpus["manifest"]
    assert (manifest["feature_dim"], manifest["fps"]) == (263, 20.0)
    assert manifest["representation"] == {"layout": "humanml3d", "feature_dim": 263, "fps": 20.0,
                                          "computed_from": "joints",
                                          "skeletons": ["kit21", "smpl22"]}
    assert manifest["provenance"] == {"walk": {"file": "HumanML3D/012314.npy", "start": 0.0,
                                               "end": 8.45}}
    assert manifest["mean_std_source"] == "computed:train"


def test_each_bad_line_is_skipped_with_its_reason(corpus):
    manifest = corpus["manifest"]
    assert skips(manifest) == {(motion_id, "motion"): reason for motion_id, reason in BAD.items()}
    assert manifest["accounting"]["motions"] == {"named": 11, "written": 4, "skipped": 7}


def test_features_are_those_of_the_source_joints(corpus):
    walk, out = corpus["walk"], corpus["one"]
    samples = {s["key"]: s for split in ("train", "val", "test") for s in read_split(out, split)}
    assert sorted(samples) == ["walk", "walk_1", "walk_60", "walk_kit", "walk_zcm"]
    expected = joints_to_features(walk)
    np.testing.assert_allclose(samples["walk"]["motion"], expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(samples["walk_1"]["motion"], expected[10:60], rtol=0, atol=1e-6)
    assert samples["walk"]["meta"]["source"]["file"] == "joints/walk.npy"
    # another axis, unit and rate of the same motion: the same features up to round-off
    for motion_id in ("walk_zcm", "walk_60"):
        np.testing.assert_allclose(samples[motion_id]["motion"], expected, rtol=0, atol=2e-4)
    kit = joints_of("walk_kit", walk)
    np.testing.assert_allclose(
        samples["walk_kit"]["motion"],
        joints_to_features(to_humanml3d_joints(kit, "kit21", 12.5, unit="mm")), rtol=0, atol=1e-6)


def test_workers_give_byte_identical_shards(corpus):
    one, two = corpus["one"], corpus["two"]
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    assert not [n for n in names if n.startswith(".")]  # the scratch features are gone
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_kitml_new_joints_in_humanml3d_representation(tmp_path):
    """A KIT-ML-shaped folder: new_joints/ (T, 21, 3) mm at 12.5 fps, new_joint_vecs/ of 251
    features and its own Mean/Std; --representation humanml3d shards the joints."""
    kit = {f"{i:05d}": kit_from_smpl(smooth_motion(60 + 10 * i, seed=i)) * 1000.0 for i in range(4)}
    root = write_layout(tmp_path / "KIT-ML", {i: np.zeros((len(j), 251), np.float32)
                                              for i, j in kit.items()},
                        {i: caption_line(f"a person does kit move {i}") for i in kit},
                        {"train": ["00000", "00001", "00002"], "test": ["00003"]},
                        mean_std=(np.zeros(251, np.float32), np.ones(251, np.float32)))
    (root / "new_joints").mkdir()
    for motion_id, joints in kit.items():
        np.save(root / "new_joints" / f"{motion_id}.npy", joints)
    shards("kitml", "--root", root, "--out", tmp_path / "shared", "--representation", "humanml3d")
    manifest = json.loads((tmp_path / "shared" / schema.MANIFEST_NAME).read_text())
    assert (manifest["feature_dim"], manifest["fps"], manifest["corpus"]) == (263, 20.0, "kitml")
    assert manifest["representation"]["skeletons"] == ["kit21"]
    assert manifest["mean_std_source"] == "computed:train"  # not KIT-ML's 251-d Mean/Std
    assert manifest["converter"]["args"]["min_frames"] == 40
    test = read_split(tmp_path / "shared", "test")
    expected = joints_to_features(to_humanml3d_joints(kit["00003"], "kit21", 12.5, unit="mm"))
    np.testing.assert_allclose(test[0]["motion"], expected, rtol=0, atol=1e-6)
    assert test[0]["meta"]["source"]["file"] == "new_joints/00003.npy"
    assert "verify: ok" in shards("verify", tmp_path / "shared").stdout
    # the default stays the 251 native features
    shards("kitml", "--root", root, "--out", tmp_path / "native")
    native = json.loads((tmp_path / "native" / schema.MANIFEST_NAME).read_text())
    assert (native["feature_dim"], native["fps"]) == (251, 12.5) and "representation" not in native
