"""The generation evaluator's physical columns (jitter, foot skating, penetration, floating) on a
tiny trained run: the rows, each generated motion's values, and the worst ones drawn as GIFs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from test_evaluate_generation import BATCH, REPEATS, real_scores, run_dir, split, write_folder  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

MEASURES = ("jitter", "foot_skating", "penetration", "floating")
FRAMES = 24  # short motions: drawing a GIF takes about a second per 10 frames on busy cores
LIFT = 0.3   # m


def shifted(motion: np.ndarray, dy: float) -> np.ndarray:
    """The motion moved up by dy metres: the root height and every joint's (absolute) y."""
    out = motion.copy()
    out[:, 3] += dy
    out[:, 5:4 + 21 * 3:3] += dy
    return out


def test_real_motions_have_the_real_rows_physics(real_scores, split):  # noqa: F811 (a fixture)
    generated, real = real_scores["generated"], real_scores["real"]
    for name in MEASURES:
        assert generated[name] == real[name] and generated[f"{name}_ci95"] == 0.0, name
    assert set(real_scores["per_motion"]) == set(split["ids"])
    assert real["penetration"] == 0.0  # the demo corpus stands on the floor
    assert real["jitter"] > 0 and 0 < real["floating"] < 0.1
    mean_jitter = np.mean([m["jitter"] for m in real_scores["per_motion"].values()])
    assert real["jitter"] == pytest.approx(mean_jitter)  # a row is the mean over the set's motions


def test_the_worst_motions_are_found_and_drawn(run_dir, split, tmp_path):  # noqa: F811 (a fixture)
    from rehamot.models.bundle import bundle_mean_std, load_bundle

    _, _, info = load_bundle(run_dir / "best")
    _, std = bundle_mean_std(info)
    ids = split["ids"]
    generated = {i: split["motions"][i][:FRAMES].astype(np.float64) for i in ids}
    noisy, lifted, sunk = ids[0], ids[1], ids[2]
    clean = {i: generated[i].copy() for i in (noisy, lifted, sunk)}
    generated[noisy] = generated[noisy] + 0.5 * std * np.random.default_rng(0).standard_normal(generated[noisy].shape)
    generated[lifted] = shifted(generated[lifted], LIFT)
    generated[sunk] = shifted(generated[sunk], -LIFT)
    folder = write_folder(tmp_path / "generated", {i: m.astype(np.float32) for i, m in generated.items()})
    out = tmp_path / "scores.json"
    proc = run_cli([sys.executable, "rehamot/evaluate_generation.py", str(run_dir), "--generated", str(folder),
                    "--batch-size", BATCH, "--repeats", REPEATS, "--json", str(out), "--worst", "1"])
    result = json.loads(out.read_text())
    per_motion = result["per_motion"]
    assert set(per_motion) == set(ids)

    from rehamot import Evaluator

    evaluator = Evaluator.load(run_dir / "best", device="cpu")
    before = evaluator.physics(clean)["per_motion"]
    as_written = generated[noisy].astype(np.float32)
    assert evaluator.physics({noisy: as_written})["per_motion"][noisy] == pytest.approx(per_motion[noisy])
    assert per_motion[noisy]["jitter"] > 10 * before[noisy]["jitter"]  # what the pooled embedding barely sees
    assert per_motion[lifted]["floating"] - before[lifted]["floating"] == pytest.approx(LIFT, abs=1e-4)  # float32 file
    assert per_motion[sunk]["penetration"] == pytest.approx(LIFT - before[sunk]["floating"], abs=1e-4)
    assert result["generated"]["jitter"] > result["real"]["jitter"]
    assert result["generated"]["penetration"] > 0 and result["real"]["penetration"] == 0

    # --worst 1: the top motion by each measure, drawn beside the JSON
    worst = {name: max(ids, key=lambda i: per_motion[i][name]) for name in MEASURES}
    assert (worst["jitter"], worst["floating"], worst["penetration"]) == (noisy, lifted, sunk)
    gifs = sorted(p.relative_to(tmp_path / "scores-worst").as_posix() for p in (tmp_path / "scores-worst").rglob("*.gif"))
    assert gifs == sorted(f"{name}/1-{worst[name]}.gif" for name in MEASURES)
    assert all(Path(result["worst"][name][0]["file"]).read_bytes()[:4] == b"GIF8" for name in MEASURES)
    for label in ("jitter m/s³", "skating", "penetr. cm", "float cm"):
        assert label in proc.stdout, label
    assert f"worst by jitter: {noisy}" in proc.stdout


def test_a_negative_worst_count_is_refused(run_dir, tmp_path):  # noqa: F811 (a fixture)
    folder = write_folder(tmp_path / "one", {"x": np.zeros((5, 263), np.float32)})
    proc = run_cli([sys.executable, "rehamot/evaluate_generation.py", str(run_dir), "--generated", str(folder),
                    "--worst", "-1"], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "evaluate_generation: --worst must be a count of motions, got -1"]
