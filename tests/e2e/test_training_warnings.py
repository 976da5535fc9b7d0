"""A run that learns nothing says so: warnings in the log and in metrics.jsonl, and a line per validation.

The real entry point on the demo shards with a tiny untrained model, which maps every motion
and every caption to near-identical embeddings: with DropTriple's default thresholds (0.75)
every candidate negative is dropped on every step, the loss is exactly 0, and the run used to
finish "successfully" without a word about it.
"""
from __future__ import annotations

import json
import sys

import pytest
from conftest import TINY_RUN, run_cli

pytestmark = pytest.mark.slow

# TINY_RUN raises the thresholds to 0.99 precisely because 0.75 drops everything; put them back
COLLAPSED = [*TINY_RUN, "loss.threshold_motion=0.75", "loss.threshold_text=0.75", "loss.warmup_steps=0",
             "train.max_steps=5", "train.val_every=5"]


def test_a_run_whose_every_negative_is_dropped_warns_once_in_log_and_metrics(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    out = run_cli([sys.executable, "rehamot/train.py", "configs/demo.yaml", *COLLAPSED, f"data.shards={demo_shards}",
                   f"run.dir={run_dir}", f"model.text_cache_dir={tmp_path / 'cache'}"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert all(r["drop_rate"] > 0.99 and r["loss"] == 0.0 for r in steps), steps  # the scenario holds

    warnings = [r for r in rows if "warning" in r]
    assert [(w["step"], w["warning"]) for w in warnings] == [(3, "all_negatives_dropped"), (3, "zero_loss")]
    assert all(set(w) == {"step", "warning", "message"} for w in warnings)
    lines = [line for line in out.stdout.splitlines() if "warning" in line]
    assert len(lines) == 2, out.stdout[-3000:]  # once per code, not at every later step
    assert "all_negatives_dropped" in lines[0] and "loss.threshold_motion" in lines[0]
    assert "zero_loss" in lines[1] and "loss.margin" in lines[1]

    val = [line for line in out.stdout.splitlines() if line.startswith("val step 5:")]
    assert len(val) == 1 and all(part in val[0] for part in ("t2m R@1", "m2t R@1", "R@10", "rsum", "best")), \
        out.stdout[-3000:]
