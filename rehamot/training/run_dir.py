"""The run directory's identity: its name, the resolved config, what launched it, and the rule
that it holds one run: a directory with a run's state is continued (resume) or explicitly
started over (run.overwrite), never restarted silently on top of the old files."""
from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from rehamot.config import Config, to_yaml
from rehamot.training.checkpoint import complete_checkpoints

RECORDED_PACKAGES = ("torch", "accelerate", "deepspeed", "transformers", "webdataset", "numpy", "omegaconf")
RECORDED_ENV = ("ACCELERATE_CONFIG_FILE", "SLURM_JOB_ID", "MASTER_ADDR", "MASTER_PORT")
# A run dir holds a run's state when it has any of these (its history or its weights).
STATE = ("checkpoints", "metrics.jsonl", "best", "final")
# Everything a run writes there (run.overwrite deletes these and nothing else; not run.lock).
RUN_FILES = (*STATE, "tensorboard", "text-cache-parts", "config.yaml", "meta.json", "DONE", "PREEMPT",
             "training_curves.png", "batch_similarity.png")
RUN_GLOBS = ("eval-*.json", "rank_histograms-*.png", "retrieval_examples-*.png")  # one per test split


class RunRefused(Exception):
    """The run must not start as configured; the message says what to do instead. `said`: the
    main process has printed it already."""

    def __init__(self, message: str, said: bool = False) -> None:
        super().__init__(message)
        self.said = said


def choose_run_dir(cfg: Config) -> tuple[Path, str | None]:
    """The run directory and, when it was looked for, one line saying which (decide on rank 0
    and broadcast it).

    run.dir when set; else with resume=latest the newest <run.root>/<run.name>-* that holds a
    complete checkpoint (names sort by their timestamp); else a new
    <run.root>/<run.name>-<date>-<time>.
    """
    if cfg.run.dir is not None:
        return Path(cfg.run.dir), None
    new = Path(cfg.run.root) / f"{cfg.run.name}-{datetime.now():%Y%m%d-%H%M%S}"
    if cfg.resume != "latest":
        return new, None
    root = Path(cfg.run.root)
    earlier = sorted(p for p in root.glob(f"{cfg.run.name}-*") if p.is_dir() and complete_checkpoints(p)) \
        if root.is_dir() else []
    if earlier:
        return earlier[-1], f"resume=latest: resuming the newest {cfg.run.name} run under {root}: {earlier[-1]}"
    return new, (f"resume=latest: no {cfg.run.name}-* run under {root} has a checkpoint; "
                 f"starting fresh in {new}")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_files(run_dir: Path, cfg: Config, launch: dict[str, Any]) -> None:
    """config.yaml (reloads under the schema) and meta.json (command, commit, versions, `launch`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    versions = {}
    for pkg in RECORDED_PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    meta = {
        "command": [sys.executable, *sys.argv],
        "launcher_env": {k: os.environ[k] for k in RECORDED_ENV if k in os.environ},
        "git_commit": git_commit(),
        "versions": versions,
        "python": platform.python_version(),
        **launch,
        "started": datetime.now().isoformat(timespec="seconds"),
    }
    (run_dir / "meta.json").write_text(json.dumps(meta, indent=1))


def run_state(run_dir: Path) -> list[str]:
    """What of a run's state `run_dir` holds (empty: nothing to continue or to lose)."""
    return [name for name in STATE if (run_dir / name).exists()]


def _inside(path: Path, folder: Path) -> bool:
    return folder.resolve() in path.resolve().parents


def check_reuse(run_dir: Path, state: list[str], resume: str | None, checkpoint: Path | None,
                overwrite: bool) -> None:
    """Refuse what would mix two runs in one directory: starting over on top of a run's state,
    or resuming into it from elsewhere, unless run.overwrite deletes that state first."""
    if overwrite and resume == "latest":
        raise RunRefused("run.overwrite=true with resume=latest: overwrite deletes the checkpoints resume=latest "
                         "would continue from; give one of them")
    if overwrite and checkpoint is not None and _inside(checkpoint, run_dir):
        raise RunRefused(f"run.overwrite=true would delete {checkpoint}, the checkpoint resume={resume} names; "
                         "resume without run.overwrite, or resume from a checkpoint outside the run dir")
    if not state or overwrite or (checkpoint is not None and _inside(checkpoint, run_dir)):
        return
    held = ", ".join(f"{name}/" if (run_dir / name).is_dir() else name for name in state)
    if resume == "latest":
        raise RunRefused(f"resume=latest: {run_dir} holds a run's history ({held}) but no checkpoint to continue "
                         "from; start over with another run.dir, or with run.overwrite=true (deletes that run's files)")
    if checkpoint is not None:
        raise RunRefused(f"{run_dir} holds another run ({held}); resuming from {checkpoint} into it would mix the "
                         "two: use another run.dir, or run.overwrite=true to delete that run's files first")
    raise RunRefused(f"{run_dir} holds a run ({held}): continue it with resume=latest, or start over with another "
                     "run.dir or run.overwrite=true (deletes that run's files)")


def clear_run(run_dir: Path) -> list[str]:
    """Delete what an earlier run wrote into `run_dir` (the caller holds its lock); the names."""
    named = [run_dir / name for name in RUN_FILES] + [p for pattern in RUN_GLOBS for p in sorted(run_dir.glob(pattern))]
    gone = [p for p in named if p.exists()]
    for path in gone:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return [p.name for p in gone]


def launch_command() -> list[str]:
    """The command line as the user typed it: under torchrun / accelerate launch (LOCAL_RANK
    set) the launcher's, the parent process; else this process's (Linux /proc, else sys.argv)."""
    pid = os.getppid() if "LOCAL_RANK" in os.environ else os.getpid()
    try:
        argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]
    except (OSError, UnicodeDecodeError):
        argv = []
    if len(argv) > 1 and Path(argv[0]).name.startswith("python") and _console_script(argv[1]):
        argv = argv[1:]  # the kernel ran `rehamot-train` / `accelerate` through its #! interpreter
    return argv or [sys.executable, *sys.argv]


def _console_script(arg: str) -> bool:
    return not arg.startswith("-") and not arg.endswith(".py") and os.path.isfile(arg) and os.access(arg, os.X_OK)


def resume_command(run_dir: Path, argv: list[str] | None = None, start_over: bool = False) -> str:
    """The command that continues this run: the original one with resume=latest and its run.dir
    (replacing any resume=, run.dir= or run.overwrite= it had); with no checkpoint to continue
    from, the one that starts it over there (run.overwrite=true)."""
    argv = launch_command() if argv is None else argv
    kept = [a for a in argv if not a.startswith(("resume=", "run.dir=", "run.overwrite="))]
    return shlex.join([*kept, "run.overwrite=true" if start_over else "resume=latest", f"run.dir={run_dir}"])
