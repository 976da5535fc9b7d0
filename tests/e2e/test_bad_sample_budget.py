"""Skipping bad samples has a budget: a damaged shard set stops the run, the odd bad sample does not.

The real entry point on a copy of the demo shards, one of whose shards was rewritten after
sharding (its samples' digests no longer match its index: every one of them is a bad sample
that data.strict=false skips). Over data.max_bad_fraction the run stops with one line naming
the shard; under it the run finishes and its summary says how many samples it skipped.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_RUN, run_cli
from test_integrity_train import copy_shard_set, set_motions

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def damaged(demo_shards, tmp_path_factory) -> tuple[Path, str]:
    """A copy of the demo shards with the shard the first batch reads altered; its name."""
    from rehamot.config import load_config
    from rehamot.data import TrainStream, data_config

    shards = copy_shard_set(demo_shards, tmp_path_factory.mktemp("damaged") / "shards")
    cfg = load_config(REPO / "configs" / "demo.yaml", [*TINY_RUN, f"data.shards={shards}"])
    stream = TrainStream(data_config(cfg, cfg.data.train_split), None)
    shard = Path(stream.shard_urls[stream.plan(0)[0].segments[0].shard])
    set_motions(shard, 1e6)
    return shards, shard.name


def train(shards: Path, tmp_path: Path, budget: str):
    return run_cli([sys.executable, "rehamot/train.py", "configs/demo.yaml", *TINY_RUN, f"data.shards={shards}",
                    f"run.dir={tmp_path / 'run'}", f"model.text_cache_dir={tmp_path / 'cache'}", "train.max_steps=8",
                    f"data.max_bad_fraction={budget}"], check=False)


def test_bad_samples_over_the_budget_stop_the_run_naming_the_shard(damaged, tmp_path):
    shards, name = damaged
    out = train(shards, tmp_path, "0.001")
    assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("rehamot: ") and "data.max_bad_fraction=0.001" in last and name in last, last
    run_dir = tmp_path / "run"
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # stopped at the first logged step with 100 samples read (16 per step), not at the end
    assert max(r["step"] for r in steps if "loss" in r) < 8
    assert not (run_dir / "DONE").exists() and not (run_dir / "final").exists()


def test_bad_samples_within_the_budget_are_skipped_and_counted_in_the_summary(damaged, tmp_path):
    shards, _ = damaged
    out = train(shards, tmp_path, "0.5")
    assert out.returncode == 0, out.stderr[-3000:]
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["bad_samples"] for r in steps if "loss" in r][-1]
    assert skipped > 0
    assert f"bad samples skipped: {skipped} (data.max_bad_fraction=0.5)" in out.stdout, out.stdout[-2000:]
