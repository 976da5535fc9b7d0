"""`rehamot/train.py` with GradCache (train.micro_batches=4) against plain steps, on real shards.

Both runs are real processes started at once (one core each). With dropout off and the same
seed, 4 micro-batches of 4 must train like one batch of 16: the same logged losses (1e-6) and
the same final weights. Weights follow the convention of test_deepspeed.py: the runs differ in
rounding only (micro-batches trim their motion padding and multiply fewer rows), which AdamW
turns into steps of up to ~lr where a gradient is itself rounding noise (the attention key
bias, whose exact gradient is 0: measured 31 of its 32 elements off by up to 2.7e-4, and one
other element by 1.3e-6). So every trained element within 1e-6 except at most 0.5 %, those
within 2 * lr * steps; the frozen LM bitwise equal.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli
from safetensors.torch import load_file
from test_train import TINY

pytestmark = pytest.mark.slow

STEPS = 4  # 2 SH warm-up steps, then DropTriple
LR = 5e-4  # configs/demo.yaml's
WEIGHT_ATOL = 1e-6
OUTLIER_FRACTION = 5e-3


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def test_micro_batches_train_like_one_batch(demo_shards, tmp_path):
    common = [*TINY, f"data.shards={demo_shards}", f"train.max_steps={STEPS}", "train.val_every=1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = {
        k: subprocess.Popen([sys.executable, "rehamot/train.py", "configs/demo.yaml", *common,
                             f"run.dir={tmp_path / f'k{k}'}", f"train.micro_batches={k}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k in (1, 4)
    }
    outputs = {k: proc.communicate(timeout=600) for k, proc in procs.items()}
    for k, proc in procs.items():
        assert proc.returncode == 0, (k, outputs[k][1][-4000:])
    assert "GradCache: 4 micro-batches of 4 per step (batch 16 per process)" in outputs[4][0]
    assert "GradCache" not in outputs[1][0]

    plain, cached = train_records(tmp_path / "k1"), train_records(tmp_path / "k4")
    assert [r["step"] for r in cached] == list(range(1, STEPS + 1))
    assert [r["loss_name"] for r in cached] == [r["loss_name"] for r in plain] == ["sh", "sh", "droptriple", "droptriple"]
    for a, b in zip(plain, cached):
        assert a["loss"] > 0 and abs(a["loss"] - b["loss"]) <= 1e-6 * a["loss"], (a["step"], a["loss"], b["loss"])
        assert a["dropped_negatives"] == b["dropped_negatives"] and a["global_batch"] == b["global_batch"] == 16

    want, got = load_file(str(tmp_path / "k1/final/model.safetensors")), load_file(str(tmp_path / "k4/final/model.safetensors"))
    assert want.keys() == got.keys()
    trained, off = 0, []
    for key in want:
        if key.startswith("text.backbone."):  # frozen LM
            assert torch.equal(want[key], got[key]), key
            continue
        trained += want[key].numel()
        delta = (want[key] - got[key]).abs().flatten()
        off.extend(delta[delta > WEIGHT_ATOL].tolist())
    assert len(off) <= OUTLIER_FRACTION * trained, (len(off), trained)
    assert all(d <= 2 * LR * STEPS for d in off), max(off)


def test_bad_micro_batch_settings_fail_clearly(demo_shards, tmp_path):
    out = run_cli([sys.executable, "rehamot/train.py", "configs/demo.yaml", f"data.shards={demo_shards}",
                   "train.batch_size=16", "train.micro_batches=5"], check=False)
    assert out.returncode == 2
    assert "train.micro_batches=5: must divide train.batch_size=16" in out.stderr
    # DeepSpeed ZeRO: refused at start-up on every rank, before any step.
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "REHAMOT_DS_SHM_COMM": "0"}
    out = run_cli([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/zero2.yaml",
                   "--num_processes", "2", "rehamot/train.py", "configs/demo.yaml", f"data.shards={demo_shards}",
                   f"run.dir={tmp_path / 'ds'}", "train.batch_size=16", "train.micro_batches=4"], env=env, check=False)
    assert out.returncode != 0
    assert out.stderr.count("train.micro_batches > 1 (GradCache) is not supported under DeepSpeed") == 2
    assert not (tmp_path / "ds" / "metrics.jsonl").exists()
