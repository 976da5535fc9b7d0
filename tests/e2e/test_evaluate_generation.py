"""A tiny trained run as the evaluator of generated motions: bundle statistics, model card, CLI."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_RUN, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

BATCH = "8"  # the demo test split has 31 motions: 3 R-precision groups of 8
REPEATS = "3"


@pytest.fixture(scope="module")
def run_dir(demo_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "run"
    # 12 steps of 16 (a weak but better-than-chance evaluator); best/ at step 8, final/ at 12
    run_cli([sys.executable, "rehamot/train.py", "configs/demo.yaml", *TINY_RUN, f"data.shards={demo_shards}",
             f"run.dir={out}", "train.max_steps=12", "train.val_every=4", "train.save_every=100", "train.lr=2e-3"])
    return out


@pytest.fixture(scope="module")
def split(demo_shards):
    from rehamot.evaluation.generation_eval import read_split

    ids, captions, motions = read_split(str(demo_shards), "test")
    return {"ids": ids, "captions": captions, "motions": motions}


def write_folder(folder: Path, motions: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for motion_id, motion in motions.items():
        np.save(folder / f"{motion_id}.npy", motion, allow_pickle=False)
    return folder


def score(run_dir, folder, tmp_path, *extra) -> dict:
    from rehamot.evaluate_generation import main

    out = tmp_path / f"{folder.name}.json"
    assert main([str(run_dir), "--generated", str(folder), "--batch-size", BATCH, "--repeats", REPEATS,
                 "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def real_scores(run_dir, split, tmp_path_factory) -> dict:
    """The split's real motions handed in as the generated ones, with repeats for 4 prompts."""
    folder = write_folder(tmp_path_factory.mktemp("real") / "generated", split["motions"])
    rng = np.random.default_rng(1)
    for motion_id in split["ids"][:4]:
        motion = split["motions"][motion_id]
        write_folder(folder / "repeats" / motion_id,
                     {str(r): motion + 0.01 * rng.normal(size=motion.shape).astype(motion.dtype) for r in range(3)})
    return score(run_dir, folder, tmp_path_factory.mktemp("real-json"))


def test_training_saves_fid_statistics_and_a_model_card(run_dir, split):
    from rehamot.evaluation.generation_eval import Evaluator, FidStats, load_fid_stats
    from rehamot.models.bundle import bundle_identity

    for name in ("best", "final"):
        stats = load_fid_stats(run_dir / name, "test", bundle_identity(run_dir / name, {})["weights_sha256"])
        assert stats is not None and stats.num_motions == 31 and stats.sigma.shape == (64, 64), name
        card = (run_dir / name / "README.md").read_text()
        for part in ("## Data", "| test | 31 | 91 | 3 |", "## Model", "## Training", "### captions",
                     "| text→motion |", 'load_bundle("', "rehamot-eval-generation", "Evaluator.load",
                     "fid_stats-test.safetensors"):
            assert part in card, (name, part)
    # each bundle's statistics are its own embeddings of the real motions (final/ re-encoded
    # the split when its weights differ from the evaluated best/)
    for name in ("best", "final"):
        evaluator = Evaluator.load(run_dir / name, device="cpu")
        own = FidStats.of(evaluator.embed_motions([split["motions"][i] for i in split["ids"]]))
        np.testing.assert_allclose(evaluator.fid_stats("test").mu, own.mu, atol=1e-6)
        np.testing.assert_allclose(evaluator.fid_stats("test").sigma, own.sigma, atol=1e-6)


