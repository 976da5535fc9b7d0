"""One run per run dir: a live holder is refused by name, stale and requeued holders are taken over."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from rehamot.training.run_lock import LOCK_FILE, RunDirLocked, RunLock


def _write_holder(run_dir, **holder):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps({"started": "2026-01-01T00:00:00", **holder}))


def test_a_live_holder_in_another_process_is_refused_by_name(tmp_path):
    code = ("import sys, time; from pathlib import Path; from rehamot.training.run_lock import RunLock; "
            "RunLock.acquire(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirLocked, match=f"in use by another run \\(pid {holder.pid} on "):
            RunLock.acquire(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    taken = RunLock.acquire(tmp_path)  # the holder is gone now: stale, taken over
    assert "that process is gone" in taken.note and str(holder.pid) in taken.note
    taken.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_requeued_slurm_job_takes_its_own_lock_over(tmp_path, monkeypatch):
    _write_holder(tmp_path, host="node-elsewhere", pid=1, slurm_job_id="4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock = RunLock.acquire(tmp_path)
    assert "the same SLURM job, requeued" in lock.note
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == socket.gethostname()


def test_another_host_or_job_is_never_taken_over(tmp_path, monkeypatch):
    _write_holder(tmp_path, host="node-elsewhere", pid=1, slurm_job_id="4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    with pytest.raises(RunDirLocked, match="pid 1 on node-elsewhere, SLURM job 4242"):
        RunLock.acquire(tmp_path)
    monkeypatch.delenv("SLURM_JOB_ID")
    with pytest.raises(RunDirLocked, match=f"remove {tmp_path / LOCK_FILE}"):
        RunLock.acquire(tmp_path)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "node-elsewhere"  # untouched


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _take(run_dir: str, barrier, results) -> None:
    from pathlib import Path

    barrier.wait()
    try:
        RunLock.acquire(Path(run_dir))
        results.put("won")
    except RunDirLocked:
        results.put("refused")


def test_many_processes_taking_over_a_stale_lock_at_once_leave_one_winner(tmp_path):
    """Each winner keeps the lock (never releases it), so a second winner is a real double owner."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    takers = 20
    for trial in range(20):
        run_dir = tmp_path / f"run{trial}"
        _write_holder(run_dir, host=socket.gethostname(), pid=_dead_pid(), slurm_job_id=None)
        barrier, results = ctx.Barrier(takers), ctx.Queue()
        procs = [ctx.Process(target=_take, args=(str(run_dir), barrier, results)) for _ in range(takers)]
        for proc in procs:
            proc.start()
        outcomes = sorted(results.get(timeout=60) for _ in procs)
        for proc in procs:
            proc.join(timeout=60)
        assert outcomes.count("won") == 1, (trial, outcomes)
        holder = json.loads((run_dir / LOCK_FILE).read_text())
        assert holder["pid"] in {proc.pid for proc in procs}
