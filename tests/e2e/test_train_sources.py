"""Training on two weighted shard sets (data.sources) through `python rehamot/train.py`: exact
mid-epoch resume with a loader worker, per-source sample counts, one normalisation, validation
and the end-of-run test on the eval source, and the one-line refusals."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import AS_DEMO_RANDOMNESS, TINY_RUN, run_cli
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

RESUME = [*TINY_RUN, *AS_DEMO_RANDOMNESS]  # dropout on, one loader worker

# Loaded into the training process through train.py's REHAMOT_TEST_HOOK seam (PYTHONPATH).
KILL_HOOK = '''
import os
import signal


def stop(trainer):
    """SIGKILL the trainer before step STOP_AT + 1 (its loader worker dies with it)."""
    at, train_step = int(os.environ["STOP_AT"]), trainer.train_step

    def step(batch):
        if trainer.step == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return train_step(batch)

    trainer.train_step = step
'''


def train(overrides: list[str], env: dict[str, str] | None = None, check: bool = True):
    return run_cli([sys.executable, "rehamot/train.py", "configs/demo.yaml", *overrides], env=env, check=check)


def sources(*entries: tuple[Path, str, float]) -> list[str]:
    listed = ", ".join(f"{{shards: {path}, name: {name}, weight: {weight}}}" for path, name, weight in entries)
    return ["data.shards=null", f"data.sources=[{listed}]"]


def records(run_dir: Path) -> dict[int, dict]:
    """The last training record of each step (a resumed run logs the steps after its checkpoint again)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "loss" in r}


@pytest.fixture(scope="module")
def second_corpus(tmp_path_factory) -> Path:
    """Another demo corpus (other motions, other captions), small shards."""
    out = tmp_path_factory.mktemp("corpus-b") / "shards"
    run_cli([sys.executable, "shards/make_shards.py", "demo", "--motions", "150", "--seed", "2", "--out", str(out),
             "--workers", "1", "--shard-mb", "1"])
    return out


@pytest.fixture(scope="module")
def mixture(demo_shards, second_corpus) -> list[str]:
    # a: ~250 train motions at weight 0.5, b: ~125 at weight 1; validated and tested on b
    return [*RESUME, *sources((demo_shards, "a", 0.5), (second_corpus, "b", 1)), "data.eval_source=b",
            "train.max_steps=8", "train.val_every=4", "train.save_every=2"]


@pytest.fixture(scope="module")
def reference_run(mixture, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    train([*mixture, f"run.dir={run_dir}"])
    return run_dir


def test_a_two_source_run_logs_samples_per_source_and_evaluates_the_eval_source(reference_run, second_corpus):
    steps = records(reference_run)
    assert list(steps) == list(range(1, 9))
    for step, record in steps.items():
        drawn = record["source_samples"]
        assert set(drawn) == {"a", "b"} and sum(drawn.values()) == 16 * step  # cumulative, every sample once
    assert min(steps[8]["source_samples"].values()) > 0  # both sources feed the batches
    manifest_b = json.loads((second_corpus / "manifest.json").read_text())
    val = [r for r in map(json.loads, (reference_run / "metrics.jsonl").read_text().splitlines()) if "val/rsum" in r]
    assert [r["step"] for r in val] == [4, 8]
    tested = json.loads((reference_run / "eval-test.json").read_text())
    assert tested["motions"] == manifest_b["splits"]["test"]["motions"]  # the eval source's test split
    # one normalisation for the mixture, in meta.json and in the bundles, neither source's own
    meta = json.loads((reference_run / "meta.json").read_text())
    bundle = json.loads((reference_run / "final" / "bundle.json").read_text())
    assert [s["name"] for s in meta["sources"]] == ["a", "b"]
    assert np.allclose(bundle["mean"], meta["mean"]) and np.allclose(bundle["std"], meta["std"])
    assert not np.allclose(bundle["mean"], manifest_b["mean"])
    assert "mixture of a (weight 0.5) + b (weight 1)" in (reference_run / "final" / "README.md").read_text()


def test_two_ranks_draw_the_mixture_together(mixture, tmp_path):
    """torchrun, 2 ranks with a loader worker each: equal steps, every logged `source_samples`
    summed over both ranks (2 x 16 samples a step), the leak check run once for the run."""
    run_dir = tmp_path / "two-ranks"
    run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "rehamot/train.py", "configs/demo.yaml", *mixture, f"run.dir={run_dir}", "train.max_steps=4"])
    steps = records(run_dir)
    assert list(steps) == [1, 2, 3, 4]
    for step, record in steps.items():
        drawn = record["source_samples"]
        assert set(drawn) == {"a", "b"} and sum(drawn.values()) == 2 * 16 * step
    assert min(steps[4]["source_samples"].values()) > 0
    assert json.loads((run_dir / "meta.json").read_text())["world_size"] == 2
    leaks = json.loads((run_dir / "leaks.json").read_text())
    assert leaks and (run_dir / "DONE").exists()


