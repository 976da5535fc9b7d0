"""The run directory's identity: its name, the resolved config and what launched it."""
from __future__ import annotations

import json
import os
import platform
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
