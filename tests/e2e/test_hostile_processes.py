"""Training meets hostile processes, locks and disks: a garbage lock, a killed trainer, a small
/dev/shm, a full disk, a kill -9 then resume. Each ends in one line or a clean recovery, never a
traceback, an orphan or a duplicate."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_RUN, run_cli

pytestmark = pytest.mark.slow


def train(overrides: list[str], env: dict[str, str] | None = None, timeout: float = 300):
    return run_cli([sys.executable, "rehamot/train.py", "configs/demo.yaml", *TINY_RUN, *overrides],
                   env=env, check=False, timeout=timeout)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_one_line(out, code: int, *fragments: str) -> str:
    """Exit `code`, no traceback, one line on stderr: the refusal (returned)."""
    assert out.returncode == code, (out.returncode, out.stderr[-3000:])
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr and len(lines) == 1, out.stderr[-3000:]
    assert lines[0].startswith("rehamot: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("content", ["", "garbage{", "[1, 2]", "null", '{"pid": "7", "host": 3}'])
def test_a_lock_that_names_no_run_is_refused_in_one_line(demo_shards, tmp_path, content):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.lock").write_text(content)
    out = train([f"data.shards={demo_shards}", f"run.dir={run_dir}"])
    assert_one_line(out, 2, str(run_dir / "run.lock"), "never taken over", "remove it once no run uses")
    assert (run_dir / "run.lock").read_text() == content  # never taken over
    assert not (run_dir / "config.yaml").exists()


def children(pid: int) -> list[int]:
    """The live child processes of `pid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie left to a container's init that never reaps is dead, too)."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# Storage that stops answering (a hung NFS server): after its first two batches, a loader worker
# takes a minute over its next one. Installed before the loop, so the forked workers inherit it.
STALLED_READ_HOOK = """
import time

from rehamot.data import pipeline


def stall(trainer):
    collate, made = pipeline._SlotReader._collate, []

    def slow(self, items):
        made.append(1)
        if len(made) > 2:
            time.sleep(60)
        return collate(self, items)

    pipeline._SlotReader._collate = slow
"""


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc")
def test_loader_workers_die_with_a_killed_trainer(demo_shards, tmp_path):
    """Workers busy in their own work (not in torch's loop, whose watchdog would notice the
    trainer is gone only once they are back) end within seconds of the trainer's kill -9."""
    (tmp_path / "stall_hook.py").write_text(STALLED_READ_HOOK)
    run_dir = tmp_path / "run"
    args = [sys.executable, "rehamot/train.py", "configs/demo.yaml", *TINY_RUN, f"data.shards={demo_shards}",
            f"run.dir={run_dir}", "data.num_workers=2", "train.max_steps=100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REHAMOT_TEST_HOOK": "stall_hook:stall", "PYTHONPATH": str(tmp_path)}
    trainer = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").is_file() or len(workers := children(trainer.pid)) < 2:
            assert trainer.poll() is None and time.monotonic() < deadline, "the run never took a step"
            time.sleep(0.2)
        time.sleep(2)  # the workers are stalled on their third batch
        trainer.kill()  # SIGKILL: the trainer runs no cleanup at all
        trainer.wait()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in workers if alive(pid)], "loader workers outlived their trainer"
    finally:
        trainer.kill()
        trainer.wait()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def in_mount_namespace(mount_point: Path | str, size: str, command: list[str], after: str = ""):
    """`command` in a mount namespace of its own where `mount_point` is a tmpfs of `size` (the
    machine's mounts are untouched); `after` runs there once it ended, its output after a
    marker line. Skips where mounting is not allowed."""
    script = f'mount -t tmpfs -o size={size} tmpfs "$0" || exit 97; "$@"; rc=$?; echo AFTER:; {after or "true"}; exit $rc'
    out = run_cli(["unshare", "-m", "sh", "-c", script, str(mount_point), *command], check=False, timeout=300)
    if out.returncode == 97 or (out.returncode == 1 and "unshare failed" in out.stderr):
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()[:200]}")
    before, _, rest = out.stdout.rpartition("AFTER:\n")
    return out, before, rest


TRAIN = [sys.executable, "rehamot/train.py", "configs/demo.yaml", *TINY_RUN]
needs_unshare = pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")


@needs_unshare
def test_a_full_disk_when_the_lock_is_written_is_one_line_and_leaves_no_lock(demo_shards, tmp_path):
    mount = tmp_path / "full"
    mount.mkdir()
    run_dir = mount / "run"
    fill_then_train = ["sh", "-c", 'head -c 1M /dev/zero > "$0/filler" 2>/dev/null; exec "$@"', str(mount),
                       *TRAIN, f"data.shards={demo_shards}", f"run.dir={run_dir}"]
    out, _, left = in_mount_namespace(mount, "256k", fill_then_train, after=f'ls -A "{run_dir}"')
    assert_one_line(out, 2, f"{run_dir / 'run.lock'}: cannot write the run lock", "No space left on device")
    assert left.split() == [], left  # no lock, no temporary file


@needs_unshare
def test_a_dev_shm_too_small_for_the_batch_ring_trains_through_the_pipe(demo_shards, tmp_path):
    """The ring of one worker at batch 16 needs 9.4 MB: a 2 MB /dev/shm cannot hold it. Two epochs
    (15 steps each) train, the warning is said once, nothing is left in /dev/shm."""
    run_dir = tmp_path / "run"
    out, _, left = in_mount_namespace("/dev/shm", "2m", [
        *TRAIN, f"data.shards={demo_shards}", f"run.dir={run_dir}", "data.num_workers=1", "train.max_steps=17"],
        after="ls -A /dev/shm")
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = [line for line in out.stderr.splitlines() if "batch ring" in line]
    assert len(warnings) == 1 and "shared memory (/dev/shm)" in warnings[0], out.stderr[-3000:]
    assert (run_dir / "DONE").is_file()
    assert [r["step"] for r in records(run_dir) if "loss" in r] == list(range(1, 18))
    assert left.split() == []  # no torch_* segment left behind


@needs_unshare
def test_a_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(demo_shards, tmp_path):
    """A checkpoint of the tiny run is ~55 MB: an 80 MB run dir holds the step-2 one, not step 4's."""
    mount = tmp_path / "small"
    mount.mkdir()
    run_dir = mount / "run"
    verify = ("from pathlib import Path; from rehamot.training.checkpoint import verify_checkpoint; "
              "verify_checkpoint(Path('checkpoints/step-00000002')); print('intact')")
    out, _, listing = in_mount_namespace(mount, "80m", [
        *TRAIN, f"data.shards={demo_shards}", f"run.dir={run_dir}", "train.max_steps=6", "train.save_every=2"],
        after=f'cd "{run_dir}" && ls checkpoints && cat checkpoints/latest && "{sys.executable}" -c "{verify}"')
    assert_one_line(out, 2, str(run_dir / "checkpoints" / "step-00000004"), "could not save this checkpoint",
                    "No space left on device", "the previous checkpoints are intact")
    # the step-2 checkpoint is `latest` and verifies; no .partial folder is left
    assert listing.split() == ["latest", "step-00000002", "step-00000002", "intact"], listing


STOP_AT_HOOK = """
import os
import signal


def kill(trainer):
    train_step = trainer.train_step

    def step(batch):
        if trainer.step == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return train_step(batch)

    trainer.train_step = step
"""


def test_a_killed_and_resumed_run_logs_each_step_once(demo_shards, tmp_path):
    """Checkpoint at step 4, step 5 logged, kill -9 before step 6; the resume takes step 5 again
    (and is killed in turn after step 7: the end of the run is not what is checked)."""
    (tmp_path / "kill_hook.py").write_text(STOP_AT_HOOK)
    run_dir = tmp_path / "run"
    common = [f"data.shards={demo_shards}", f"run.dir={run_dir}", "train.max_steps=10", "train.save_every=4"]
    env = {"REHAMOT_TEST_HOOK": "kill_hook:kill", "PYTHONPATH": str(tmp_path)}
    out = train(common, env={**env, "KILL_AT": "5"})
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    assert [r["step"] for r in records(run_dir) if "loss" in r] == [1, 2, 3, 4, 5]
    out = train([*common, "resume=latest"], env={**env, "KILL_AT": "7"})
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    assert "resumed from" in out.stdout and "step-00000004" in out.stdout, out.stdout[-2000:]
    assert [r["step"] for r in records(run_dir) if "loss" in r] == list(range(1, 8))  # once each, in order
