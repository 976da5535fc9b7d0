"""A strict training run on a shard altered after sharding stops before its first optimizer step.

The real entry point on real demo shards: the shard the run reads first is rewritten with every
motion value set to 1e6 (a valid tar, the manifest untouched; `make_shards.py verify` would
report its sha256). Its samples' digests no longer match the shard index, so the first batch
is refused, naming the shard and the sample, and no step is taken or logged.
"""
from __future__ import annotations

import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY_RUN, run_cli

pytestmark = pytest.mark.slow


def copy_shard_set(source: Path, target: Path) -> Path:
    """The tars, their indexes and the manifest (not the demo's source corpus)."""
    target.mkdir()
    for path in source.iterdir():
        if path.is_file():
            shutil.copy(path, target / path.name)
    return target


def set_motions(shard: Path, value: float) -> list[str]:
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    shard.chmod(0o644)
    keys = []
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name.endswith(".motion.npy"):
                motion = np.load(io.BytesIO(data), allow_pickle=False)
                buf = io.BytesIO()
                np.save(buf, np.full_like(motion, value), allow_pickle=False)
                data = buf.getvalue()
                keys.append(member.name.split(".", 1)[0])
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return keys


def test_a_strict_run_on_an_altered_shard_stops_before_any_step(demo_shards, tmp_path):
    from rehamot.config import load_config
    from rehamot.data import TrainStream, data_config

    shards = copy_shard_set(demo_shards, tmp_path / "shards")
    overrides = [*TINY_RUN, f"data.shards={shards}", f"run.dir={tmp_path / 'run'}", "data.strict=true",
                 "train.max_steps=3", f"model.text_cache_dir={tmp_path / 'cache'}"]
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides)
    stream = TrainStream(data_config(cfg, cfg.data.train_split), None)
    segment = stream.plan(0)[0].segments[0]  # what the first batch is read from
    shard = Path(stream.shard_urls[segment.shard])
    keys = set_motions(shard, 1e6)

    out = run_cli([sys.executable, "rehamot/train.py", "configs/demo.yaml", *overrides], check=False)
    assert out.returncode != 0, out.stdout[-2000:]
    assert f"{shard.name}, {keys[segment.first]}: digest_mismatch" in out.stderr, out.stderr[-3000:]
    metrics = tmp_path / "run" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    assert not [r for r in rows if "loss" in r]  # no optimizer step was taken
    assert not list((tmp_path / "run").glob("checkpoints/*"))
