"""A run directory holds one run, through the commands a user runs: a used one is continued or
explicitly started over, never restarted silently; a refused start leaves nothing behind but
an empty folder; Ctrl-C saves and says how to continue; a resume with nothing left to train
says which limit to raise."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_RUN, run_cli

pytestmark = pytest.mark.slow

# batch 64: an epoch of the demo shards is a few steps, so train.epochs=1 ends a run quickly
FINISHED = [*TINY_RUN, "train.batch_size=64", "train.epochs=1"]

# Loaded into the training process through train.py's REHAMOT_TEST_HOOK seam (PYTHONPATH):
# slow steps (SLOW_S seconds after each step's all-reduce) leave time to press Ctrl-C mid-run.
SLOW_HOOK = '''
import os
import time


def slow(trainer):
    train_step = trainer.train_step

    def step(batch):
        stats = train_step(batch)
        time.sleep(float(os.environ.get("SLOW_S", "0.3")))
        return stats

    trainer.train_step = step
'''


def train_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, "rehamot/train.py", "configs/demo.yaml", *overrides]


def train(overrides: list[str]):
    return run_cli(train_cmd(overrides), check=False)


def torchrun(overrides: list[str]):
    return run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "rehamot/train.py", "configs/demo.yaml", *overrides], check=False)


def refusal(out, code: int = 2) -> str:
    """The one `rehamot:` line of a refused run (no traceback of ours)."""
    assert out.returncode == code, (out.returncode, out.stderr[-3000:])
    lines = [line for line in out.stderr.splitlines() if line.startswith("rehamot:")]
    assert len(lines) == 1 and "Error:" not in out.stderr.replace("ChildFailedError:", ""), out.stderr[-3000:]
    return lines[0]


def steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def finished(demo_shards, tmp_path_factory) -> tuple[Path, list[str]]:
    """A run that train.epochs=1 ended, and the overrides that made it."""
    run_dir = tmp_path_factory.mktemp("runs") / "finished"
    overrides = [*FINISHED, f"data.shards={demo_shards}", f"run.dir={run_dir}"]
    out = run_cli(train_cmd(overrides))
    assert "the run ends at step" in out.stdout and "(train.epochs=1 of " in out.stdout
    return run_dir, overrides


def test_the_same_command_again_is_refused_and_touches_nothing(finished):
    run_dir, overrides = finished
    before = (run_dir / "metrics.jsonl").read_text()
    line = refusal(train(overrides))
    assert f"{run_dir} holds a run" in line and "resume=latest" in line and "run.overwrite=true" in line
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert not (run_dir / "run.lock").exists()


def test_a_resume_with_nothing_left_names_the_limit_to_raise(finished):
    run_dir, overrides = finished
    line = refusal(train([*overrides, "resume=latest", "train.max_steps=100"]))
    assert "nothing left to train" in line and "raise train.epochs" in line
    assert not (run_dir / "run.lock").exists()


def test_resume_latest_on_history_without_a_checkpoint_is_refused(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    line = refusal(train([*TINY_RUN, f"data.shards={demo_shards}", f"run.dir={run_dir}", "resume=latest"]))
    assert "no checkpoint to continue from" in line and "run.overwrite=true" in line
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_overwrite_is_refused_under_a_live_lock_then_starts_over(finished, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(finished[0], run_dir)
    overrides = [*finished[1][:-1], f"run.dir={run_dir}", "run.overwrite=true", "train.max_steps=1"]
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (run_dir / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                                       "slurm_job_id": None, "started": "now"}))
        line = refusal(train(overrides))
        assert "is in use by another run" in line and f"pid {holder.pid}" in line
        assert (run_dir / "final").is_dir() and len(steps(run_dir)) > 1  # nothing deleted
    finally:
        holder.kill()
        holder.wait()
    (run_dir / "run.lock").unlink()
    run_cli(train_cmd(overrides))
    assert steps(run_dir) == [1]  # the new run's history only
    assert [p.name for p in (run_dir / "checkpoints").glob("step-*")] == ["step-00000001"]


def test_a_resume_from_other_shards_is_refused_before_anything_is_written(finished, demo_shards, tmp_path):
    moved = tmp_path / "shards-copy"
    shutil.copytree(demo_shards, moved)
    run_dir = tmp_path / "new"
    line = refusal(train([*FINISHED, f"data.shards={moved}", f"run.dir={run_dir}", f"resume={finished[0]}",
                          "train.epochs=2"]))
    assert f"shards={demo_shards} then, {moved} now" in line
    assert list(run_dir.iterdir()) == []  # not even the lock stays


def test_too_few_shards_for_two_ranks_is_one_line_once_and_writes_nothing(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    out = torchrun([*TINY_RUN, f"data.shards={demo_shards}", f"run.dir={run_dir}", "data.num_workers=50"])
    assert out.returncode != 0
    assert "fewer than the 100 readers" in refusal(out, out.returncode)
    # the launcher's own summary (and traceback) may follow, but no rank's traceback
    assert "ValueError" not in out.stderr and "rehamot/data/" not in out.stderr, out.stderr[-3000:]
    assert not run_dir.exists() or list(run_dir.iterdir()) == []


def interrupted(run_dir: Path, shards: Path, tmp_path: Path, after_steps: int, slow_s: float,
                presses: int) -> tuple[int, str]:
    """Start a tiny training (the demo's loader worker too: it must neither die of the signal nor
    stop the run), press Ctrl-C `presses` times (2.5 s apart) once `after_steps` steps are logged;
    the exit status and stderr."""
    (tmp_path / "slow_hook.py").write_text(SLOW_HOOK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REHAMOT_TEST_HOOK": "slow_hook:slow", "PYTHONPATH": str(tmp_path),
           "SLOW_S": str(slow_s)}
    cmd = train_cmd([*TINY_RUN, "data.num_workers=1", f"data.shards={shards}",
                     f"run.dir={run_dir}", "train.max_steps=6", "train.val_every=100", "train.save_every=100"])
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not ((run_dir / "metrics.jsonl").exists() and len(steps(run_dir)) >= after_steps):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        for press in range(presses):
            time.sleep(2.5 if press else 0)
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, stderr


def test_ctrl_c_saves_says_how_to_continue_and_the_command_finishes_the_run(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    code, stderr = interrupted(run_dir, demo_shards, tmp_path, after_steps=2, slow_s=0.3, presses=1)
    assert code == 130, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("rehamot:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert "interrupted (Ctrl-C) at step" in lines[0]
    step = int(lines[0].split("at step ")[1].split(";")[0])
    assert 2 <= step < 6 and (run_dir / "checkpoints" / f"step-{step:08d}").is_dir()
    assert not (run_dir / "run.lock").exists()
    command = shlex.split(lines[0].split("continue with: ", 1)[1])
    assert command[-2:] == ["resume=latest", f"run.dir={run_dir}"]
    out = run_cli(command)  # the printed command, as printed
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{step:08d}'}" in out.stdout.replace("\n", "")
    assert (run_dir / "DONE").is_file() and steps(run_dir)[-1] == 6


def test_a_second_ctrl_c_stops_at_once_without_saving(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    code, stderr = interrupted(run_dir, demo_shards, tmp_path, after_steps=1, slow_s=8, presses=2)
    assert code == 130, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("rehamot:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert "second Ctrl-C: stopped at step" in lines[0] and "no checkpoint was saved" in lines[0]
    assert lines[0].endswith(f"run.overwrite=true run.dir={run_dir}")  # resume=latest would be refused
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "run.lock").exists()
