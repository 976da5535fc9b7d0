"""Guo's replication logic on fake embeddings (no model), FID statistics files, the model card."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from rehamot.evaluation.generation_eval import (
    METRICS,
    FidStats,
    _caption_lists,
    frechet_from_stats,
    load_fid_stats,
    replication_draws,
    save_fid_stats,
    score_embeddings,
)
from rehamot.evaluation.generation_metrics import (
    diversity,
    frechet_distance,
    matching_score,
    mean_ci95,
    multimodality,
    r_precision,
)


def unit_rows(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(rows, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def fake():
    """70 motions with 1-3 captions each; captions lie near their motion (a good evaluator)."""
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 4, size=70)
    motions = unit_rows(rng, 70, 16)
    owners = np.repeat(np.arange(70), counts)
    captions = motions[owners] + 0.3 * rng.normal(size=(counts.sum(), 16))
    return {"counts": counts, "motions": motions, "captions": captions, "owners": owners, "rng": rng}


def test_draws_are_seeded_by_the_replication_and_shared_prefixes(fake):
    counts = fake["counts"]
    draws = replication_draws(counts, 5, seed=3)
    for choice, order in draws:
        assert ((0 <= choice) & (choice < counts)).all()
        assert sorted(order.tolist()) == list(range(len(counts)))
    # replication r depends on (seed, r) only: fewer repeats are a prefix, another seed differs
    for (c1, o1), (c2, o2) in zip(replication_draws(counts, 3, seed=3), draws):
        assert (c1 == c2).all() and (o1 == o2).all()
    assert not (replication_draws(counts, 1, seed=4)[0][1] == draws[0][1]).all()
    assert not (draws[0][1] == draws[1][1]).all()


def test_each_replication_is_guos_metrics_on_the_drawn_captions_in_the_shuffled_order(fake):
    counts, motions, captions = fake["counts"], fake["motions"], fake["captions"]
    generated = motions + 0.2 * fake["rng"].normal(size=motions.shape)
    result = score_embeddings(captions, counts, generated, motions, repeats=4, batch_size=16, seed=7)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    expected = {"r": [], "ms": [], "div": []}
    for r, (choice, order) in enumerate(replication_draws(counts, 4, seed=7)):
        texts = captions[offsets[order] + choice[order]]
        expected["r"].append(r_precision(texts, generated[order], 16, 3))
        expected["ms"].append(matching_score(texts, generated[order], 16))
        expected["div"].append(diversity(generated[order], 69, seed=[7, r, 1]))
    row = result["generated"]
    r_mean, r_ci = mean_ci95(expected["r"])
    for k in range(3):
        assert row[f"r_precision_top{k + 1}"] == pytest.approx(r_mean[k])
        assert row[f"r_precision_top{k + 1}_ci95"] == pytest.approx(r_ci[k])
    assert (row["matching_score"], row["matching_score_ci95"]) == pytest.approx(mean_ci95(expected["ms"]))
    assert (row["diversity"], row["diversity_ci95"]) == pytest.approx(mean_ci95(expected["div"]))
    # FID against the real embeddings, once (fixed sets: CI 0)
    assert row["fid"] == pytest.approx(frechet_distance(generated, motions), rel=1e-9, abs=1e-12)
    assert row["fid_ci95"] == 0.0
    assert result["counts"]["rows_per_replication"] == 64 and result["counts"]["diversity_pairs"] == 69


def test_real_motions_as_generated_reproduce_the_real_row_exactly(fake):
    result = score_embeddings(fake["captions"], fake["counts"], fake["motions"], fake["motions"], repeats=3,
                              batch_size=16)
    assert result["generated"] == result["real"]
    assert set(result["real"]) == {k for m in METRICS for k in (m, f"{m}_ci95")}
    assert abs(result["real"]["fid"]) < 1e-6
    assert result["real"]["multimodality"] is None


def test_a_better_pairing_scores_higher_and_a_shuffled_one_drops_to_chance(fake):
    good = score_embeddings(fake["captions"], fake["counts"], fake["motions"], fake["motions"], repeats=5, batch_size=16)
    shuffled = np.roll(fake["motions"], 1, axis=0)  # right motions under the wrong prompts
    bad = score_embeddings(fake["captions"], fake["counts"], shuffled, fake["motions"], repeats=5, batch_size=16)
    assert good["generated"]["r_precision_top3"] > 0.9
    assert bad["generated"]["r_precision_top3"] < 0.4  # chance is 3/16
    assert bad["generated"]["matching_score"] > good["generated"]["matching_score"]
    assert abs(bad["generated"]["fid"]) < 1e-6  # the same set of motions: FID cannot tell


def test_saved_reference_statistics_give_the_same_fid(fake, tmp_path):
    generated = fake["motions"] + 0.1
    reference = FidStats.of(fake["motions"])
    assert frechet_from_stats(FidStats.of(generated), reference) == pytest.approx(
        frechet_distance(generated, fake["motions"]), rel=1e-12)
    save_fid_stats(tmp_path, reference, "test", "abc")
    loaded = load_fid_stats(tmp_path, "test", "abc")
    assert loaded.num_motions == 70 and loaded.mu.dtype == np.float64 and loaded.sigma.shape == (16, 16)
    np.testing.assert_array_equal(loaded.sigma, reference.sigma)
    with_real = score_embeddings(fake["captions"], fake["counts"], generated, fake["motions"], repeats=2, batch_size=16)
    without = score_embeddings(fake["captions"], fake["counts"], generated, None, loaded, repeats=2, batch_size=16)
    assert without["real"] is None and "no real motions given: the real row is empty" in without["notes"]
    assert without["generated"] == with_real["generated"]
    assert load_fid_stats(tmp_path, "val") is None
    with pytest.raises(ValueError, match="other weights"):
        load_fid_stats(tmp_path, "test", "another-sha")


def test_multimodality_and_small_set_notes(fake):
    rng = fake["rng"]
    repeat_emb = fake["motions"][:12, None, :] + 0.05 * rng.normal(size=(12, 4, 16))
    result = score_embeddings(fake["captions"], fake["counts"], fake["motions"], fake["motions"], repeats=3,
                              batch_size=16, generated_repeat_emb=repeat_emb)
    expected = mean_ci95([multimodality(repeat_emb, 3, seed=[0, r, 2]) for r in range(3)])
    assert (result["generated"]["multimodality"], result["generated"]["multimodality_ci95"]) == pytest.approx(expected)
    assert result["real"]["multimodality"] is None
    assert result["counts"]["multimodality_pairs"] == 3
    assert any("diversity: 70 motions is not more than 300 pairs; used 69" in n for n in result["notes"])
    assert any("multimodality: 4 generations per prompt is not more than 10 pairs; used 3" in n for n in result["notes"])
    with pytest.raises(ValueError, match="generations >= 2"):
        score_embeddings(fake["captions"], fake["counts"], fake["motions"], fake["motions"],
                         generated_repeat_emb=repeat_emb[:, :1])


def test_refusals_name_the_problem(fake):
    with pytest.raises(ValueError, match="70 motions is fewer than one R-precision batch of 80"):
        score_embeddings(fake["captions"], fake["counts"], fake["motions"], fake["motions"], batch_size=80)
    with pytest.raises(ValueError, match="FID needs a reference"):
        score_embeddings(fake["captions"], fake["counts"], fake["motions"])
    with pytest.raises(ValueError, match="caption counts"):
        score_embeddings(fake["captions"], fake["counts"][:-1], fake["motions"], fake["motions"])
    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        score_embeddings(fake["captions"], fake["counts"], fake["motions"], fake["motions"], repeats=0)
    assert _caption_lists(["a jump", ["a walk", "walking"]]) == [["a jump"], ["a walk", "walking"]]
    with pytest.raises(ValueError, match="motion 1: needs at least one non-empty caption"):
        _caption_lists(["a jump", []])


def test_import_rehamot_does_not_import_torch():
    code = ("import sys, rehamot; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert {'load_bundle', 'Evaluator'} <= set(dir(rehamot)); "
            "import rehamot.evaluation.generation_eval, rehamot.evaluation.model_card; assert 'torch' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_model_card_from_a_bundle_folder(tmp_path):
    from safetensors.numpy import save_file

    from rehamot.config import load_config, to_yaml
    from rehamot.evaluation.model_card import model_card, shards_digest, write_model_card

    run = tmp_path / "run"
    bundle = run / "final"
    bundle.mkdir(parents=True)
    cfg = load_config(None, ["run.name=demo", "data.shards=" + str(tmp_path / "nowhere")])
    (bundle / "config.yaml").write_text(to_yaml(cfg))
    save_file({"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float32)}, str(bundle / "model.safetensors"))
    info = {"corpus": "demo", "feature_dim": 263, "step": 150, "val": {"rsum": 300.5},
            "text_model": {"model": "embedded:all-MiniLM-L6-v2", "pooling": "mean", "num_layers": 6,
                           "hidden_size": 384, "model_type": "bert", "digest": "d1"}}
    (bundle / "bundle.json").write_text(json.dumps(info))
    evaluation = {"split": "test", "bundle": "best", "step": 140, "motions": 207, "captions": 607,
                  "protocols": {"captions": {"t2m/R@1": 24.05, "t2m/R@10": 82.7, "t2m/R@5": 64.58, "t2m/MedR": 4.0,
                                             "m2t/R@1": 24.15, "m2t/R@5": 52.66, "m2t/R@10": 66.18, "m2t/MedR": 5.0,
                                             "rsum": 314.33},
                                "tmr-all": {"t2m/R@1": 22.71, "t2m/R@2": 35.75, "m2t/R@1": 16.91, "m2t/R@2": 27.54}},
                  "skipped": {"tmr-nsim": "no list"}}
    (run / "eval-test.json").write_text(json.dumps(evaluation))
    manifest = {"corpus": "demo", "feature_dim": 263, "fps": 20.0,
                "splits": {"train": {"motions": 10, "captions": 30, "shards": [{"path": "train-0.tar", "sha256": "aa"}]},
                           "test": {"motions": 5, "captions": 15, "shards": [{"path": "test-0.tar", "sha256": "bb"}]}}}
    card = model_card(bundle, manifest, evaluation, {"world_size": 2})
    # each protocol its own table, columns in recall order then MedR
    assert "### captions\n\n| direction | R@1 | R@5 | R@10 | MedR |" in card
    assert "| text→motion | 24.05 | 64.58 | 82.70 | 4.00 |" in card
    assert "### tmr-all\n\n| direction | R@1 | R@2 |" in card
    assert "These numbers are those of `best/`, not of this `final/` bundle." in card
    assert "`tmr-nsim` skipped: no list" in card
    assert "| train | 10 | 30 | 1 |" in card and shards_digest(manifest)[1] in card
    assert "32 parameters" not in card and "17 parameters" in card  # 12 + 5 tensor elements
    assert 'from rehamot import load_bundle' in card and "rehamot-eval-generation" in card
    assert "Evaluator.load" in card and "batch 32 per process × 2 processes" in card
    assert "/tmp" not in card and str(tmp_path) not in card
    # written from the run dir; the manifest cannot be read: said so, not a failure
    out = write_model_card(bundle)
    assert out.read_text().startswith("# rehamot motion↔text model: demo, `final` bundle")
    assert "was not readable" in out.read_text()


def test_table_rows_are_real_and_generated_as_mean_and_ci(fake):
    from rich.console import Console

    from rehamot.evaluation.generation_eval import format_scores

    result = score_embeddings(fake["captions"], fake["counts"], fake["motions"] + 0.005, fake["motions"], repeats=2,
                              batch_size=16)
    console = Console(record=True, width=200)
    console.print(format_scores(result, "demo"))
    lines = console.export_text().splitlines()
    real = next(line for line in lines if line.startswith("│ real"))
    generated = next(line for line in lines if line.startswith("│ generated"))
    assert real.count("±") == 6 and real.rstrip("│ ").endswith("-")  # no multimodality without repeats
    assert "0.000 ± 0.000" in real  # FID of the real row: a round-off negative shows as 0
    fid = result["generated"]["fid"]
    assert 0 < fid < 0.001 and f"{fid:.1e} ± 0.000" in generated  # small FIDs keep 2 significant digits
