"""End-to-end training runs on real demo shards, real processes, the real packaged MiniLM (1 layer)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import TINY_RUN, run_cli

pytestmark = pytest.mark.slow

# A tiny motion tower and a 1-layer MiniLM keep each launch to seconds on 2 cores.
TINY = [*TINY_RUN]


def torchrun(nproc: int, overrides: list[str], env: dict[str, str] | None = None, check: bool = True):
    return run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "rehamot/train.py", "configs/demo.yaml", *overrides], env=env, check=check)


def python_run(overrides: list[str], env: dict[str, str] | None = None, check: bool = True):
    return run_cli([sys.executable, "rehamot/train.py", "configs/demo.yaml", *overrides], env=env, check=check)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def reference_run(demo_shards, tmp_path_factory) -> Path:
    """2 ranks, 8 steps uninterrupted: the reference every resume check compares with."""
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    torchrun(2, [*TINY, f"data.shards={demo_shards}", f"run.dir={run_dir}", "train.max_steps=8",
                 "train.save_every=4", "train.val_every=4"])
    return run_dir


def test_two_process_run_writes_a_complete_run_dir(reference_run):
    run_dir = reference_run
    for name in ("config.yaml", "meta.json", "metrics.jsonl", "eval-test.json", "DONE",
                 "training_curves.png", "batch_similarity.png", "best/model.safetensors",
                 "final/model.safetensors", "final/bundle.json", "checkpoints/latest"):
        assert (run_dir / name).exists(), name
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["world_size"] == 2
    train = [r for r in records(run_dir) if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    for key in ("epoch", "loss", "loss_name", "lr/motion", "samples_per_s", "data_wait_s",
                "global_batch", "dropped_negatives"):
        assert key in train[0], key
    assert {r["global_batch"] for r in train} == {32}  # 2 ranks x 16
    assert [r["loss_name"] for r in train[:3]] == ["sh", "sh", "droptriple"]
    val = [r for r in records(run_dir) if "val/rsum" in r]
    assert [r["step"] for r in val][:2] == [4, 8]
    result = json.loads((run_dir / "eval-test.json").read_text())
    metrics = result["protocols"]["captions"]
    assert set(metrics) >= {"t2m/R@1", "t2m/R@10", "m2t/R@1", "m2t/MedR", "rsum"}
    # resolved config reloads under the schema
    from rehamot.config import load_config

    assert load_config(run_dir / "config.yaml").train.max_steps == 8


def test_resume_is_bitwise_exact(reference_run, demo_shards, tmp_path):
    """Stop at step 4 (mid-epoch), resume with resume=latest: same weights at step 8, bitwise."""
    run_dir = tmp_path / "resumed"
    common = [*TINY, f"data.shards={demo_shards}", f"run.dir={run_dir}", "train.save_every=4", "train.val_every=4"]
    torchrun(2, [*common, "train.max_steps=4"])
    out = torchrun(2, [*common, "train.max_steps=8", "resume=latest"])
    assert "resumed from" in out.stdout
    a, b = weights(reference_run / "final"), weights(run_dir / "final")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key
    ref_losses = [r["loss"] for r in records(reference_run) if "loss" in r]
    new_losses = [r["loss"] for r in records(run_dir) if "loss" in r]
    assert new_losses == ref_losses
    assert all(loss > 0 for loss in ref_losses)  # the comparison is not of zeros


def test_changed_world_size_on_resume_is_refused(reference_run, demo_shards, tmp_path):
    out = python_run([*TINY, f"data.shards={demo_shards}", f"run.dir={tmp_path}", f"resume={reference_run}",
                      "train.max_steps=10"], check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "world_size=2 then, 1 now" in out.stderr


def test_single_process_python_run(demo_shards, tmp_path):
    run_dir = tmp_path / "single"
    python_run([*TINY, f"data.shards={demo_shards}", f"run.dir={run_dir}", "train.max_steps=3", "loss.name=infonce"])
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["world_size"] == 1
    train = [r for r in records(run_dir) if "loss" in r]
    assert {r["global_batch"] for r in train} == {16}
    assert (run_dir / "eval-test.json").is_file()


def test_config_errors_and_missing_shards(tmp_path):
    out = python_run(["train.bach_size=3"], check=False)
    assert out.returncode == 2 and "train.bach_size" in out.stderr
    out = python_run([f"data.shards={tmp_path / 'nowhere'}"], check=False)
    assert out.returncode == 2 and "make_shards.py demo" in out.stderr


NAN_AT_STEP_1 = {"REHAMOT_TEST_HOOK": "fault_hooks:nan_loss_at_step", "FAULT_STEP": "1",
                 "PYTHONPATH": str(Path(__file__).resolve().parent)}


@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_nonfinite_loss_is_skipped_on_all_ranks_or_stops(demo_shards, tmp_path, mode):
    run_dir = tmp_path / mode
    out = torchrun(2, [*TINY, f"data.shards={demo_shards}", f"run.dir={run_dir}", "train.max_steps=4",
                       f"train.nonfinite={mode}"], env=NAN_AT_STEP_1, check=False)
    if mode == "skip":
        assert out.returncode == 0, out.stderr[-3000:]
        train = [r for r in records(run_dir) if "loss" in r]
        assert train[-1]["skipped_steps"] == 1
        assert all(r["step"] for r in train)
    else:
        assert out.returncode != 0
        assert "non-finite loss at step 1" in out.stderr


def test_lm_finetuning_changes_the_lm_and_frozen_lm_stays(demo_shards, tmp_path):
    def lm_weights(run_dir):
        return {k: v for k, v in weights(run_dir / "final").items() if k.startswith("text.backbone.")}

    frozen, tuned, gated = tmp_path / "frozen", tmp_path / "tuned", tmp_path / "gated"
    base = [*TINY, f"data.shards={demo_shards}", "train.max_steps=2", "train.weight_decay=0.1"]
    python_run([*base, f"run.dir={frozen}"])
    python_run([*base, f"run.dir={tuned}", "model.finetune_lm=true", "train.lm_lr=1e-3"])
    # fine-tuning that starts at step 100: trainable from the start (DDP/ZeRO fix the set when
    # they wrap), lr 0 until then, so weight decay must not touch it either
    python_run([*base, f"run.dir={gated}", "model.finetune_lm=true", "train.lm_lr=1e-3", "model.lm_unfreeze_step=100"])
    from rehamot.model_factory import build_model
    from rehamot.config import load_config

    cfg = load_config(frozen / "config.yaml")
    pristine = {f"text.{k}": v for k, v in build_model(cfg, 263).text.state_dict().items() if k.startswith("backbone.")}
    f, t, g = lm_weights(frozen), lm_weights(tuned), lm_weights(gated)
    assert f.keys() == t.keys() == g.keys() and len(f) > 0
    assert all((f[k] == pristine[k]).all() for k in f)
    assert all((g[k] == pristine[k]).all() for k in g)
    lr_lm = [r["lr/lm"] for r in records(gated) if "loss" in r]
    assert lr_lm == [0.0, 0.0]
    changed = sum(not (t[k] == pristine[k]).all() for k in t)
    assert changed > len(t) // 2


def test_a_missing_hub_model_is_one_line_before_any_run_dir(demo_shards, tmp_path):
    out = run_cli([sys.executable, "rehamot/train.py", "configs/humanml3d.yaml", f"data.shards={demo_shards}",
                   f"run.root={tmp_path / 'runs'}"], env={"HF_HUB_OFFLINE": "1"}, check=False)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "distilbert-base-uncased" in out.stderr and "local copy" in out.stderr
    assert not (tmp_path / "runs").exists()
