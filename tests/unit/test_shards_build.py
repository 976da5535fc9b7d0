"""Whole builds: determinism across runs and worker counts, verify, atomic overwrite, errors."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from shard_fixtures import REPO_ROOT, SCRIPT, caption_line, clean_corpus, random_motion, read_split, write_layout

from rehamot.data import schema
from shards.make_shards import main


def tree_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def run_script(*args: str, limit_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:  # a real "disk full" for any file above the limit (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=limit if limit_file_bytes else None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """30 motions; some with sub-clips so that one task yields several samples."""
    root = tmp_path_factory.mktemp("det") / "src"
    clean_corpus(root, n=30, seed=7)
    for k in (3, 11, 28):
        path = root / "texts" / f"{k:06d}.txt"
        path.write_text(path.read_text() + caption_line(f"part of {k}", 0.1, 2.2) + "\n")
    return root


@pytest.mark.slow  # a real subprocess of the script
def test_builds_are_byte_identical_for_any_worker_count(corpus, tmp_path):
    common = ["--root", str(corpus), "--shard-mb", "0.3"]
    assert main(["humanml3d", *common, "--out", str(tmp_path / "a"), "--workers", "1"]) == 0
    proc = run_script("humanml3d", *common, "--out", str(tmp_path / "b"), "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    a, b = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    assert a == b
    manifest = json.loads(a["manifest.json"])
    assert len(manifest["splits"]["train"]["shards"]) >= 3  # boundaries were exercised
    keys = [s["key"] for s in read_split(tmp_path / "a", "train")]
    assert keys == sorted(keys) and "000003_3" in keys and len(keys) == 20 + 2
    with tarfile.open(tmp_path / "a" / "train-000000.tar") as tar:
        members = tar.getmembers()
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {
        (0, 0, 0, "rehamot", 0o444)}
    assert [m.name for m in members[:2]] == ["000000.json", "000000.motion.npy"]
    assert "train" in proc.stdout and "split hygiene: clean" in proc.stdout


def test_float16_option(corpus, tmp_path):
    assert main(["humanml3d", "--root", str(corpus), "--out", str(tmp_path / "h"),
                 "--dtype", "float16"]) == 0
    samples = read_split(tmp_path / "h", "val")
    assert samples and all(s["motion"].dtype == np.float16 for s in samples)
    assert main(["verify", str(tmp_path / "h")]) == 0


def test_verify_catches_truncated_and_altered_shards(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["humanml3d", "--root", str(corpus), "--out", str(out), "--shard-mb", "0.3"]) == 0
    assert main(["verify", str(out)]) == 0
    shard = out / "train-000001.tar"
    original = shard.read_bytes()

    shard.write_bytes(original[: len(original) // 2])
    assert main(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert "train-000001.tar: sha256" in err and "cut short" in err

    altered = bytearray(original)
    altered[2000] ^= 0x01  # inside the first sample's data: tar structure intact
    shard.write_bytes(bytes(altered))
    assert main(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert "train-000001.tar: sha256" in err and "unreadable" not in err

    shard.write_bytes(original)
    (out / "train-000099.tar").write_bytes(original)  # a shard from some other build
    assert main(["verify", str(out)]) == 1
    assert "train-000099.tar: a tar the manifest does not list" in capsys.readouterr().err


@pytest.mark.slow  # a real subprocess of the script
def test_overwrite_is_atomic_when_the_build_fails_midway(corpus, tmp_path):
    out = tmp_path / "out"
    assert main(["humanml3d", "--root", str(corpus), "--out", str(out), "--shard-mb", "0.3"]) == 0
    before = tree_bytes(out)

    assert main(["humanml3d", "--root", str(corpus), "--out", str(out)]) == 1  # no --overwrite
    # 1.5 MB train shards cannot be written under a 1 MB file-size limit: it fails midway
    proc = run_script("humanml3d", "--root", str(corpus), "--out", str(out), "--overwrite",
                      "--shard-mb", "16", limit_file_bytes=1 << 20)
    assert proc.returncode == 1
    assert "left as it was" in proc.stderr
    assert tree_bytes(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind

    other = tmp_path.parent / f"{tmp_path.name}-other"
    clean_corpus(other, n=6, seed=9)
    assert main(["humanml3d", "--root", str(other), "--out", str(out), "--overwrite"]) == 0
    manifest = json.loads((out / schema.MANIFEST_NAME).read_text())
    listed = {s[k] for e in manifest["splits"].values() for s in e["shards"] for k in ("path", "index")}
    listed.add(manifest["leak_keys"]["path"])
    assert {p.name for p in out.iterdir()} == listed | {"manifest.json"}  # no old shard or index left
    assert manifest["accounting"]["motions"]["named"] == 6
    assert main(["verify", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_missing_root_and_empty_corpus_fail_with_advice(tmp_path, capsys):
    assert main(["humanml3d", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "does not exist: pass --root" in capsys.readouterr().err
    write_layout(tmp_path / "empty", {}, {}, {"train": [], "val": [], "test": []})
    assert main(["humanml3d", "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 1
    assert "corpus is empty" in capsys.readouterr().err
    (tmp_path / "empty" / "train.txt").unlink()
    (tmp_path / "empty" / "val.txt").unlink()
    (tmp_path / "empty" / "test.txt").unlink()
    assert main(["humanml3d", "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 1
    assert "no split files" in capsys.readouterr().err
    # everything skipped is an empty corpus too
    rng = np.random.default_rng(0)
    write_layout(tmp_path / "bad", {"a": random_motion(rng, 50, 10)}, {"a": caption_line("x")},
                 {"train": ["a"]})
    assert main(["humanml3d", "--root", str(tmp_path / "bad"), "--out", str(tmp_path / "o")]) == 1
    assert "1 bad_feature_dim" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert main(["verify", str(tmp_path / "nope")]) == 1
    assert "build shards first" in capsys.readouterr().err


def test_summary_prints_tables(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["humanml3d", "--root", str(corpus), "--out", str(tmp_path / "s")]) == 0
    capsys.readouterr()
    assert main(["summary", str(tmp_path / "s")]) == 0
    printed = capsys.readouterr().out
    assert "motions named 30 = written 30 + skipped 0" in printed
    assert "captions named 93 = written 93 + skipped 0" in printed
    assert "33 samples" in printed and "│ train │" in printed


def test_demo_command(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--motions", "40", "--out", str(out), "--seed", "3"]) == 0
    manifest = json.loads((out / schema.MANIFEST_NAME).read_text())
    assert manifest["corpus"] == "demo" and manifest["feature_dim"] == 263
    assert manifest["converter"]["args"]["root"] == "source"
    assert (out / "source" / "new_joint_vecs").is_dir()
    assert manifest["accounting"]["motions"]["named"] == 40
    assert main(["verify", str(out)]) == 0


def test_the_summary_warns_about_a_split_without_samples():
    from shards.report import empty_split_lines

    manifest = {"splits": {"train": {"motions": 5}, "test": {"motions": 0}}}
    lines = empty_split_lines(manifest)
    assert [line.split("'")[1] for line in lines] == ["val", "test"]
    assert "training refuses to start while data.val_split names it" in lines[0]
    assert empty_split_lines({"splits": {s: {"motions": 1} for s in ("train", "val", "test")}}) == []
