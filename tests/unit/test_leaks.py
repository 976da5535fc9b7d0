"""No leaks across corpora: the coarse keys stored with the shards, the duplicate test (copies,
mirrors, crops of at least half, provenance), `make_shards.py hygiene` and the plan that leaves
dropped samples out."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from rehamot.data import leaks, schema
from rehamot.data.plan import SourceShards, drop_samples, plan_mixture
from rehamot.data.reading import read_raw_motions
from rehamot.motion.kinematics import features_to_joints
from shards.leak_keys import KEY_JOINT_INDICES, features_key

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo(demo_shards):
    manifest = schema.load_manifest(str(demo_shards))
    return {"dir": str(demo_shards), "manifest": manifest,
            "keys": leaks.load_keys(str(demo_shards), manifest, "demo"),
            "test": read_raw_motions(str(demo_shards), "test"),
            "train": read_raw_motions(str(demo_shards), "train")}


def keyset(name, entries, provenance=None) -> leaks.KeySet:
    """entries: (id, split, key or None)."""
    keys = [k for _, _, k in entries]
    data = np.load(__import__("io").BytesIO(leaks.encode_keys(
        [e[0] for e in entries], [e[1] for e in entries], [e[0] for e in entries], keys)), allow_pickle=False)
    out = leaks.KeySet(name, data["ids"].tolist(), data["splits"].tolist(), data["parents"].tolist(),
                       data["offsets"], data["pose"].astype(np.float32), data["root"], data["heading"])
    out.provenance = provenance or {}
    return out


def mirrored_key(features):
    """The exact left/right mirror of a motion, keyed: joints mirrored, heading negated."""
    joints = features_to_joints(features)[:, list(KEY_JOINT_INDICES["humanml3d"][0])]
    joints = joints[:, leaks.MIRROR] * np.array([-1.0, 1.0, 1.0])
    heading = np.zeros(len(features))
    heading[1:] = -2.0 * np.cumsum(features[:-1, 0].astype(np.float64))
    return leaks.motion_key(joints, -heading, 20.0)


def flagged(report, name="train"):
    return set(report["dropped"].get(name, []))


def test_keys_are_stored_beside_the_manifest_with_their_sha256(demo):
    entry = demo["manifest"]["leak_keys"]
    assert entry["path"] == leaks.KEYS_NAME and entry["content"] and entry["layout"] == "humanml3d"
    keys = demo["keys"]
    samples = sum(e["motions"] for e in demo["manifest"]["splits"].values())
    assert len(keys) == samples and keys.sha256 == entry["sha256"]
    assert (np.diff(keys.offsets) > 0).all()  # every demo sample has joints
    with np.load(f"{demo['dir']}/{leaks.KEYS_NAME}", allow_pickle=False) as npz:
        assert npz["pose"].dtype == np.float16
    # about 10 key frames a second
    some = next(iter(demo["test"]))
    frames = len(demo["test"][some])
    assert np.diff(keys.offsets)[keys.ids.index(some)] == (frames - 1) // 2 + 1


def test_the_keys_file_is_the_same_bytes_for_the_same_shards(demo):
    import zipfile

    with zipfile.ZipFile(f"{demo['dir']}/{leaks.KEYS_NAME}") as archive:
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}  # no build time
    keys = demo["keys"]
    again = leaks.encode_keys(keys.ids, keys.splits, keys.parents, [
        (keys.pose[a:b].astype(np.float16), keys.root[a:b], keys.heading[a:b])
        for a, b in zip(keys.offsets[:-1], keys.offsets[1:])])
    assert __import__("hashlib").sha256(again).hexdigest() == keys.sha256


def test_the_training_stream_never_reads_a_dropped_sample(demo):
    from rehamot.data.pipeline import DataConfig, TrainStream

    cfg = DataConfig(shards=demo["dir"], batch_size=8, num_workers=0, max_len=40, shuffle_buffer=0)
    whole = TrainStream(cfg, None)
    train_ids = sorted(demo["train"])
    dropped = train_ids[::3]
    stream = TrainStream(cfg, None, dropped={whole.sources[0].name: dropped})
    assert stream.num_samples == whole.num_samples - len(dropped)
    assert stream.steps_per_epoch == stream.num_samples // 8
    seen = [i for batch in stream.loader(0) for i in batch["ids"]]
    assert len(seen) == stream.steps_per_epoch * 8 and not set(seen) & set(dropped)


def test_an_altered_keys_file_is_refused_naming_it(demo, tmp_path):
    copy = tmp_path / "altered"
    shutil.copytree(demo["dir"], copy)
    path = copy / leaks.KEYS_NAME
    data = bytearray(path.read_bytes())
    data[-100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(leaks.LeakKeysError, match=f"{leaks.KEYS_NAME}: sha256 differs"):
        leaks.load_keys(str(copy), schema.load_manifest(str(copy)), "x")
    out = subprocess.run([sys.executable, "shards/make_shards.py", "hygiene", str(copy)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert leaks.KEYS_NAME in out.stderr and "sha256 differs" in out.stderr


def test_copy_mirror_and_crops_of_half_are_found_a_short_overlap_and_another_motion_are_not(demo):
    test_id = max(demo["test"], key=lambda i: len(demo["test"][i]))
    whole = demo["test"][test_id]
    frames = len(whole)
    motion = whole[: frames * 3 // 5]  # the test motion: the first 60 % of a demo motion
    half = (len(motion) + 1) // 2
    entries = [(test_id, "test", features_key(motion, "humanml3d", 20.0)),
               ("copy", "train", features_key(motion, "humanml3d", 20.0)),
               ("mirror", "train", mirrored_key(motion)),
               ("crop_odd_start", "train", features_key(motion[3:3 + half + 1], "humanml3d", 20.0)),
               ("crop_end", "train", features_key(motion[len(motion) - half:], "humanml3d", 20.0)),
               # the last 55 %: it shares a quarter of itself with the test motion
               ("short_overlap", "train", features_key(whole[frames * 9 // 20:], "humanml3d", 20.0))]
    # a motion of the corpus that is no duplicate: its best overlap with the test motion is far off
    probe = keyset("probe", entries[:1] + [(i, "train", features_key(f, "humanml3d", 20.0))
                                            for i, f in sorted(demo["train"].items())[:40]])
    far = None
    for other in range(1, len(probe)):
        length = probe.offsets[other + 1] - probe.offsets[other]
        offsets = np.arange(-length + 1, probe.offsets[1])
        errors, _ = leaks.overlap_errors(probe, np.full(len(offsets), other), np.zeros(len(offsets), int),
                                         offsets.astype(float), np.zeros(len(offsets), bool))
        if errors.min() > 0.15:
            far = probe.ids[other]
            break
    assert far is not None
    entries.append(("other", "train", features_key(demo["train"][far], "humanml3d", 20.0)))
    report = leaks.find_leaks([keyset("train", entries)])
    assert flagged(report) == {"copy", "mirror", "crop_odd_start", "crop_end"}, report["pairs"]
    kinds = {d["id"]: d["kind"] for d in report["pairs"][0]["duplicates"]}
    assert kinds["mirror"] == "mirror" and kinds["copy"] == "copy"
    assert all(d["error_m"] < leaks.MAX_ERROR_M for d in report["pairs"][0]["duplicates"])


def test_duplicates_across_two_sets_are_reported_per_pair():
    rng = np.random.default_rng(0)
    frames = 120
    t = np.arange(frames) / 20.0
    joints = np.zeros((frames, 6, 3))
    joints[:, :, 1] = [0.9, 1.6, 1.0, 1.0, 0.1, 0.1]
    joints += 0.2 * np.sin(2 * np.pi * rng.uniform(0.3, 1.5, (6, 3)) * t[:, None, None] + rng.uniform(0, 6, (6, 3)))
    joints[:, 0, [0, 2]] = np.stack([0.3 * t, 0.8 * t], 1)
    heading = 0.2 * t
    key = leaks.motion_key(joints, heading, 20.0)
    a = keyset("a", [("m1", "test", key), ("m2", "train", None)])
    b = keyset("b", [("dup_of_m1", "train", key), ("m3", "val", None)])
    report = leaks.find_leaks([a, b])
    counts = {(p["train"], p["against"]): p["count"] for p in report["pairs"]}
    assert counts == {("a", "a"): 0, ("a", "b"): 0, ("b", "a"): 1, ("b", "b"): 0}
    assert report["dropped"] == {"a": [], "b": ["dup_of_m1"]}
    assert report["sets"]["a"]["without_content_keys"] == 1
    assert "b train vs a val/test: 1 duplicate(s), e.g. dup_of_m1 ~ test/m1 (copy, 0.0 cm)" in leaks.report_lines(report)


def test_provenance_overlapping_spans_of_one_file_make_a_duplicate():
    entries = [("t1", "train", None), ("t2", "train", None), ("t3", "train", None), ("t4", "train", None),
               ("e1", "test", None), ("e2", "val", None)]
    provenance = {"t1": ("walk.bvh", 0.0, 10.0), "e1": ("walk.bvh", 8.0, 12.0),  # overlap
                  "t2": ("walk.bvh", 12.0, 20.0),  # touches e1's end: no overlap
                  "t3": ("run.bvh", 0.0, 0.0), "e2": ("run.bvh", 30.0, 31.0),  # 0, 0: the whole file
                  "t4": ("other.bvh", 8.0, 12.0)}
    report = leaks.find_leaks([keyset("train", entries, leaks._provenance(
        {k: {"file": f, "start": s, "end": e} for k, (f, s, e) in provenance.items()}))])
    assert flagged(report) == {"t1", "t3"}
    assert {d["kind"] for d in report["pairs"][0]["duplicates"]} == {"provenance"}


def test_a_layout_without_joints_keeps_ids_and_splits_only(tmp_path):
    from shards.leak_keys import KeyCollector, layout_of

    assert layout_of(263) == "humanml3d" and layout_of(251) == "kitml" and layout_of(12) is None
    collector = KeyCollector(12, 30.0)
    sample = type("Sample", (), {"id": "walk_1", "motion": schema.encode_motion(np.zeros((50, 12), np.float32))})
    collector.add("train", sample, "walk")
    entry = collector.write(tmp_path)
    assert entry["content"] is False
    keys = leaks.load_keys(str(tmp_path), {"leak_keys": entry}, "x")
    assert keys.ids == ["walk_1"] and keys.parents == ["walk"] and keys.offsets.tolist() == [0, 0]


def test_the_plan_leaves_dropped_samples_out_and_is_unchanged_without_drops():
    sizes = (9, 14, 6, 17)
    keys = [[f"s{shard}_{i}" for i in range(size)] for shard, size in enumerate(sizes)]
    source = SourceShards("a", sizes, 0, 1.0)
    plan = dict(seed=3, epoch=1, world_size=2, num_workers=1, batch_size=4)
    assert drop_samples([source], keys, {}) == [source]
    dropped = {"a": ["s0_0", "s1_5", "s1_6", "s3_16", "s2_0", "s2_1", "s2_2", "s2_3", "s2_4", "s2_5"]}
    (kept,) = drop_samples([source], keys, dropped)
    assert kept.num_samples == sum(sizes) - 10
    slots = plan_mixture([kept], **plan)
    read = [keys[seg.shard][p] for slot in slots for seg in slot.segments for p in range(seg.first, seg.stop)]
    assert not set(read) & set(dropped["a"])
    assert len(read) == len(set(read)) == (kept.num_samples // 8) * 8
    # a source of weight 0.5: its half is drawn from the kept samples only
    (half,) = drop_samples([SourceShards("a", sizes, 0, 0.5)], keys, dropped)
    halves = plan_mixture([half], **{**plan, "world_size": 1})
    read = [keys[seg.shard][p] for slot in halves for seg in slot.segments for p in range(seg.first, seg.stop)]
    assert not set(read) & set(dropped["a"])


def test_hygiene_prints_the_report_of_two_real_shard_sets(demo, tmp_path):
    """A second corpus (the `manifest` source) holding a copy and a crop of a demo test motion in
    its train split: found against the demo's test split, named with the pair."""
    test_id = sorted(demo["test"])[1]
    motion = demo["test"][test_id]
    (tmp_path / "m").mkdir()
    np.save(tmp_path / "m" / "copy.npy", motion)
    np.save(tmp_path / "m" / "crop.npy", motion[1:len(motion) // 2 + 30])
    np.save(tmp_path / "m" / "held.npy", motion[::-1].copy())
    lines = [{"id": "planted_copy", "motion": "m/copy.npy", "captions": ["a"], "split": "train", "fps": 20},
             {"id": "planted_crop", "motion": "m/crop.npy", "captions": ["b"], "split": "train", "fps": 20},
             {"id": "reversed", "motion": "m/held.npy", "captions": ["c"], "split": "test", "fps": 20}]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    subprocess.run([sys.executable, "shards/make_shards.py", "manifest", "--file", str(tmp_path / "mine.jsonl"),
                    "--out", str(tmp_path / "mine")], cwd=REPO, check=True, capture_output=True, timeout=120)
    out = subprocess.run([sys.executable, "shards/make_shards.py", "hygiene", demo["dir"], str(tmp_path / "mine"),
                          "--json", str(tmp_path / "report.json")], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    name = demo["dir"].rstrip("/").rsplit("/", 1)[-1]
    assert f"mine train vs {name} val/test: " in out.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    pair = next(p for p in report["pairs"] if (p["train"], p["against"]) == ("mine", name))
    found = {d["id"]: d for d in pair["duplicates"]}
    assert set(found) == {"planted_copy", "planted_crop"}  # (the crop may match a near-identical demo motion first)
    assert found["planted_copy"]["of"] == f"test/{test_id}" and found["planted_copy"]["error_m"] < 0.001
    assert f"{name}: " in out.stdout and "train samples duplicate a val/test sample" in out.stdout