def test_a_final_bundle_with_other_weights_gets_its_own_statistics(run_dir, split, demo_shards, tmp_path):
    """save_run_fid_stats re-encodes the split for a bundle whose weights differ from the
    evaluated one (here final/ with perturbed motion-tower weights)."""
    from safetensors.numpy import load_file, save_file

    from rehamot.checksums import write_checksums
    from rehamot.data import EvalSet
    from rehamot.data.pipeline import DataConfig
    from rehamot.evaluation.generation_eval import Evaluator, FidStats, save_run_fid_stats

    run = tmp_path / "run"
    for name in ("best", "final"):
        shutil.copytree(run_dir / name, run / name)
    weights = load_file(str(run / "final" / "model.safetensors"))
    rng = np.random.default_rng(0)
    for key in [k for k in weights if k.startswith("motion.")][:4]:
        weights[key] = weights[key] + 0.5 * rng.normal(size=weights[key].shape).astype(np.float32)
    save_file(weights, str(run / "final" / "model.safetensors"))
    write_checksums(run / "final")  # as an export of those weights would have
    motions = [split["motions"][i] for i in split["ids"]]
    best_emb = Evaluator.load(run / "best", device="cpu").embed_motions(motions)
    written = save_run_fid_stats(run, run / "best", best_emb, EvalSet(DataConfig(shards=str(demo_shards), split="test")),
                                 "cpu", batch_size=64)
    assert [p.parent.name for p in written] == ["best", "final"]
    final = Evaluator.load(run / "final", device="cpu")
    own = FidStats.of(final.embed_motions(motions))
    np.testing.assert_allclose(final.fid_stats("test").mu, own.mu, atol=1e-6)
    assert np.abs(final.fid_stats("test").mu - FidStats.of(best_emb).mu).max() > 1e-3


def test_real_motions_as_generated_reproduce_the_real_row(real_scores):
    from rehamot.evaluation.generation_eval import METRICS

    keys = {k for m in METRICS for k in (m, f"{m}_ci95")}
    assert set(real_scores["real"]) == keys and set(real_scores["generated"]) == keys
    for key in ("bundle", "split", "counts", "notes", "fid_reference", "missing_ids", "unreadable", "seed"):
        assert key in real_scores, key
    assert {"weights_sha256", "text_model", "step"} <= set(real_scores["bundle"])
    assert real_scores["counts"]["motions"] == 31 and real_scores["counts"]["repeats"] == 3
    assert real_scores["missing_ids"] == [] and real_scores["unreadable"] == []
    generated, real = dict(real_scores["generated"]), dict(real_scores["real"])
    assert generated.pop("multimodality") is not None and real.pop("multimodality") is None
    generated.pop("multimodality_ci95"), real.pop("multimodality_ci95")
    assert generated == real  # same motions, same draws, same order: the same numbers
    assert abs(real["fid"]) < 1e-6
    assert real_scores["counts"]["multimodality_prompts"] == 4
    assert any("diversity: 31 motions" in note for note in real_scores["notes"])


