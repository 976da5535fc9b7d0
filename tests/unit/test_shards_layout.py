"""The humanml3d/kitml converters on tiny corpora built in tmp_path: bad input, accounting,
sub-clips, caption-index splits, mirrors, Mean/Std, the real HumanML3D sample and KIT-ML shape."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from shard_fixtures import REAL_SAMPLE, caption_line, clean_corpus, npy_bytes, random_motion, read_split, skips, write_layout

from rehamot.data import schema
from shards.make_shards import main


def build(root, out, *extra: str, source: str = "humanml3d") -> dict:
    assert main([source, "--root", str(root), "--out", str(out), *extra]) == 0
    return json.loads((out / schema.MANIFEST_NAME).read_text())


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    """Five good motions and one of every kind of bad input, all named by the split files."""
    root = tmp_path_factory.mktemp("bad") / "src"
    rng = np.random.default_rng(1)
    good = {f"g{i}": random_motion(rng, 50 + i) for i in range(5)}
    nan, inf = random_motion(rng, 50), random_motion(rng, 50)
    nan[10, 3] = np.nan
    inf[0, 0] = np.inf
    motions = {
        **good, "b_nan": nan, "b_inf": inf, "b_dim": random_motion(rng, 50, 250),
        "b_short": random_motion(rng, 30), "b_trunc": npy_bytes(random_motion(rng, 50))[:300],
        "b_junk": b"not a numpy file at all",
        "b_pickle": np.array([{"a": 1}, None], dtype=object),
        "b_nocap": random_motion(rng, 50), "b_allempty": random_motion(rng, 50),
        "b_emptyline": random_motion(rng, 50), "b_latin1": random_motion(rng, 50),
        "b_span": random_motion(rng, 50),
    }
    three = "\n".join(caption_line(f"a person moves {k}") for k in range(3)) + "\n"
    captions = {i: three for i in motions if i != "b_nocap"}
    captions["b_allempty"] = "#x/X#0.0#0.0\n   #y/X#0.0#0.0\n"
    captions["b_emptyline"] = caption_line("a person bows") + "\n#empty/X#0.0#0.0\n"
    captions["b_latin1"] = (caption_line("a person nods") + "\n").encode() + \
        "une personne saute\xe9#x/X#0#0\n".encode("latin-1")
    captions["b_span"] = caption_line("a person waves") + "\n" + \
        caption_line("then stops", 2.0, 1.0) + "\n" + caption_line("later", 9.0, 12.0) + "\n"
    train = sorted(motions) + ["g0", "no_file", "bad.id"]  # duplicate, missing motion, bad key
    write_layout(root, motions, captions, {"train": train, "val": ["g4"], "test": ["g3"]})
    lines = {i: len(c.splitlines()) if isinstance(c, str) else 2 for i, c in captions.items()}
    # every caption line of every split entry (g4 and g3 are named twice, in two splits)
    named_captions = sum(lines.get(i, 0) for i in sorted(motions) + ["g4", "g3"])
    out = root.parent / "out"
    manifest = build(root, out)
    return {"root": root, "out": out, "manifest": manifest, "named": len(train) + 2,
            "named_captions": named_captions}


@pytest.mark.parametrize("motion_id, level, reason", [
    ("b_nan", "motion", "non_finite"),
    ("b_inf", "motion", "non_finite"),
    ("b_dim", "motion", "bad_feature_dim"),
    ("b_short", "motion", "too_few_frames"),
    ("b_trunc", "motion", "unreadable_motion"),
    ("b_junk", "motion", "unreadable_motion"),
    ("b_pickle", "motion", "pickled_motion"),
    ("b_nocap", "motion", "missing_caption_file"),
    ("b_allempty", "motion", "no_captions"),
    ("b_allempty:0", "caption", "empty_caption"),
    ("b_allempty:1", "caption", "empty_caption"),
    ("b_emptyline:1", "caption", "empty_caption"),
    ("b_latin1:1", "caption", "bad_encoding"),
    ("b_span:1", "caption", "bad_caption_span"),  # end before start
    ("b_span:2", "caption", "bad_caption_span"),  # beyond the 2.5 s motion
    ("no_file", "motion", "missing_motion"),
    ("g0", "motion", "duplicate_id"),
    ("bad.id", "motion", "bad_id"),
])
def test_bad_input_is_skipped_with_its_reason(bad_corpus, motion_id, level, reason):
    assert skips(bad_corpus["manifest"])[(motion_id, level)] == reason


def test_bad_input_loses_nothing_else(bad_corpus):
    samples = read_split(bad_corpus["out"], "train")
    keys = [s["key"] for s in samples]
    # the good motions, and the partly bad ones with their good captions only
    assert keys == ["b_emptyline", "b_latin1", "b_span", "g0", "g1", "g2", "g3", "g4"]
    by_key = {s["key"]: s for s in samples}
    assert [c["text"] for c in by_key["b_latin1"]["meta"]["captions"]] == ["a person nods"]
    assert [c["text"] for c in by_key["b_emptyline"]["meta"]["captions"]] == ["a person bows"]
    assert by_key["b_span"]["meta"]["source"]["caption_lines"] == [0]
    assert len(bad_corpus["manifest"]["skipped"]) == 18


def test_accounting_written_plus_skipped_equals_named(bad_corpus):
    manifest, out = bad_corpus["manifest"], bad_corpus["out"]
    samples = [s for split in ("train", "val", "test") for s in read_split(out, split)]
    written_ids = {(s["meta"]["split"], s["meta"]["parent_id"]) for s in samples}
    written_captions = sum(len(s["meta"]["captions"]) for s in samples)
    motion_skips = [s for s in manifest["skipped"] if s["level"] == "motion"]
    acc = manifest["accounting"]
    assert acc["motions"] == {"named": bad_corpus["named"], "written": len(written_ids),
                              "skipped": len(motion_skips)}
    assert len(written_ids) + len(motion_skips) == bad_corpus["named"] == 22
    # captions: the file lines of every split entry (a repeated line in one split names none)
    assert acc["captions"]["named"] == bad_corpus["named_captions"]
    assert acc["captions"]["written"] == written_captions == 3 * 7 + 1 + 1 + 1
    assert written_captions + acc["captions"]["skipped"] == bad_corpus["named_captions"]


def test_subclips_are_own_samples_cut_before_the_crop(tmp_path):
    rng = np.random.default_rng(2)
    parent, other = random_motion(rng, 100), random_motion(rng, 90)
    captions = {
        "s00": "\n".join([caption_line("a person walks"),
                          caption_line("then jumps", 1.0, 3.0),  # frames 20..60
                          caption_line("too short", 0.5, 1.0),  # 10 frames
                          caption_line("out of range", 6.0, 8.0),
                          caption_line("long part", 0.25, 5.0)]),  # frames 5..100
        "s01": caption_line("only a part", 0.5, 4.0),  # frames 10..80, no whole clip
    }
    write_layout(tmp_path / "src", {"s00": parent, "s01": other}, captions,
                 {"train": ["s00", "s01"]})
    manifest = build(tmp_path / "src", tmp_path / "out", "--max-frames", "60")
    samples = {s["key"]: s for s in read_split(tmp_path / "out", "train")}
    assert list(samples) == ["s00", "s00_1", "s00_4", "s01_0"]
    expect = {"s00": (0, 60), "s00_1": (20, 60), "s00_4": (5, 65), "s01_0": (10, 70)}
    for key, (first, end) in expect.items():
        source = other if key.startswith("s01") else parent
        np.testing.assert_array_equal(samples[key]["motion"], source[first:end])
        assert samples[key]["meta"]["source"]["crop"] == [first, end]
        assert samples[key]["meta"]["frames"] == end - first
    assert samples["s00_1"]["meta"]["parent_id"] == "s00"
    assert samples["s00_1"]["meta"]["captions"] == [
        {"caption_id": "s00_1:0", "text": "then jumps", "start": 1.0, "end": 3.0}]
    # the whole-clip sample holds only the whole-clip caption
    assert [c["text"] for c in samples["s00"]["meta"]["captions"]] == ["a person walks"]
    assert skips(manifest)[("s00:2", "caption")] == "too_few_frames"
    assert skips(manifest)[("s00:3", "caption")] == "bad_caption_span"
    assert manifest["splits"]["train"]["motions"] == 4
    assert manifest["accounting"]["motions"]["written"] == 2


def test_caption_index_split_files(tmp_path):
    corpus = clean_corpus(tmp_path / "src", n=6)
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    ids = corpus["ids"]
    (split_dir / "train.txt").write_text(f"{ids[0]}:0,2\n{ids[1]}:1,1\n{ids[2]}:7\n{ids[3]}\n")
    (split_dir / "test.txt").write_text(f"{ids[4]}:x,1\n")
    manifest = build(tmp_path / "src", tmp_path / "out", "--split-dir", str(split_dir))
    train = {s["key"]: s["meta"] for s in read_split(tmp_path / "out", "train")}
    assert train[ids[0]]["source"]["caption_lines"] == [0, 2]
    assert [c["text"] for c in train[ids[0]]["captions"]] == [
        f"person {ids[0]} does move 0", f"person {ids[0]} does move 2"]
    assert train[ids[1]]["source"]["caption_lines"] == [1]
    assert train[ids[3]]["source"]["caption_lines"] == [0, 1, 2]
    found = skips(manifest)
    assert found[(f"{ids[1]}:1", "caption")] == "duplicate_id"
    assert found[(f"{ids[2]}:7", "caption")] == "bad_caption_index"
    assert found[(ids[2], "motion")] == "no_captions"
    assert found[(f"{ids[4]}:x", "caption")] == "bad_caption_index"
    assert manifest["accounting"]["captions"] == {
        "named": 2 + 2 + 1 + 3 + 2, "written": 2 + 1 + 3 + 1, "skipped": 3,
        "skipped_individually": 3}
    assert "val" not in manifest["splits"]


def test_mirrors_exclude_and_split_hygiene(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    rng = np.random.default_rng(3)
    ids = ["000001", "M000001", "000002", "000003", "000004"]
    captions = {i: caption_line(f"a person does thing {i}") for i in ids}
    captions["000004"] = caption_line("A person  walks") + "\n" + caption_line("x y")
    captions["000003"] = caption_line("a person walks")
    write_layout(tmp_path / "src", {i: random_motion(rng, 45) for i in ids}, captions,
                 {"train": ["000001", "000002", "000003"], "val": ["000002"],
                  "test": ["M000001", "000004"]})
    manifest = build(tmp_path / "src", tmp_path / "out")
    hygiene = manifest["hygiene"]
    assert hygiene["ids_in_several_splits"] == {"count": 1, "examples": ["000002 (train, val)"]}
    assert hygiene["mirror_across_splits"]["count"] == 1
    assert hygiene["train_test_identical_captions"] == {"count": 1,
                                                        "examples": ['"a person walks"']}
    assert hygiene["val_equals_test"] is False
    printed = capsys.readouterr().out
    assert "1 ids whose M-mirror lies in another split" in printed
    assert "1 caption texts in both train and test" in printed

    manifest = build(tmp_path / "src", tmp_path / "out2", "--mirrors", "exclude")
    assert skips(manifest)[("M000001", "motion")] == "mirror_excluded"
    assert [s["key"] for s in read_split(tmp_path / "out2", "test")] == ["000004"]


def test_val_equal_to_test_is_refused(tmp_path, capsys):
    corpus = clean_corpus(tmp_path / "src", n=8)
    (tmp_path / "src" / "val.txt").write_text((tmp_path / "src" / "test.txt").read_text())
    args = ["humanml3d", "--root", str(tmp_path / "src"), "--out", str(tmp_path / "out")]
    assert main(args) == 1
    assert "--allow-val-equals-test" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main([*args, "--allow-val-equals-test"]) == 0
    manifest = json.loads((tmp_path / "out" / schema.MANIFEST_NAME).read_text())
    assert manifest["hygiene"]["val_equals_test"] is True
    assert manifest["splits"]["val"]["motions"] == len(corpus["splits"]["test"])


def test_mean_std_computed_on_train_with_floor(tmp_path):
    rng = np.random.default_rng(4)
    motions = {f"m{i}": random_motion(rng, 40 + 10 * i) for i in range(3)}
    motions["m0"][:, 7] = 5.0  # a constant channel everywhere
    motions["m1"][:, 7] = 5.0
    motions["t0"] = random_motion(rng, 50) + 100.0  # test data must not leak into the stats
    write_layout(tmp_path / "src", motions, {i: caption_line("a person moves") for i in motions},
                 {"train": ["m0", "m1"], "test": ["t0", "m2"]})
    manifest = build(tmp_path / "src", tmp_path / "out")
    train = np.concatenate([motions["m0"], motions["m1"]]).astype(np.float64)
    assert manifest["mean_std_source"] == "computed:train"
    np.testing.assert_allclose(manifest["mean"], train.mean(0), rtol=1e-6, atol=1e-6)
    std = np.maximum(train.std(0), schema.STD_FLOOR)
    np.testing.assert_allclose(manifest["std"], std, rtol=1e-5)
    assert manifest["std"][7] == pytest.approx(schema.STD_FLOOR)


@pytest.mark.skipif(not REAL_SAMPLE.is_dir(), reason="the shared HumanML3D sample is not beside this checkout "
                                                     "(../shared/fixtures/humanml3d-sample)")
def test_real_humanml3d_sample_round_trips(tmp_path):
    """The one real motion (012314) and the real Mean/Std; the caption is ours (the public
    repository has no caption file for it)."""
    root = tmp_path / "HumanML3D"
    (root / "new_joint_vecs").mkdir(parents=True)
    shutil.copy(REAL_SAMPLE / "new_joint_vecs" / "012314.npy", root / "new_joint_vecs")
    for name in ("Mean.npy", "Std.npy"):
        shutil.copy(REAL_SAMPLE / name, root)
    write_layout(root, {}, {"012314": caption_line("a person walks forward and turns") + "\n"},
                 {"train": [], "val": [], "test": ["012314"]})
    manifest = build(root, tmp_path / "out")
    original = np.load(REAL_SAMPLE / "new_joint_vecs" / "012314.npy", allow_pickle=False)
    (sample,) = read_split(tmp_path / "out", "test")
    assert original.shape == (170, 263) and sample["motion"].dtype == np.float32
    assert sample["motion"].tobytes() == original.tobytes()
    assert sample["motion_bytes"] == schema.encode_motion(original)
    assert sample["meta"]["source"] == {"corpus": "humanml3d", "file": "new_joint_vecs/012314.npy",
                                        "crop": [0, 170], "caption_lines": [0]}
    assert manifest["mean_std_source"] == "corpus"
    mean = np.load(REAL_SAMPLE / "Mean.npy")
    assert np.asarray(manifest["mean"], dtype=np.float32).tobytes() == mean.tobytes()
    assert np.asarray(manifest["std"], dtype=np.float32).tobytes() == \
        np.load(REAL_SAMPLE / "Std.npy").tobytes()  # its minimum (0.0128) is above the floor
    assert main(["verify", str(tmp_path / "out")]) == 0


def test_kitml_shape_fixture(tmp_path):
    rng = np.random.default_rng(5)
    motions = {f"{i:05d}": random_motion(rng, 30 + 5 * i, 251) for i in range(4)}
    motions["00009"] = random_motion(rng, 40, 263)  # a HumanML3D motion in a KIT corpus
    captions = {i: caption_line(f"a person does kit move {i}") for i in motions}
    captions["00003"] += "\n" + caption_line("the middle part", 1.0, 3.0)  # 13..38 at 12.5 fps
    write_layout(tmp_path / "src", motions, captions,
                 {"train": sorted(motions)[:3], "test": ["00003", "00009"]})
    manifest = build(tmp_path / "src", tmp_path / "out", source="kitml")
    assert (manifest["feature_dim"], manifest["fps"]) == (251, 12.5)
    assert manifest["converter"]["args"]["min_frames"] == 24
    assert skips(manifest)[("00009", "motion")] == "bad_feature_dim"
    test = {s["key"]: s for s in read_split(tmp_path / "out", "test")}
    assert list(test) == ["00003", "00003_1"]
    assert test["00003_1"]["meta"]["source"]["crop"] == [13, 38]  # 12.5 rounds half up
    np.testing.assert_array_equal(test["00003_1"]["motion"], motions["00003"][13:38])
    assert all(s["motion"].shape[1] == 251 for s in read_split(tmp_path / "out", "train"))
    assert test["00003"]["meta"]["fps"] == 12.5
