"""Train on A, test on B: `rehamot-eval RUN --shards DIR` and `rehamot-eval --matrix` (real processes)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_RUN, run_cli

pytestmark = pytest.mark.slow


def py(*args: str, check: bool = True, cwd: Path | None = None):
    kwargs = {"cwd": cwd} if cwd else {}
    return run_cli([sys.executable, *args], check=check, **kwargs)


def edited_copy(shards: Path, out: Path, edit) -> Path:
    """The same shards under another folder name, their manifest changed by `edit`."""
    shutil.copytree(shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def sets(demo_shards, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("testsets")
    seed1 = root / "seed1"
    py("shards/make_shards.py", "demo", "--motions", "300", "--seed", "1", "--out", str(seed1),
       "--workers", "2", "--shard-mb", "2")

    def shift(manifest):  # other statistics for the very same motions
        manifest["mean"] = [m + 3.0 for m in manifest["mean"]]
        manifest["std"] = [s * 4.0 for s in manifest["std"]]

    def narrow(manifest):  # KIT-ML's width: another representation
        manifest["feature_dim"] = 251
        manifest["mean"], manifest["std"] = manifest["mean"][:251], manifest["std"][:251]

    return {"own": demo_shards, "seed1": seed1,
            "shifted": edited_copy(demo_shards, root / "shifted", shift),
            "narrow": edited_copy(demo_shards, root / "narrow", narrow)}


@pytest.fixture(scope="module")
def run_dir(demo_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("matrix") / "run"
    py("rehamot/train.py", "configs/demo.yaml", *TINY_RUN, f"data.shards={demo_shards}", f"run.dir={out}",
       "train.max_steps=4", "train.val_every=4", "train.save_every=100")
    return out


def evaluate_on(run_dir: Path, shards: Path) -> dict:
    py("rehamot/evaluate.py", str(run_dir), "--shards", str(shards), "--no-figures")
    return json.loads((run_dir / f"eval-test-{shards.name}.json").read_text())


@pytest.fixture(scope="module")
def single(run_dir, sets) -> dict[str, dict]:
    own_before = (run_dir / "eval-test.json").read_text()  # written by training
    results = {name: evaluate_on(run_dir, sets[name]) for name in ("own", "seed1", "shifted")}
    assert (run_dir / "eval-test.json").read_text() == own_before, "the run's own results were overwritten"
    return results


def test_each_shard_set_has_its_own_file(single, sets):
    assert single["seed1"]["shards"] == str(sets["seed1"])
    assert single["seed1"]["motions"] == 30 and single["own"]["motions"] == 31
    assert single["seed1"]["protocols"] != single["own"]["protocols"]


def test_motions_are_normalised_with_the_bundles_statistics(single):
    # the same motions under a manifest with other Mean/Std: the bundle's statistics give the
    # same numbers; the shard set's own would shift every feature the model sees
    assert single["shifted"]["protocols"] == single["own"]["protocols"]


def test_another_representation_is_refused(run_dir, sets):
    proc = py("rehamot/evaluate.py", str(run_dir), "--shards", str(sets["narrow"]), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate: "), proc.stderr
    assert "251 features" in lines[0] and "263 features" in lines[0]
    assert not (run_dir / "eval-test-narrow.json").exists()
    proc = py("rehamot/evaluate.py", "--matrix", str(run_dir), "--on", str(sets["own"]), str(sets["narrow"]),
              check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("evaluate: ") and "251 features" in proc.stderr


def test_matrix_of_runs_by_test_sets(run_dir, sets, single, tmp_path):
    import matplotlib.image as mpimg

    # the run and its final bundle (two rows) on the run's own shards and another corpus
    proc = py(str(REPO / "rehamot/evaluate.py"), "--matrix", str(run_dir), str(run_dir / "final"),
              "--on", str(sets["own"]), str(sets["seed1"]), cwd=tmp_path)
    out = tmp_path / "matrix"  # the default --out
    matrix = json.loads((out / "matrix.json").read_text())
    assert [r["name"] for r in matrix["runs"]] == ["run", "run/final"]
    assert [s["name"] for s in matrix["test_sets"]] == [sets["own"].name, "seed1"]
    for name in ("run", "run/final"):
        assert name in proc.stdout
        assert set(matrix["results"][name]) == {sets["own"].name, "seed1"}
    # the best bundle's cells are the single evaluations' captions numbers, exactly
    assert matrix["results"]["run"][sets["own"].name] == single["own"]["protocols"]["captions"]
    assert matrix["results"]["run"]["seed1"] == single["seed1"]["protocols"]["captions"]
    rsum = f"rsum {single['seed1']['protocols']['captions']['rsum']:.2f}"
    assert rsum in proc.stdout and "t2m R@1" in proc.stdout and "m2t R@1" in proc.stdout
    image = mpimg.imread(out / "matrix-rsum.png")
    assert image.shape[0] > 150 and image[..., :3].std() > 0.05
