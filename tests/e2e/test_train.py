"""End-to-end training runs on real demo shards, real processes, the real packaged MiniLM (1 layer)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import AS_DEMO_RANDOMNESS, TINY_RUN, run_cli
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

# A tiny motion tower and a 1-layer MiniLM keep each launch to seconds on 2 cores.
TINY = [*TINY_RUN]
RESUME = [*TINY, *AS_DEMO_RANDOMNESS]  # resume checks: dropout on, one loader worker per rank

# Loaded into the training processes through train.py's REHAMOT_TEST_HOOK seam (PYTHONPATH).
STOP_HOOK = '''
import os
import signal


def stop(trainer):
    """STOP_HOW=kill: SIGKILL every rank before step STOP_AT + 1; preempt: the PREEMPT marker
    appears during step STOP_AT, so the run saves there and exits 0 (as on a SLURM signal)."""
    how, at = os.environ["STOP_HOW"], int(os.environ["STOP_AT"])
    train_step = trainer.train_step

    def step(batch):
        if how == "kill" and trainer.step == at:
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "preempt" and trainer.step == at - 1:
            (trainer.run_dir / "PREEMPT").touch()
        return train_step(batch)

    trainer.train_step = step
'''


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
    """2 ranks, 8 steps (an epoch is 7) uninterrupted, dropout on and a loader worker per rank:
    the reference every resume check compares with."""
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    torchrun(2, [*RESUME, f"data.shards={demo_shards}", f"run.dir={run_dir}", "train.max_steps=8",
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


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """The last logged loss of each step: a resumed run logs the steps after its checkpoint again."""
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


@pytest.mark.parametrize("stop", ["max_steps", "preempt", "kill"])
def test_resume_with_dropout_and_a_loader_worker_is_bitwise_exact(reference_run, demo_shards, tmp_path, stop):
    """Stopped mid-epoch and resumed with resume=latest, a run ends with the uninterrupted run's
    weights, bitwise, and the same loss at every step, while dropout and loader workers draw
    random numbers. Stops: a finished 4-step run extended to 8; the PREEMPT marker seen at
    step 3; SIGKILL of both ranks before step 6, after the step-4 checkpoint (save_every=2)."""
    run_dir = tmp_path / "resumed"
    common = [*RESUME, f"data.shards={demo_shards}", f"run.dir={run_dir}", "train.val_every=4",
              f"train.save_every={4 if stop == 'max_steps' else 2}"]
    if stop == "max_steps":
        torchrun(2, [*common, "train.max_steps=4"])
        saved = 4
    else:
        (tmp_path / "stop_hook.py").write_text(STOP_HOOK)
        env = {"REHAMOT_TEST_HOOK": "stop_hook:stop", "PYTHONPATH": str(tmp_path),
               "STOP_HOW": stop, "STOP_AT": "3" if stop == "preempt" else "5"}
        out = torchrun(2, [*common, "train.max_steps=8"], env=env, check=False)
        logged = max(losses_by_step(run_dir), default=0) if (run_dir / "metrics.jsonl").exists() else 0
        assert (out.returncode == 0) == (stop == "preempt"), out.stderr[-3000:]
        assert logged == int(env["STOP_AT"]), out.stderr[-3000:]  # stopped by the hook, not by a failure
        assert not (run_dir / "DONE").exists()
        (run_dir / "PREEMPT").unlink(missing_ok=True)  # as the requeued job's launcher does
        saved = 3 if stop == "preempt" else 4
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    position = json.loads((latest / "position.json").read_text())
    assert (position["step"], position["epoch"], position["step_in_epoch"]) == (saved, 0, saved)  # mid-epoch
    out = torchrun(2, [*common, "train.max_steps=8", "resume=latest"])
    assert f"resumed from {latest}" in out.stdout.replace("\n", "")
    a, b = weights(reference_run / "final"), weights(run_dir / "final")
    assert a.keys() == b.keys()
    differ = [key for key in a if not (a[key] == b[key]).all()]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    ref_losses = losses_by_step(reference_run)
    assert losses_by_step(run_dir) == ref_losses and list(ref_losses) == list(range(1, 9))
    assert all(loss > 0 for loss in ref_losses.values())  # the comparison is not of zeros


def test_changed_world_size_on_resume_is_refused(reference_run, demo_shards, tmp_path):
    out = python_run([*RESUME, f"data.shards={demo_shards}", f"run.dir={tmp_path}", f"resume={reference_run}",
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
    assert out.returncode == 2 and "does not exist" in out.stderr and "make_shards.py demo" not in out.stderr


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
    from rehamot.config import load_config
    from rehamot.models.factory import build_model

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


@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_nan_parameters_trip_the_guard_and_are_never_saved(demo_shards, tmp_path, mode):
    """NaN weights give NaN embeddings, whose loss can read 0.0 (no negative is ever 'hardest'):
    the step still counts as non-finite, and no checkpoint of NaNs is written."""
    run_dir = tmp_path / mode
    env = {"REHAMOT_TEST_HOOK": "fault_hooks:nan_parameter", "PYTHONPATH": str(Path(__file__).resolve().parent)}
    out = python_run([*TINY, f"data.shards={demo_shards}", f"run.dir={run_dir}", "train.max_steps=3",
                      f"train.nonfinite={mode}"], env=env, check=False)
    assert out.returncode != 0
    assert not list((run_dir / "checkpoints").glob("step-*")) if (run_dir / "checkpoints").exists() else True
    if mode == "stop":
        assert "non-finite loss at step 0" in out.stderr
    else:
        train = [r for r in records(run_dir) if "loss" in r]
        assert train and all(r["loss"] != 0.0 for r in train) and train[-1]["skipped_steps"] == 3
        assert "non-finite parameters" in out.stderr
