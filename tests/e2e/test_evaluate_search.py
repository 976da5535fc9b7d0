"""Evaluation protocols, figures and search on one tiny trained run (real shards, real processes)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY_RUN, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

TINY = [*TINY_RUN]
THRESHOLD_PROTOCOL = "tmr-threshold(MiniLM)"


def py(script: str, *args: str, check: bool = True):
    return run_cli([sys.executable, script, *args], check=check)


@pytest.fixture(scope="module")
def run_dir(demo_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "run"
    py("rehamot/train.py", "configs/demo.yaml", *TINY, f"data.shards={demo_shards}", f"run.dir={out}",
       "train.max_steps=4", "train.val_every=4", "train.save_every=100")
    return out


@pytest.fixture(scope="module")
def evaluated(run_dir) -> dict:
    proc = py("rehamot/evaluate.py", str(run_dir), "--protocol", "every")
    return {"stdout": proc.stdout, "json": json.loads((run_dir / "eval-test.json").read_text())}


@pytest.fixture(scope="module")
def indexed(run_dir) -> Path:
    proc = py("rehamot/search.py", "index", str(run_dir))
    assert "31 motions" in proc.stdout
    return run_dir / "index"


def test_every_protocol_is_written_and_printed(evaluated):
    result = evaluated["json"]
    assert result["split"] == "test" and result["motions"] == 31  # the demo's 300 -> 31 test motions
    assert list(result["protocols"]) == ["captions", "tmr-all", THRESHOLD_PROTOCOL]
    # 31 motions < 32: no small gallery; the demo corpus has no nsim list. Skipped, with reasons.
    assert set(result["skipped"]) == {"tmr-nsim", "tmr-batch32"}
    assert "needs at least 32 motions, this split has 31" in result["skipped"]["tmr-batch32"]
    assert "note: tmr-batch32 skipped" in evaluated["stdout"]
    assert "note: tmr-nsim skipped" in evaluated["stdout"]
    assert THRESHOLD_PROTOCOL in evaluated["stdout"] and "motion→text" in evaluated["stdout"]
    protocols = result["protocols"]
    assert set(protocols["tmr-all"]) == {f"{d}/{m}" for d in ("t2m", "m2t")
                                         for m in ("R@1", "R@2", "R@3", "R@5", "R@10", "MedR")}
    # the threshold rule only adds correct items: recall can only go up, MedR only down
    for key, value in protocols["tmr-all"].items():
        relaxed = protocols[THRESHOLD_PROTOCOL][key]
        assert relaxed <= value if key.endswith("MedR") else relaxed >= value, key


def test_figures_are_real_pngs(evaluated, run_dir):
    import matplotlib.image as mpimg

    for name in ("retrieval_examples-test.png", "rank_histograms-test.png"):
        image = mpimg.imread(run_dir / name)
        assert image.shape[0] > 200 and image.shape[1] > 600, name
        assert image[..., :3].std() > 0.05, name  # not a blank canvas


def test_evaluation_matches_the_index_embeddings(evaluated, indexed, run_dir, demo_shards):
    """The numbers in eval-test.json follow from the stored embeddings under the metric
    definitions, sentence embeddings included (recomputed here with the packaged MiniLM)."""
    import torch

    from rehamot.data import EvalSet
    from rehamot.data.pipeline import DataConfig
    from rehamot.evaluation.retrieval_eval import encode_sentences
    from rehamot.evaluation.retrieval_metrics import evaluate_protocols

    meta = json.loads((indexed / "index.json").read_text())
    motion_emb = np.load(indexed / "motion_emb.npy", allow_pickle=False)
    caption_emb = np.load(indexed / "caption_emb.npy", allow_pickle=False)
    owners = np.repeat(np.arange(len(meta["motions"])), [len(m["captions"]) for m in meta["motions"]])
    eval_set = EvalSet(DataConfig(shards=str(demo_shards), split="test"))
    assert [m["id"] for m in meta["motions"]] == eval_set.ids
    sentences = encode_sentences(eval_set, torch.device("cpu"))
    assert sentences.shape == (91, 384)
    np.testing.assert_allclose(np.linalg.norm(sentences, axis=1), 1.0, atol=1e-5)
    expected = evaluate_protocols(motion_emb, caption_emb, owners, eval_set.ids,
                                  protocols=("captions", "tmr-all", "tmr-threshold"),
                                  sentence_emb=sentences, sentence_model_name="MiniLM")
    for protocol, metrics in expected.items():
        for key, value in metrics.items():
            assert evaluated["json"]["protocols"][protocol][key] == pytest.approx(value, abs=1e-6), (protocol, key)


def test_batch32_on_a_split_large_enough_and_refused_when_asked_for_on_a_small_one(run_dir, capsys):
    from rehamot.evaluate import main

    assert main([str(run_dir), "--split", "train", "--protocol", "tmr-batch32", "--no-figures"]) == 0
    result = json.loads((run_dir / "eval-train.json").read_text())
    metrics = result["protocols"]["tmr-batch32"]
    assert result["motions"] == 251  # 7 galleries of 32
    for direction in ("t2m", "m2t"):
        recalls = [metrics[f"{direction}/R@{k}"] for k in (1, 2, 3, 5, 10)]
        assert recalls == sorted(recalls) and 0 <= recalls[0] and recalls[-1] <= 100
        assert 1 <= metrics[f"{direction}/MedR"] <= 32

    capsys.readouterr()
    assert main([str(run_dir), "--protocol", "tmr-batch32"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "evaluate: protocol tmr-batch32: needs at least 32 motions, this split has 31"]


def test_nsim_from_an_id_file(run_dir, indexed, tmp_path, capsys):
    """tmr-nsim on a user's id list equals TMR's metrics on that subset (first captions)."""
    from rehamot.evaluate import main
    from rehamot.evaluation.retrieval_metrics import tmr_metrics

    meta = json.loads((indexed / "index.json").read_text())
    motion_emb = np.load(indexed / "motion_emb.npy")
    caption_emb = np.load(indexed / "caption_emb.npy")
    first = np.cumsum([0] + [len(m["captions"]) for m in meta["motions"]])[:-1]
    subset = np.arange(0, 31, 3)  # 11 of the 31 test motions
    ids = tmp_path / "nsim.txt"
    ids.write_text("\n".join(meta["motions"][i]["id"] for i in subset) + "\n")
    # (rewrites eval-test.json; the `evaluated` fixture already holds the `every` result)
    assert main([str(run_dir), "--protocol", "tmr-nsim", "--nsim", str(ids), "--no-figures"]) == 0
    got = json.loads((run_dir / "eval-test.json").read_text())["protocols"]["tmr-nsim"]
    expected = tmr_metrics(caption_emb[first[subset]] @ motion_emb[subset].T)
    assert got == pytest.approx(expected, abs=1e-6)

    ids.write_text("000015\nnot-a-test-id\n")
    capsys.readouterr()
    assert main([str(run_dir), "--protocol", "tmr-nsim", "--nsim", str(ids)]) == 2
    err = capsys.readouterr().err
    assert "1 ids of the" in err and "not in this split" in err and len(err.strip().splitlines()) == 1


def test_plan_protocols_skips_only_under_every():
    from rehamot.evaluation.retrieval_eval import plan_protocols

    small, large = [f"{i:03d}" for i in range(31)], [f"{i:03d}" for i in range(32)]
    runs, skipped = plan_protocols("every", small, None)
    assert runs == ["captions", "tmr-all", "tmr-threshold"] and set(skipped) == {"tmr-nsim", "tmr-batch32"}
    runs, skipped = plan_protocols("every", large, None)
    assert "tmr-batch32" in runs and set(skipped) == {"tmr-nsim"}
    assert plan_protocols("tmr-batch32", large, None) == (["tmr-batch32"], {})
    with pytest.raises(ValueError, match="no nsim id list"):
        plan_protocols("tmr-nsim", large, None)
    with pytest.raises(ValueError, match="100 ids of the humanml3d nsim list are not in this split"):
        plan_protocols("tmr-nsim", large, "humanml3d")
    assert plan_protocols("captions,tmr-all,tmr-batch32", large, None) == (["captions", "tmr-all", "tmr-batch32"], {})
    with pytest.raises(ValueError, match="tmr-batch32: needs at least 32"):
        plan_protocols("captions,tmr-batch32", small, None)
    with pytest.raises(ValueError, match=r"unknown protocol\(s\) tmr-al:"):
        plan_protocols("captions,tmr-al", large, None)


def test_search_cli_both_ways(indexed, run_dir):
    meta = json.loads((indexed / "index.json").read_text())
    assert meta["split"] == "test" and meta["num_captions"] == 91 and meta["dim"] == 64
    assert meta["text_model"]["digest"] == json.loads((run_dir / "best" / "bundle.json").read_text())["text_model"]["digest"]
    emb = np.load(indexed / "motion_emb.npy", mmap_mode="r")
    assert emb.dtype == np.float32 and emb.shape == (31, 64) and isinstance(emb, np.memmap)

    out = py("rehamot/search.py", "query", str(run_dir), "a person jumps twice", "--top-k", "3")
    rows = [cells for cells in (line.split("│")[1:-1] for line in out.stdout.splitlines())
            if cells and cells[0].strip().isdigit()]  # rich rows that start a hit (rank cell)
    assert [int(cells[0]) for cells in rows] == [1, 2, 3]
    assert {cells[1].strip() for cells in rows} <= {m["id"] for m in meta["motions"]}

    motion = meta["motions"][0]
    out = py("rehamot/search.py", "query", str(run_dir), "--motion", motion["id"], "--top-k", str(91))
    own_rows = [line for line in out.stdout.splitlines() if line.startswith("│") and "✓" in line]
    assert len(own_rows) == len(motion["captions"])  # all 91 captions listed, its own ones marked


def test_python_api_matches_brute_force(indexed, run_dir):
    from rehamot.retrieval.index import SearchIndex

    index = SearchIndex.load(run_dir)
    motion_emb = np.load(indexed / "motion_emb.npy")
    caption_emb = np.load(indexed / "caption_emb.npy")
    query = index.encode_text("someone walks forward and then turns left")
    np.testing.assert_allclose(np.linalg.norm(query), 1.0, atol=1e-5)
    hits = index.query_text("someone walks forward and then turns left", k=5)
    scores = motion_emb @ query
    expected = np.argsort(-scores, kind="stable")[:5]
    assert [h.motion_id for h in hits] == [index.motion_ids[i] for i in expected]
    np.testing.assert_allclose([h.score for h in hits], scores[expected], rtol=1e-5)

    target = index.motion_ids[7]
    caption_hits = index.query_motion(target, k=10)
    scores = caption_emb @ motion_emb[7]
    expected = np.argsort(-scores, kind="stable")[:10]
    assert [h.caption_id for h in caption_hits] == [index.caption_ids[i] for i in expected]
    assert [h.own for h in caption_hits] == [index.caption_ids[i].startswith(f"{target}:") for i in expected]


def test_top_k_breaks_ties_like_a_stable_sort():
    from rehamot.retrieval.index import top_k

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=200).astype(np.float32)  # many ties, at the cut too
    for k in (1, 5, 37, 200, 500):
        assert top_k(scores, k).tolist() == np.argsort(-scores, kind="stable")[:k].tolist()


def test_search_errors_are_one_line(indexed, run_dir, tmp_path):
    from rehamot.retrieval.index import SearchError, SearchIndex

    index = SearchIndex.load(run_dir)
    with pytest.raises(SearchError, match="empty query"):
        index.query_text("   ")
    with pytest.raises(SearchError, match="unknown motion id 'nope'"):
        index.query_motion("nope")
    stale = SearchIndex(index.motion_emb, index.caption_emb, index.meta["motions"],
                        {**index.meta, "weights_sha256": "0" * 64}, bundle_dir=run_dir / "best")
    with pytest.raises(SearchError, match="rebuild it"):
        stale.query_text("a jump")
    for args, message in (
        (["query", str(run_dir), ""], "search: empty query"),
        (["query", str(run_dir), "--motion", "nope"], "search: unknown motion id 'nope'"),
        (["query", str(tmp_path), "a jump"], "search: no search index in"),
    ):
        out = py("rehamot/search.py", *args, check=False)
        assert out.returncode == 2, args
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), out.stderr
    import os
    import subprocess

    latin1 = subprocess.run([sys.executable, "rehamot/search.py", "query", str(run_dir), b"caf\xe9 jump"],
                            cwd=REPO, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert latin1.returncode == 2
    assert latin1.stderr.decode().strip().splitlines() == ["search: the query is not valid UTF-8 text"]


# --------------------------------------------------------------------------- motions as queries


def shard_features(shards: Path, motion_id: str) -> np.ndarray:
    """The raw features of one test motion as sharded (what a user's motion file holds)."""
    from rehamot.data.reading import read_raw_motions

    for found in read_raw_motions(str(shards), "test", [motion_id]).values():
        return found
    raise AssertionError(f"{motion_id} is not in the test split")


def test_the_index_stores_every_motions_full_joints(indexed, demo_shards):
    from rehamot.motion.kinematics import features_to_joints

    meta = json.loads((indexed / "index.json").read_text())
    assert meta["format"] == "rehamot-index/2" and meta["layout"] == "humanml3d" and meta["fps"] == 20.0
    joints = np.load(indexed / "joints.npy", mmap_mode="r")
    offsets = np.cumsum([0] + [m["frames"] for m in meta["motions"]])
    assert joints.dtype == np.float32 and joints.shape == (offsets[-1], 22, 3)
    for i in (0, 13, 30):
        features = shard_features(demo_shards, meta["motions"][i]["id"])
        np.testing.assert_allclose(joints[offsets[i]:offsets[i + 1]], features_to_joints(features), atol=1e-5)


def test_a_motion_file_is_encoded_as_the_index_encodes_its_motions(indexed, run_dir, demo_shards):
    """Bundle Mean/Std and the evaluation crop: a motion's file gives the index's embedding."""
    from rehamot.retrieval.index import SearchIndex

    index = SearchIndex.load(run_dir)
    for i in (0, 7, 30):
        features = shard_features(demo_shards, index.motion_ids[i])
        np.testing.assert_allclose(index.encode_motion(features), index.motion_emb[i], atol=1e-5)
    # only the first max_len (196) frames count
    longer = np.concatenate([features] * 3)[:250]
    np.testing.assert_allclose(index.encode_motion(longer), index.encode_motion(longer[:196]), atol=1e-6)
    assert index.query_motion_features(features, k=1).motions[0].motion_id == index.motion_ids[30]


def test_query_by_motion_file_and_by_id_as_json(indexed, run_dir, demo_shards, tmp_path):
    meta = json.loads((indexed / "index.json").read_text())
    motion_id = meta["motions"][7]["id"]
    features = shard_features(demo_shards, motion_id)
    path = tmp_path / "mine.npy"
    np.save(path, features)
    by_file = json.loads(py("rehamot/search.py", "query", str(run_dir), "--motion-file", str(path), "--top-k", "4",
                            "--json").stdout)
    by_id = json.loads(py("rehamot/search.py", "query", str(run_dir), "--motion", motion_id, "--top-k", "3",
                          "--json").stdout)
    assert by_file["query"] == {"motion_file": str(path), "frames": len(features)}
    assert by_id["query"] == {"motion_id": motion_id}
    # the file finds its own motion first; after it, the id query's "more like this" (itself left out)
    assert by_file["motions"][0]["motion_id"] == motion_id and by_file["motions"][0]["score"] == pytest.approx(1, abs=1e-5)
    assert [h["motion_id"] for h in by_file["motions"][1:]] == [h["motion_id"] for h in by_id["motions"]]
    assert [h["caption_id"] for h in by_file["captions"][:3]] == [h["caption_id"] for h in by_id["captions"]]
    assert [h["rank"] for h in by_id["motions"]] == [1, 2, 3]
    assert set(by_id["motions"][0]) == {"rank", "motion_id", "score", "captions"}
    assert set(by_id["captions"][0]) == {"rank", "caption_id", "motion_id", "text", "score"}

    out = py("rehamot/search.py", "query", str(run_dir), "--motion-file", str(path), "--top-k", "2")
    assert "motion → text" in out.stdout and "more like" in out.stdout and motion_id in out.stdout


def test_bad_motion_files_are_one_line_errors(indexed, run_dir, tmp_path):
    nan = np.zeros((20, 263), np.float32)
    nan[3, 5] = np.nan
    cases = {"flat.npy": (np.zeros(263, np.float32), "features of shape (263,), this model reads (frames, 263)"),
             "kit.npy": (np.zeros((20, 251), np.float32), "features of shape (20, 251), this model reads (frames, 263)"),
             "nan.npy": (nan, "NaN or infinite"),
             "empty.npy": (np.zeros((0, 263), np.float32), "no frames"),
             "text.npy": (None, "not a .npy file"),
             "missing.npy": (None, "not a readable .npy file")}
    for name, (array, message) in cases.items():
        path = tmp_path / name
        if array is not None:
            np.save(path, array)
        elif name == "text.npy":
            path.write_text("not numbers")
        out = py("rehamot/search.py", "query", str(run_dir), "--motion-file", str(path), check=False)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1, (name, out.stderr)
        assert lines[0].startswith(f"search: {path}: ") and message in lines[0], (name, lines)
    out = py("rehamot/search.py", "query", str(run_dir), "a jump", "--motion-file", str(tmp_path / "nan.npy"), check=False)
    assert out.returncode == 2 and out.stderr.strip() == "search: give one query: a text, --motion ID or --motion-file MOTION.npy"


def test_an_old_index_is_refused_with_how_to_rebuild_it(indexed, tmp_path):
    from rehamot.retrieval.index import SearchError, SearchIndex

    old = tmp_path / "run"
    shutil.copytree(indexed, old / "index")
    meta = json.loads((old / "index" / "index.json").read_text())
    (old / "index" / "index.json").write_text(json.dumps({**meta, "format": "rehamot-index/1"}))
    with pytest.raises(SearchError, match=r"index format 'rehamot-index/1', this rehamot reads rehamot-index/2: "
                                          r"rebuild it with `rehamot-search index .*run`"):
        SearchIndex.load(old)
    out = py("rehamot/search.py", "query", str(old), "a jump", check=False)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "rebuild it" in out.stderr


def test_a_damaged_bundle_is_refused_everywhere_naming_the_file(run_dir, indexed, tmp_path):
    import shutil

    from rehamot.checksums import CHECKSUM_FILE
    from rehamot.models.bundle import BundleError, load_bundle

    bundle = tmp_path / "run" / "best"
    shutil.copytree(run_dir / "best", bundle)
    listed = json.loads((bundle / CHECKSUM_FILE).read_text())["files"]
    assert {"model.safetensors", "config.yaml", "bundle.json", "README.md"} <= set(listed)  # the card too
    load_bundle(bundle)  # a copy anywhere verifies
    weights = bundle / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.safetensors: checksum mismatch"):
        load_bundle(bundle)
    for args in (["rehamot/evaluate.py", str(bundle)], ["rehamot/search.py", "index", str(bundle)]):
        out = py(*args, check=False)
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert f"{weights}: checksum mismatch" in out.stderr.strip().splitlines()[-1]
