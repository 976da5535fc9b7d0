"""`make demo-mix` at a tiny size (shards/demo_mix.py, real processes): two demo corpora through
the joints source (B as KIT-ML's skeleton, rate, axis and unit), trainings on A, B and A+B, and
the runs x test sets matrix."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import TINY_RUN, run_cli

pytestmark = pytest.mark.slow


def test_demo_mix_trains_on_a_b_and_both_and_writes_the_matrix(tmp_path: Path):
    data, runs = tmp_path / "data", tmp_path / "runs"
    proc = run_cli([sys.executable, "shards/demo_mix.py", "--motions", "60", "--data", str(data),
                    "--runs", str(runs), *TINY_RUN, "train.max_steps=2", "train.val_every=2",
                    "train.save_every=100"])

    manifests = {name: json.loads((data / name / "manifest.json").read_text()) for name in ("A", "B")}
    assert manifests["A"]["representation"]["skeletons"] == ["smpl22"]
    assert manifests["B"]["representation"]["skeletons"] == ["kit21"]
    for manifest in manifests.values():
        assert manifest["feature_dim"] == 263 and manifest["fps"] == 20.0
    record = json.loads((data / "source-B" / "corpus.jsonl").read_text().splitlines()[0])
    assert (record["skeleton"], record["fps"], record["up"], record["unit"]) == ("kit21", 12.5, "z", "mm")

    matrix = json.loads((runs / "matrix" / "matrix.json").read_text())
    run_names = ["train-A", "train-B", "train-A+B"]
    assert [r["name"] for r in matrix["runs"]] == run_names
    assert [s["name"] for s in matrix["test_sets"]] == ["A", "B"]
    for run in run_names:
        assert set(matrix["results"][run]) == {"A", "B"}
        assert all("rsum" in cell for cell in matrix["results"][run].values())
        assert run in proc.stdout
    # the mixture drew from both corpora; the single runs from their own only
    assert set(drawn(runs / "train-A+B")) == {"A", "B"} and min(drawn(runs / "train-A+B").values()) > 0
    assert set(drawn(runs / "train-B")) == {"B"}


def drawn(run_dir: Path) -> dict[str, int]:
    """source_samples of the run's last step record."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "source_samples" in r][-1]["source_samples"]