def test_evaluate_and_search_a_mixture_bundle_on_its_eval_source(reference_run, second_corpus, tmp_path):
    """Without --shards, rehamot-eval and the search index read the eval source and normalise with
    the bundle's Mean/Std: the same scores as the run's own end-of-run test."""
    tested = json.loads((reference_run / "eval-test.json").read_text())
    run_cli([sys.executable, "rehamot/evaluate.py", str(reference_run), "--split", "test", "--protocol", "captions",
             "--no-figures"])
    again = json.loads((reference_run / "eval-test.json").read_text())
    assert again["shards"] == str(second_corpus) and again["motions"] == tested["motions"]
    for key, value in tested["protocols"]["captions"].items():
        assert again["protocols"]["captions"][key] == pytest.approx(value, abs=1e-6), key
    out = run_cli([sys.executable, "rehamot/search.py", "index", str(reference_run)])
    assert f"wrote {reference_run}" in out.stdout and f"{tested['motions']} motions" in out.stdout


def test_a_killed_two_source_run_resumes_exactly(reference_run, mixture, tmp_path):
    """SIGKILL mid-epoch after the step-4 checkpoint, then resume=latest: the same losses, per-source
    counts and final weights as the uninterrupted run, bit for bit -- with the train samples that
    duplicate a val/test sample left out of the plan (the default for several sources)."""
    dropped = json.loads((reference_run / "leaks.json").read_text())["dropped"]
    assert sum(map(len, dropped.values())) > 0  # the demo corpora share near-copies
    run_dir = tmp_path / "resumed"
    (tmp_path / "kill_hook.py").write_text(KILL_HOOK)
    env = {"REHAMOT_TEST_HOOK": "kill_hook:stop", "PYTHONPATH": str(tmp_path), "STOP_AT": "5"}
    out = train([*mixture, f"run.dir={run_dir}"], env=env, check=False)
    assert out.returncode != 0 and max(records(run_dir)) == 5, out.stderr[-3000:]
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    position = json.loads((latest / "position.json").read_text())
    assert (position["step"], position["epoch"], position["step_in_epoch"]) == (4, 0, 4)  # mid-epoch
    assert sum(position["source_samples"].values()) == 4 * 16
    out = train([*mixture, f"run.dir={run_dir}", "resume=latest"])
    assert f"resumed from {latest}" in out.stdout.replace("\n", "")
    ref, got = records(reference_run), records(run_dir)
    assert {s: (r["loss"], r["source_samples"]) for s, r in got.items()} == \
        {s: (r["loss"], r["source_samples"]) for s, r in ref.items()}
    a, b = load_file(str(reference_run / "final" / "model.safetensors")), load_file(str(run_dir / "final" / "model.safetensors"))
    assert [k for k in a if not (a[k] == b[k]).all()] == []


def test_refusals(demo_shards, second_corpus, tmp_path):
    both = train([*TINY_RUN, f"data.sources=[{{shards: {second_corpus}}}]", f"run.dir={tmp_path / 'r1'}"], check=False)
    twice = train([*TINY_RUN, *sources((demo_shards, "x", 1), (second_corpus, "x", 2)), f"run.dir={tmp_path / 'r2'}"],
                  check=False)
    from unit.data_fixtures import write_shard_set

    other_dim = tmp_path / "six-features"
    write_shard_set(other_dim, {"train": [20], "val": [5], "test": [5]}, feature_dim=6)
    mismatch = train([*TINY_RUN, *sources((demo_shards, "demo", 1), (other_dim, "six", 1)), f"run.dir={tmp_path / 'r3'}"],
                     check=False)
    neither = train([*TINY_RUN, "data.shards=null", f"run.dir={tmp_path / 'r4'}"], check=False)
    for out, said in ((both, "set data.shards or data.sources, not both"),
                      (neither, "no training data: set data.shards"),
                      (twice, "data.sources: two sources are named 'x'"),
                      (mismatch, "'demo' (")):
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("rehamot: "), out.stderr[-2000:]
        assert said in lines[0]
    assert "'six'" in mismatch.stderr and "feature_dim 263 vs 6" in mismatch.stderr
    assert not any((tmp_path / name).exists() for name in ("r1", "r2", "r3", "r4"))  # refused before any run dir