def test_noise_and_shuffled_prompts_are_caught(run_dir, split, real_scores, tmp_path):
    from rehamot.models.bundle import bundle_mean_std, load_bundle

    _, _, info = load_bundle(run_dir / "best")
    _, std = bundle_mean_std(info)
    rng = np.random.default_rng(0)
    # a tiny 12-step evaluator sees little: strong noise (1 Std) keeps the test far from ties
    noised = {i: m + std * rng.normal(size=m.shape).astype(np.float32) for i, m in split["motions"].items()}
    noisy = score(run_dir, write_folder(tmp_path / "noised", noised), tmp_path)
    ids = split["ids"]
    # other motions under each id; half the split away, so no sub-clip sits under its parent's id
    shuffled = {ids[k]: split["motions"][ids[(k + len(ids) // 2) % len(ids)]] for k in range(len(ids))}
    wrong = score(run_dir, write_folder(tmp_path / "shuffled", shuffled), tmp_path)

    real = real_scores["real"]
    assert noisy["real"] == real  # the same real motions, draws and order as before
    assert noisy["generated"]["fid"] > max(1e-6, 100 * abs(real["fid"]))
    assert noisy["generated"]["r_precision_top3"] < real["r_precision_top3"]
    assert noisy["generated"]["matching_score"] > real["matching_score"]
    assert wrong["generated"]["r_precision_top3"] < real["r_precision_top3"]
    assert wrong["generated"]["matching_score"] > real["matching_score"]
    assert abs(wrong["generated"]["fid"]) < 1e-6  # the same set of motions: FID cannot see the shuffle


def test_a_copied_bundle_scores_without_shards(run_dir, split, tmp_path):
    from rehamot import Evaluator, load_bundle

    copy = tmp_path / "elsewhere" / "my-evaluator"
    shutil.copytree(run_dir / "best", copy)
    model, cfg, info = load_bundle(copy)
    assert info["feature_dim"] == 263 and cfg.model.embed_dim == 64
    evaluator = Evaluator.load(copy, device="cpu")
    evaluator.cfg.data.shards = str(tmp_path / "no-shards-here")  # nothing may read them
    ids = split["ids"]
    result = evaluator.score([split["captions"][i] for i in ids], [split["motions"][i] for i in ids],
                             repeats=2, batch_size=8)
    assert result["real"] is None and result["fid_reference"]["source"] == "bundle"
    assert abs(result["generated"]["fid"]) < 1e-6  # the real test motions against their own statistics
    assert 0 <= result["generated"]["r_precision_top1"] <= result["generated"]["r_precision_top3"] <= 1


def test_missing_unreadable_and_extra_files_are_listed(run_dir, split, tmp_path):
    ids = split["ids"]
    folder = write_folder(tmp_path / "partial", {i: split["motions"][i] for i in ids[2:]})
    (folder / f"{ids[2]}.npy").write_bytes(b"not a numpy file")
    np.save(folder / f"{ids[3]}.npy", np.zeros((10, 5), np.float32))
    np.save(folder / "not-an-id.npy", np.zeros((10, 263), np.float32))
    long = np.concatenate([split["motions"][ids[4]]] * 3)  # longer than data.max_len: cropped
    np.save(folder / f"{ids[4]}.npy", long)
    result = score(run_dir, folder, tmp_path)
    assert result["missing_ids"] == ids[:2] and result["extra_files"] == ["not-an-id.npy"]
    assert {u["file"] for u in result["unreadable"]} == {f"{ids[2]}.npy", f"{ids[3]}.npy"}
    assert "expected (frames >= 1, 263)" in next(u["reason"] for u in result["unreadable"] if u["file"] == f"{ids[3]}.npy")
    assert result["counts"]["motions"] == 27
    assert any("cropped" in note for note in result["notes"]) == (long.shape[0] > 196)


def test_errors_are_one_line_and_exit_2(run_dir, split, tmp_path, capsys):
    from rehamot.evaluate_generation import main

    empty = tmp_path / "empty"
    empty.mkdir()
    # a real process: no traceback, one line (fails before the model is loaded)
    proc = run_cli([sys.executable, "rehamot/evaluate_generation.py", str(run_dir), "--generated", str(empty)],
                   check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"evaluate_generation: no generated motions in {empty}: "
                                                "expected <motion_id>.npy files"]
    few = write_folder(tmp_path / "few", {i: split["motions"][i] for i in split["ids"][:5]})
    for args, message in (
        ([str(run_dir), "--generated", str(few), "--batch-size", BATCH],
         "evaluate_generation: 5 motions is fewer than one R-precision batch of 8"),
        ([str(run_dir), "--generated", str(few)], "evaluate_generation: 5 motions is fewer than one R-precision batch of 32"),
        ([str(run_dir), "--generated", str(tmp_path / "nope")], "evaluate_generation: --generated"),
        ([str(tmp_path), "--generated", str(few)], "evaluate_generation: no exported bundle in"),
        ([str(run_dir), "--generated", str(few), "--split", "nosuch"], "evaluate_generation: split 'nosuch' is not in"),
    ):
        capsys.readouterr()
        assert main(args) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), (args, lines)
