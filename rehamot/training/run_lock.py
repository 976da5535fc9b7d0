"""One run per run directory: an exclusive lock file, RUN_DIR/run.lock.

The main process creates it with O_EXCL (atomic on local filesystems and on NFSv3+) and writes
who holds it: host, pid, SLURM job id, start time. A second run on the same directory is
refused at once, naming the holder. Taking over is allowed in two cases only:
- a stale lock: same host, and the holder's pid is no longer alive (a crash, a kill -9);
- a requeued SLURM job: the same SLURM_JOB_ID as the holder (SLURM ends a job's processes
  before it requeues it, possibly on another node).
A holder on another host cannot be checked from here: its lock is never taken over (remove
the file by hand once you know that run is gone). The lock is removed when the run ends,
preempted or not.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

LOCK_FILE = "run.lock"


class RunDirLocked(RuntimeError):
    """Another run holds the run directory; the message names it."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('started')}"


@dataclass
class RunLock:
    path: Path
    note: str | None = None  # set when a lock was taken over: say so

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_FILE
        me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
              "started": datetime.now().isoformat(timespec="seconds")}
        note = None
        for _ in range(2):  # at most one take-over, then one more try
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    holder = {}
                reason = cls._takeover_reason(holder, me)
                if reason is None:
                    raise RunDirLocked(
                        f"{run_dir} is in use by another run ({_describe(holder)}; lock {path}). Use another "
                        f"run.dir, or remove {path} if that run is gone.") from None
                note = f"{path}: took over the lock of {_describe(holder)} ({reason})"
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(me, handle)
            return cls(path, note)
        raise RunDirLocked(f"{run_dir}: another run took the lock {path} at the same moment")

    @staticmethod
    def _takeover_reason(holder: dict, me: dict) -> str | None:
        if me["slurm_job_id"] and holder.get("slurm_job_id") == me["slurm_job_id"]:
            return "the same SLURM job, requeued"
        if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
            return "that process is gone"
        return None

    def release(self) -> None:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
