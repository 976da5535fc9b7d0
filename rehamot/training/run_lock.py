"""One run per run directory: an exclusive lock file, RUN_DIR/run.lock.

The main process writes who it is (host, pid, SLURM job id, start time) into a temporary file
of its own, flushes it to disk, then hard-links it to RUN_DIR/run.lock. link(2) never replaces
an existing name, so the lock appears whole or not at all: a full disk fails on the temporary
file and leaves no lock behind. link is atomic on local filesystems and on NFS (the server does
it); a retransmitted NFS request can report a link that did happen as failed, so the outcome
is read from the temporary file's link count (2: ours), as open(2)'s manual advises.

A second run on the same directory is refused at once, naming the holder. Taking over is
allowed in two cases only:
- a stale lock: same host, and the holder's pid is no longer alive (a crash, a kill -9);
- a requeued SLURM job: the same SLURM_JOB_ID as the holder (SLURM ends a job's processes
  before it requeues it, possibly on another node).
A holder on another host cannot be checked from here: its lock is never taken over (remove
the file by hand once you know that run is gone). A lock that is not one this module wrote
(empty, garbage) is never taken over either: it names no process to check, so the refusal
says to remove it once no run uses the directory. The lock is removed when the run ends,
preempted or not.

Take-overs are serialized by flock(2) on a sidecar file, RUN_DIR/run.lock.takeover, which is
never deleted (see `_takeover_guard`).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from rehamot.data.pipeline import pid_alive

LOCK_FILE = "run.lock"
TAKEOVER_FILE = LOCK_FILE + ".takeover"


class RunDirLocked(RuntimeError):
    """The run directory cannot be taken (another run holds it, or its lock is unusable); the
    message names the lock file and what to do."""


def _describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('started')}"


def _read_holder(path: Path) -> dict | None:
    """The holder a lock names; None when the lock is gone (released meanwhile). Raises
    RunDirLocked for a lock that names no checkable holder."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise RunDirLocked(_unusable(path, f"unreadable: {err}")) from None
    try:
        holder = json.loads(text)
    except ValueError:
        holder = None
    if not (isinstance(holder, dict) and isinstance(holder.get("host"), str)
            and isinstance(holder.get("pid"), int)):
        shown = repr(text[:40]) if text.strip() else "empty"
        raise RunDirLocked(_unusable(path, f"not a run lock ({shown})"))
    return holder


def _unusable(path: Path, what: str) -> str:
    return (f"{path} is {what}: it names no run to check, so it is never taken over; remove it "
            f"once no run uses {path.parent}")


def _link_exclusive(content: str, path: Path) -> bool:
    """Create `path` holding `content` whole, or return False if it exists. A full or read-only
    disk raises RunDirLocked naming the file, and leaves no lock behind."""
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as err:
            raise RunDirLocked(f"{path}: cannot write the run lock ({err.strerror or err}); is the run "
                               "directory writable, the disk full?") from None
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError as err:
            if os.stat(tmp).st_nlink != 2:
                raise RunDirLocked(f"{path}: cannot create the run lock ({err.strerror or err})") from None
        return os.stat(tmp).st_nlink == 2
    finally:
        try:
            tmp.unlink()
        except OSError:
            pass


@contextmanager
def _takeover_guard(run_dir: Path) -> Iterator[None]:
    """Only one process at a time decides on and replaces a stale lock.

    Without it two processes that both read the same stale holder could each remove "it" and
    one could remove the other's fresh lock: both would own the directory. Renaming the stale
    lock aside has the same hole (the name may hold a new lock by the time it is renamed, and
    putting it back races with new takers). An exclusive flock on a file that is never deleted
    (so every taker locks the same inode) makes read-check-replace one step. Linux's NFS client
    maps flock to NFS byte-range locks, honoured across clients (unless mounted local_lock=).
    Creating a lock where there is none needs no guard: link() alone is exclusive.
    """
    guard = run_dir / TAKEOVER_FILE
    try:
        fd = os.open(guard, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise RunDirLocked(f"{guard}: cannot open it to take the run lock over ({err.strerror or err})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


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
        content = json.dumps(me)
        if _link_exclusive(content, path):
            return cls(path)
        with _takeover_guard(run_dir):
            holder = _read_holder(path)  # read again under the guard: it may be a new run's by now
            if holder is None:  # released meanwhile
                if _link_exclusive(content, path):
                    return cls(path)
                holder = _read_holder(path) or {}
            reason = cls._takeover_reason(holder, me)
            if reason is None:
                raise RunDirLocked(
                    f"{run_dir} is in use by another run ({_describe(holder)}; lock {path}). Use another "
                    f"run.dir, or remove {path} if that run is gone.")
            path.unlink(missing_ok=True)
            if not _link_exclusive(content, path):  # a run that needed no take-over came first
                raise RunDirLocked(f"{run_dir}: another run took the lock {path} at the same moment")
        return cls(path, f"{path}: took over the lock of {_describe(holder)} ({reason})")

    @staticmethod
    def _takeover_reason(holder: dict, me: dict) -> str | None:
        if me["slurm_job_id"] and holder.get("slurm_job_id") == me["slurm_job_id"]:
            return "the same SLURM job, requeued"
        if holder.get("host") == me["host"] and not pid_alive(holder["pid"]):
            return "that process is gone"
        return None

    def release(self) -> None:
        try:
            holder = _read_holder(self.path)
        except RunDirLocked:
            return
        if holder is not None and holder["pid"] == os.getpid() and holder["host"] == socket.gethostname():
            self.path.unlink(missing_ok=True)
