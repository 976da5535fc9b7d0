"""The text cache is exact: a frozen-LM training run with and without it logs the same losses.

Both runs are the real entry point on real demo shards with the packaged MiniLM (1 layer); they
run side by side (one thread each). Motion dropout is off, so the only thing that differs
between them is where the caption features come from: the cache built at start-up, or the LM
run on each batch's tokens. The features then differ only by float rounding (other padding in
other batches), far below the 1e-6 asked of the losses.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_RUN

pytestmark = pytest.mark.slow

TINY = [*TINY_RUN, "train.val_every=1000", "train.max_steps=5"]


def launch(overrides: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "rehamot/train.py", "configs/demo.yaml", *TINY, *overrides],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout[-3000:]}\n{stderr[-5000:]}"
    return stdout


def train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_frozen_lm_run_gives_the_same_losses_with_and_without_the_cache(demo_shards, tmp_path):
    cached_dir, live_dir, cache_dir = tmp_path / "cached", tmp_path / "live", tmp_path / "cache"
    common = [f"data.shards={demo_shards}"]
    cached = launch([*common, f"run.dir={cached_dir}", "model.text_cache=true", f"model.text_cache_dir={cache_dir}"])
    live = launch([*common, f"run.dir={live_dir}", "model.text_cache=false"])
    cached_out, live_out = finish(cached), finish(live)

    files = list(cache_dir.glob("text-features-*.safetensors"))
    assert len(files) == 1 and f"text cache: built {files[0]}" in cached_out
    assert "text cache" not in live_out
    with_cache, without = train_losses(cached_dir), train_losses(live_dir)
    assert len(with_cache) == len(without) == 5
    assert all(loss > 0.01 for loss in without)  # SH then DropTriple losses, not zeros
    for a, b in zip(with_cache, without):
        assert abs(a - b) <= 1e-6 * abs(b), (with_cache, without)
