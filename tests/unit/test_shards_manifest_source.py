"""The `manifest` source: a JSONL corpus of your own, mixed frame rates, bad records."""
from __future__ import annotations

import json

import numpy as np
import pytest
from shard_fixtures import random_motion, read_split, skips

from rehamot.data import schema
from shards.make_shards import main


def write_jsonl(folder, records: list) -> str:
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in records]
    path = folder / "corpus.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def save(folder, name: str, motion: np.ndarray) -> str:
    (folder / "motions").mkdir(exist_ok=True)
    np.save(folder / "motions" / f"{name}.npy", motion)
    return f"motions/{name}.npy"


def record(motion_id, motion, split="train", fps=30, captions=("a person walks",)):
    return {"id": motion_id, "motion": motion, "captions": list(captions), "split": split,
            "fps": fps}


def test_jsonl_corpus_with_subclips(tmp_path):
    rng = np.random.default_rng(0)
    walk = random_motion(rng, 90, 12)
    records = [
        record("walk", save(tmp_path, "walk", walk),
               captions=["a person walks", {"text": "then turns", "start": 1.0, "end": 2.5},
                         {"text": "the whole walk"}]),
        record("jump", save(tmp_path, "jump", random_motion(rng, 60, 12)), split="test"),
    ]
    out = tmp_path / "out"
    assert main(["manifest", "--file", write_jsonl(tmp_path, records), "--out", str(out)]) == 0
    manifest = json.loads((out / schema.MANIFEST_NAME).read_text())
    assert (manifest["feature_dim"], manifest["fps"], manifest["corpus"]) == (12, 30.0, "corpus")
    train = {s["key"]: s for s in read_split(out, "train")}
    assert list(train) == ["walk", "walk_1"]
    assert [c["text"] for c in train["walk"]["meta"]["captions"]] == ["a person walks",
                                                                     "the whole walk"]
    np.testing.assert_array_equal(train["walk_1"]["motion"], walk[30:75])
    assert train["walk_1"]["meta"]["source"] == {"corpus": "corpus", "file": "motions/walk.npy",
                                                 "crop": [30, 75], "caption_lines": [1]}
    assert [s["key"] for s in read_split(out, "test")] == ["jump"]


def test_mixed_fps_is_an_error_without_resampling(tmp_path, capsys):
    rng = np.random.default_rng(1)
    records = [record("a", save(tmp_path, "a", random_motion(rng, 60, 8)), fps=20),
               record("b", save(tmp_path, "b", random_motion(rng, 90, 8)), fps=30)]
    path = write_jsonl(tmp_path, records)
    assert main(["manifest", "--file", path, "--out", str(tmp_path / "out")]) == 1
    assert "mixes frame rates [20.0, 30.0]; pass --fps" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fps_option_resamples_linearly(tmp_path):
    # channel 0 holds the time in seconds: after resampling frame j must hold j / 20
    fast = np.repeat((np.arange(160) / 40.0)[:, None], 4, axis=1).astype(np.float32)
    fast[:, 1] = np.sin(np.arange(160) / 7.0)
    on_rate = random_motion(np.random.default_rng(2), 50, 4)
    records = [record("fast", save(tmp_path, "fast", fast), fps=40,
                      captions=["runs", {"text": "part", "start": 1.0, "end": 3.5}]),
               record("slow", save(tmp_path, "slow", on_rate), fps=20)]
    out = tmp_path / "out"
    assert main(["manifest", "--file", write_jsonl(tmp_path, records), "--out", str(out),
                 "--fps", "20"]) == 0
    manifest = json.loads((out / schema.MANIFEST_NAME).read_text())
    assert manifest["fps"] == 20.0
    samples = {s["key"]: s for s in read_split(out, "train")}
    resampled = samples["fast"]["motion"]
    assert resampled.shape == (80, 4)
    np.testing.assert_allclose(resampled[:, 0], np.arange(80) / 20.0, atol=1e-6)
    np.testing.assert_allclose(resampled[:, 1], np.sin(np.arange(80) * 2 / 7.0), atol=1e-6)
    assert samples["fast_1"]["meta"]["source"]["crop"] == [20, 70]
    np.testing.assert_allclose(samples["fast_1"]["motion"][:, 0], np.arange(20, 70) / 20.0,
                               atol=1e-6)
    assert samples["slow"]["motion"].tobytes() == on_rate.tobytes()  # on-rate: untouched
    assert samples["fast"]["meta"]["fps"] == 20.0


def test_bad_records_are_skipped_and_accounted(tmp_path):
    rng = np.random.default_rng(3)
    good = save(tmp_path, "good", random_motion(rng, 50, 6))
    records = [
        record("good", good, captions=["fine", "", {"text": "odd", "start": 3, "end": 1},
                                       {"words": "no text"}, "\ud800 lone surrogate"]),
        b"{not json",
        b'{"id": "caf\xe9", "motion": "x"}',
        {"id": "nokeys"},
        record("bad.id", good),
        record("good", good, split="test"),  # the same id again
        record("lost", "motions/lost.npy"),
        record("nocaps", good, captions=[]),
        record("neg", good, fps=-1),
        record("wide", save(tmp_path, "wide", random_motion(rng, 50, 7))),
    ]
    out = tmp_path / "out"
    assert main(["manifest", "--file", write_jsonl(tmp_path, records), "--out", str(out)]) == 0
    manifest = json.loads((out / schema.MANIFEST_NAME).read_text())
    assert skips(manifest) == {
        ("good:1", "caption"): "empty_caption", ("good:2", "caption"): "bad_caption_span",
        ("good:3", "caption"): "bad_record", ("good:4", "caption"): "bad_encoding",
        ("line:2", "motion"): "bad_record", ("line:3", "motion"): "bad_encoding",
        ("line:4", "motion"): "bad_record", ("bad.id", "motion"): "bad_id",
        ("good", "motion"): "duplicate_id", ("lost", "motion"): "missing_motion",
        ("nocaps", "motion"): "no_captions", ("neg", "motion"): "bad_fps",
        ("wide", "motion"): "bad_feature_dim",
    }
    assert manifest["feature_dim"] == 6  # the most common width wins
    assert manifest["accounting"]["motions"] == {"named": 10, "written": 1, "skipped": 9}
    assert manifest["accounting"]["captions"] == {"named": 5 + 1 + 0 + 1, "written": 1,
                                                  "skipped": 6, "skipped_individually": 4}
    assert manifest["hygiene"]["ids_in_several_splits"]["examples"] == ["good (test, train)"]
    (sample,) = read_split(out, "train")
    assert [c["text"] for c in sample["meta"]["captions"]] == ["fine"]


@pytest.mark.parametrize("content", [b"", b"\n\n"])
def test_empty_jsonl_is_an_error(tmp_path, capsys, content):
    (tmp_path / "c.jsonl").write_bytes(content)
    assert main(["manifest", "--file", str(tmp_path / "c.jsonl"), "--out",
                 str(tmp_path / "o")]) == 1
    assert "corpus is empty" in capsys.readouterr().err
    assert main(["manifest", "--file", str(tmp_path / "none.jsonl"), "--out",
                 str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err
