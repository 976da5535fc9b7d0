"""The procedural demo corpus (shards/demo_corpus.py): layout, determinism, features,
captions, splits, mirrors, and that different actions give measurably different motions."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from rehamot.motion.kinematics import features_to_joints
from rehamot.motion.skeletons import to_humanml3d_joints
from shards.demo_actions import ACTIONS, Plan, Unit, synthesize
from shards.demo_captions import mirror_caption
from shards.demo_corpus import build_motion, write_demo_source
from shards.demo_features import FEATURE_GROUPS, joints_to_features
from shards.demo_joints import JointsFormat, export_joints
from shards.demo_skeleton import CHANNELS, ROOT_CHANNELS, forward_kinematics, mirror_joints

REPO = Path(__file__).resolve().parents[2]
MOTIONS = 300
# shared/ lies beside the checkout (CI clones elsewhere and copies shared/ next to the clone)
SHARED_SAMPLE = REPO.parent / "shared" / "fixtures" / "humanml3d-sample"
REAL_SAMPLE = SHARED_SAMPLE if SHARED_SAMPLE.is_dir() else None


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo") / "source"
    return root, write_demo_source(root, MOTIONS, seed=0, workers=1)


def _ids(root: Path, split: str) -> list[str]:
    return (root / f"{split}.txt").read_text().split()


def _lines(root: Path, ident: str) -> list[list[str]]:
    return [line.split("#") for line in (root / "texts" / f"{ident}.txt").read_text().splitlines()]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_bytes_whatever_the_worker_count(corpus, tmp_path):
    root, _ = corpus
    other = tmp_path / "two_workers"
    write_demo_source(other, MOTIONS, seed=0, workers=2)
    first, second = _files(root), _files(other)
    assert len(first) == 3 * MOTIONS + 5  # 3 files per motion + splits + Mean/Std
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []


def test_another_seed_gives_another_corpus(corpus, tmp_path):
    root, _ = corpus
    other = tmp_path / "seed1"
    write_demo_source(other, 20, seed=1)
    a = np.load(root / "new_joint_vecs" / "000000.npy")
    b = np.load(other / "new_joint_vecs" / "000000.npy")
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_shapes_dtypes_lengths_and_finite_values(corpus):
    root, stats = corpus
    ids = [i for split in ("train", "val", "test") for i in _ids(root, split)]
    assert len(ids) == stats["motions"] == MOTIONS
    for ident in ids:
        feats = np.load(root / "new_joint_vecs" / f"{ident}.npy", allow_pickle=False)
        joints = np.load(root / "new_joints" / f"{ident}.npy", allow_pickle=False)
        assert feats.dtype == np.float32 and joints.dtype == np.float32
        assert feats.shape[1] == 263 and joints.shape == (len(feats), 22, 3)
        assert 40 <= len(feats) <= 196  # 2 s to 9.8 s at 20 fps
        assert np.isfinite(feats).all() and np.isfinite(joints).all()
    assert stats["frames"]["min"] >= 40 and stats["frames"]["max"] <= 196
    assert stats["fps"] == 20.0


def test_actions_start_and_end_at_rest_so_chains_blend(corpus):
    angles = [i for i, name in enumerate(CHANNELS) if name not in ROOT_CHANNELS]
    for name, action in ACTIONS.items():
        for draw in range(3):
            track = action.build(action.sample(np.random.default_rng(draw)))
            assert np.abs(track[[0, -1]]).max() < 0.05, name  # rest pose, standing still
            assert np.abs(np.diff(track[:, angles], axis=0)).max() < 1.0, name  # 20 rad/s at most
    root, _ = corpus
    worst = max(
        np.linalg.norm(np.diff(np.load(p), axis=0), axis=-1).max()
        for p in (root / "new_joints").glob("*.npy")
    )
    assert worst < 0.75  # metres per frame (15 m/s: a running foot, never a jump cut)


def test_feature_layout_matches_the_joints(corpus):
    root, _ = corpus
    for ident in _ids(root, "test")[:15]:
        feats = np.load(root / "new_joint_vecs" / f"{ident}.npy")
        joints = np.load(root / "new_joints" / f"{ident}.npy")
        np.testing.assert_allclose(feats[:, 3], joints[:, 0, 1], atol=1e-6)  # root height = pelvis y
        assert joints[..., 1].min() >= -1e-6  # on the floor
        contacts = feats[:, 259:263]
        assert set(np.unique(contacts)) <= {0.0, 1.0}
        # root rotation + velocity + ric reproduce every joint (HumanML3D's recover_from_ric)
        np.testing.assert_allclose(features_to_joints(feats), joints, atol=2e-4)
        rot = feats[:, 67:193].reshape(len(feats), 21, 2, 3)
        np.testing.assert_allclose(np.linalg.norm(rot, axis=-1), 1.0, atol=1e-5)
        np.testing.assert_allclose((rot[:, :, 0] * rot[:, :, 1]).sum(-1), 0.0, atol=1e-5)


def _walk(**overrides) -> Plan:
    params = {"speed": "normal", "duration": 3.0, "amp": 1.0, "tempo": 1.0, **overrides}
    return Plan([Unit("walk_forward", params)], lead_s=0.5, tail_s=0.5)


def test_straight_walk_ric_is_joints_minus_root_at_20_fps():
    feats, joints = build_motion(_walk())
    heading = -2.0 * np.cumsum(feats[:, 0])
    assert np.abs(heading).max() < 0.05  # radians: only the torso's gait sway
    root_xz = joints[:, :1].copy()
    root_xz[..., 1] = 0.0
    ric = feats[:, 4:67].reshape(-1, 21, 3)
    np.testing.assert_allclose(ric, joints[:, 1:] - root_xz, atol=0.02)
    np.testing.assert_allclose(ric[..., 1], joints[:, 1:, 1], atol=1e-6)  # heights are absolute
    # the pose track asks for 1.25 m/s; at 20 fps that is 0.0625 m per frame mid-walk
    mid = slice(len(feats) // 2 - 5, len(feats) // 2 + 5)
    assert feats[mid, 2].mean() * 20.0 == pytest.approx(1.25, rel=0.05)
    assert np.abs(feats[mid, 1]).max() < 0.01  # no sideways drift
    slow, _ = build_motion(_walk(speed="slow"))
    assert slow[len(slow) // 2, 2] < 0.8 * feats[mid, 2].mean()


def test_turning_left_gives_negative_root_angular_velocity():
    params = {"side": "left", "angle": 90, "duration": 1.5, "amp": 1.0, "tempo": 1.0}
    feats, _ = build_motion(Plan([Unit("turn", params)]))
    # channel 0 is half the per-frame heading change, negative when turning left (HumanML3D)
    assert -2.0 * feats[:, 0].sum() == pytest.approx(np.pi / 2, rel=0.03)
    right, _ = build_motion(Plan([Unit("turn", {**params, "side": "right"})]))
    assert -2.0 * right[:, 0].sum() == pytest.approx(-np.pi / 2, rel=0.03)


def test_at_least_20_actions_are_used(corpus):
    _, stats = corpus
    used = [name for name, count in stats["actions"].items() if count > 0]
    assert len(used) >= 20
    assert len(ACTIONS) >= 20


def test_caption_lines_and_duplicate_rate(corpus):
    root, stats = corpus
    whole, subclips = [], 0
    for path in sorted((root / "texts").glob("*.txt")):
        lines = [line.split("#") for line in path.read_text(encoding="utf-8").splitlines()]
        assert len(lines) >= 3
        frames = len(np.load(root / "new_joint_vecs" / path.with_suffix(".npy").name))
        for text, tokens, start, end in lines:
            assert text.strip() and tokens == " ".join(
                f"{w}/OTHER" for w in re.findall(r"[a-z0-9'-]+", text.lower())
            )
            start_s, end_s = float(start), float(end)
            if (start_s, end_s) == (0.0, 0.0):
                whole.append(text)
            else:  # a sub-clip naming one chained action, long enough for --min-frames 40
                subclips += 1
                assert 0.0 <= start_s and end_s <= frames / 20.0 and end_s - start_s >= 2.0
        assert len({line[0] for line in lines}) == len(lines)  # distinct within a motion
    assert len(whole) == 3 * MOTIONS
    assert subclips == stats["subclip_captions"] and stats["captions"] == len(whole) + subclips
    assert subclips <= 0.05 * stats["captions"]
    rate = 1.0 - len(set(whole)) / len(whole)
    assert stats["duplicate_caption_rate"] == pytest.approx(rate, abs=1e-5)
    assert rate < 0.05
    assert stats["train_test_duplicate_caption_rate"] < 0.05


def test_splits_are_80_10_10_with_mirrors_beside_their_parent(corpus):
    root, stats = corpus
    splits = {name: _ids(root, name) for name in ("train", "val", "test")}
    assert {k: len(v) for k, v in splits.items()} == {"train": 240, "val": 30, "test": 30}
    assert stats["splits"] == {"train": 240, "val": 30, "test": 30}
    split_of = {i: name for name, ids in splits.items() for i in ids}
    assert len(split_of) == MOTIONS  # disjoint
    assert set(split_of) == {p.stem for p in (root / "new_joint_vecs").glob("*.npy")}
    mirrors = [i for i in split_of if i.startswith("M")]
    assert len(mirrors) == stats["mirrored"] == 30
    assert all(split_of[m[1:]] == split_of[m] for m in mirrors)
    assert all(re.fullmatch(r"M?\d{6}", i) for i in split_of)


def test_mean_and_std_come_from_the_train_split(corpus):
    root, _ = corpus
    def stack(split: str) -> np.ndarray:
        return np.concatenate([np.load(root / "new_joint_vecs" / f"{i}.npy") for i in _ids(root, split)])
    train = stack("train").astype(np.float64)
    std = train.std(axis=0)
    for first, last in FEATURE_GROUPS.values():  # HumanML3D keeps one std per feature group
        std[first:last] = std[first:last].mean()
    mean_file, std_file = np.load(root / "Mean.npy"), np.load(root / "Std.npy")
    assert mean_file.shape == std_file.shape == (263,) and mean_file.dtype == np.float32
    np.testing.assert_allclose(mean_file, train.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std_file, std, rtol=1e-4, atol=1e-6)
    everything = np.concatenate([train, stack("val"), stack("test")])
    assert np.abs(everything.mean(axis=0) - mean_file).max() > 1e-4  # not the whole corpus
    assert (std_file > 0).all()


def test_mirrors_swap_joints_and_caption_words(corpus):
    root, _ = corpus
    mirrors = sorted(p.stem for p in (root / "new_joint_vecs").glob("M*.npy"))
    with_side_word = 0
    for mirror in mirrors:
        parent = mirror[1:]
        np.testing.assert_allclose(
            np.load(root / "new_joints" / f"{mirror}.npy"),
            mirror_joints(np.load(root / "new_joints" / f"{parent}.npy")), atol=1e-5,
        )
        parent_lines, mirror_lines = _lines(root, parent), _lines(root, mirror)
        assert [line[0] for line in mirror_lines] == [mirror_caption(line[0]) for line in parent_lines]
        assert [line[2:] for line in mirror_lines] == [line[2:] for line in parent_lines]
        words = Counter(w for line in parent_lines for w in re.findall(r"\w+", line[0].lower()))
        mirrored_words = Counter(w for line in mirror_lines for w in re.findall(r"\w+", line[0].lower()))
        assert (words["left"], words["right"]) == (mirrored_words["right"], mirrored_words["left"])
        with_side_word += words["left"] + words["right"] > 0
    assert with_side_word >= 0.9 * len(mirrors)  # only left/right motions are mirrored
    assert mirror_caption("A man kicks with his left leg, then turns right.") == (
        "A man kicks with his right leg, then turns left."
    )


CLASSES = [  # (action, parameters that must be told apart)
    ("walk_forward", {"speed": "slow"}), ("walk_forward", {"speed": "fast"}),
    ("walk_backward", {}), ("run_forward", {}), ("jump", {"direction": "up"}), ("squat", {}),
    ("turn", {"side": "left", "angle": 90}), ("turn", {"side": "right", "angle": 90}),
    ("kick", {"side": "left"}), ("kick", {"side": "right"}),
    ("wave", {"side": "left"}), ("wave", {"side": "right"}),
    ("side_step", {"side": "left"}), ("side_step", {"side": "right"}),
    ("punch", {"side": "left"}), ("punch", {"side": "right"}), ("clap", {}), ("sit", {}),
]


def test_different_actions_are_nearest_to_their_own_kind(corpus):
    """Leave-one-out 1-nearest-neighbour on normalised feature statistics: a retrieval model
    has something to learn only if action, direction, side and speed show in the features."""
    root, _ = corpus
    mean, std = np.load(root / "Mean.npy"), np.load(root / "Std.npy")
    descriptors, labels = [], []
    for label, (name, fixed) in enumerate(CLASSES):
        for draw in range(3):  # durations, repetitions, amplitudes and tempo vary
            params = {**ACTIONS[name].sample(np.random.default_rng([label, draw])), **fixed}
            feats, _ = build_motion(Plan([Unit(name, params)]))
            z = (feats - mean) / std
            descriptors.append(np.concatenate([z.mean(axis=0), z.std(axis=0)]))
            labels.append(label)
    x, y = np.array(descriptors), np.array(labels)
    dist = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    assert (y[dist.argmin(axis=1)] == y).mean() >= 0.95


@pytest.mark.skipif(REAL_SAMPLE is None, reason="the real HumanML3D sample is not on this machine")
def test_feature_code_follows_humanml3d_on_the_real_sample():
    """Our features from the real sample's joints agree with its real features where the
    definitions coincide (contacts, root height, positions; rotations are our own choice)."""
    joints = np.load(REAL_SAMPLE / "new_joints" / "012314.npy")
    real = np.load(REAL_SAMPLE / "new_joint_vecs" / "012314.npy")[:-1]
    ours, _ = joints_to_features(joints)
    np.testing.assert_array_equal(ours[:, 259:], real[:, 259:])
    np.testing.assert_allclose(ours[:, 3], real[:, 3], atol=1e-5)
    assert np.median(np.abs(ours[:, 4:67] - real[:, 4:67])) < 0.02
    assert np.median(np.abs(ours[:, 193:259] - real[:, 193:259])) < 0.005
    assert np.corrcoef(ours[1:, 0], real[1:, 0])[0, 1] > 0.7  # same turning sign convention


def test_refuses_a_non_empty_folder_and_tiny_corpora(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(FileExistsError):
        write_demo_source(tmp_path / "busy", 20)
    with pytest.raises(ValueError):
        write_demo_source(tmp_path / "tiny", 5)


def test_command_line(tmp_path):
    out = tmp_path / "cli"
    done = subprocess.run(
        [sys.executable, str(REPO / "shards" / "demo_corpus.py"), "--out", str(out), "--motions", "20",
         "--seed", "3"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["motions"] == 20 and stats["splits"] == {"train": 16, "val": 2, "test": 2}
    assert len(list((out / "new_joint_vecs").glob("*.npy"))) == 20


# --- the corpus as joint positions of another skeleton, rate, axis and unit -------------------


def _smpl_motion() -> np.ndarray:
    """(T, 22, 3) joints of a demo motion with a long root path (a walk, a run, a circle)."""
    common = {"amp": 1.0, "tempo": 1.0}
    plan = Plan([Unit("run_forward", {"speed": "fast", "duration": 2.5, **common}),
                 Unit("walk_circle", {"side": "left", "duration": 6.0, **common})], 0.2, 0.2)
    return forward_kinematics(synthesize(plan))


def test_kit21_joints_turn_back_into_the_smpl_motion():
    joints = _smpl_motion()
    kit = export_joints(joints, JointsFormat("kit21", 12.5, "z", "mm"))
    frames = int(np.floor((len(joints) - 1) / 1.6)) + 1  # 12.5 fps over the same span
    assert kit.shape == (frames, 21, 3) and kit.dtype == np.float32
    # Z up, millimetres: the pelvis stands ~0.9 m high on z; frame k is 20 fps frame 1.6 k
    assert 800 < kit[0, 0, 2] < 1000 and np.allclose(kit[0, 0, [0, 1]], 0.0, atol=1.0)
    assert np.allclose(kit[5, 0], 1000 * np.array([-1, 1, 1]) * joints[8, 0, [0, 2, 1]], atol=0.01)
    # mid-foot joints halfway between ankle and foot
    assert np.allclose(kit[:, 14], (kit[:, 13] + kit[:, 15]) / 2, atol=1e-3)

    back = to_humanml3d_joints(kit, "kit21", 12.5, up="z", unit="mm")
    assert back.shape[1:] == (22, 3) and len(back) <= len(joints)
    error = back[:, 0] - joints[: len(back), 0]
    travelled = np.linalg.norm(joints[-1, 0, [0, 2]] - joints[0, 0, [0, 2]])
    # measured: the floor path within 1.7 cm over 11 m, the height within 3.6 cm (a run's
    # bounce sampled at 12.5 fps and interpolated back), 6 mm on average
    assert travelled > 10.0
    assert np.linalg.norm(error[:, [0, 2]], axis=-1).max() < 0.025
    assert np.abs(error[:, 1]).max() < 0.05 and np.linalg.norm(error, axis=-1).mean() < 0.01
    # at 20 fps, Y up, metres: the mapped joints come back exactly, the midpoints standing
    # for spine2 and the collars within a few centimetres
    same_rate = to_humanml3d_joints(export_joints(joints, JointsFormat("kit21")), "kit21", 20.0)
    distance = np.linalg.norm(same_rate - joints, axis=-1).max(axis=0)
    midpoints = [6, 13, 14]
    assert np.delete(distance, midpoints).max() < 1e-5 and distance[midpoints].max() < 0.05, distance


def test_smpl22_joints_at_20_fps_are_the_motion_itself():
    joints = _smpl_motion()
    out = export_joints(joints, JointsFormat())
    assert out.shape == joints.shape and np.allclose(out, joints, atol=1e-6)
    assert np.allclose(to_humanml3d_joints(out, "smpl22", 20.0), joints, atol=1e-6)
    # 40 fps (the way in keeps every 2nd frame: the originals), Z up, centimetres
    moved = export_joints(joints, JointsFormat("smpl22", 40.0, "z", "cm"))
    assert len(moved) == 2 * len(joints) - 1 and moved[..., 2].mean() > 50  # heights in cm on z
    assert np.abs(to_humanml3d_joints(moved, "smpl22", 40.0, up="z", unit="cm") - joints).max() < 1e-5


def test_joints_format_refuses_what_the_joints_source_would_skip():
    for bad in ({"skeleton": "smplx"}, {"fps": 0.5}, {"up": "x"}, {"unit": "in"}):
        with pytest.raises(ValueError):
            JointsFormat(**bad)


@pytest.fixture(scope="module")
def kit_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("kit") / "source"
    fmt = JointsFormat("kit21", 12.5, "z", "mm")
    return root, write_demo_source(root, 120, seed=1, style="kit", joints=fmt)


def test_the_corpus_writes_joints_and_a_jsonl_for_the_joints_source(kit_corpus):
    root, stats = kit_corpus
    records = [json.loads(line) for line in (root / "corpus.jsonl").read_text().splitlines()]
    assert stats["joints"] == {"skeleton": "kit21", "fps": 12.5, "up": "z", "unit": "mm"}
    assert len(records) == stats["motions"] == 120
    assert Counter(r["split"] for r in records) == stats["splits"]
    for record in records:
        assert {k: record[k] for k in ("skeleton", "fps", "up", "unit")} == stats["joints"]
        joints = np.load(root / record["joints"])
        # the whole motion: one frame more than its features, at 12.5 fps
        features = np.load(root / "new_joint_vecs" / f"{record['id']}.npy")
        assert joints.shape == (int(np.floor(len(features) / 1.6)) + 1, 21, 3)
        lines = _lines(root, record["id"])
        expected = [c if (s, e) == ("0.0", "0.0") else {"text": c, "start": float(s), "end": float(e)}
                    for c, _, s, e in lines]
        assert record["captions"] == expected
    assert any(isinstance(c, dict) for r in records for c in r["captions"]) or stats["subclip_captions"] == 0


def test_the_kit_style_has_more_locomotion_and_terser_captions(corpus, kit_corpus):
    (_, plain), (root, kit) = corpus, kit_corpus
    walking = ("walk_forward", "walk_backward", "run_forward", "side_step", "turn", "walk_circle")

    def share(stats):
        return sum(stats["actions"][a] for a in walking) / sum(stats["actions"].values())

    assert share(kit) > share(plain) + 0.15, (share(kit), share(plain))
    texts = [line[0].lower() for p in sorted((root / "texts").glob("*.txt"))
             for line in _lines(root, p.stem)]
    assert all(t.startswith(("a person", "a human", "someone", "after ", "first, ")) for t in texts), texts[:5]
    closings = ("and comes to a stop", "and then rests", "and returns to standing", "and then pauses")
    assert not any(t.rstrip(".").endswith(closings) for t in texts)


def test_command_line_joints_options(tmp_path):
    def cli(*args):
        return subprocess.run(
            [sys.executable, str(REPO / "shards" / "demo_corpus.py"), "--motions", "20", *args],
            capture_output=True, text=True, timeout=120, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})

    done = cli("--out", str(tmp_path / "b"), "--style", "kit", "--skeleton", "kit21", "--fps", "12.5",
               "--up", "z", "--unit", "mm")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["joints"] == {"skeleton": "kit21", "fps": 12.5, "up": "z", "unit": "mm"}
    assert len((tmp_path / "b" / "corpus.jsonl").read_text().splitlines()) == 20
    refused = cli("--out", str(tmp_path / "c"), "--fps", "12.5")
    assert refused.returncode == 2 and "--skeleton" in refused.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "c").exists()
