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

RECORDED_PACKAGES = ("torch", "accelerate", "deepspeed", "transformers", "webdataset", "numpy", "omegaconf")
RECORDED_ENV = ("ACCELERATE_CONFIG_FILE", "SLURM_JOB_ID", "MASTER_ADDR", "MASTER_PORT")


def new_run_dir(cfg: Config) -> Path:
    """run.dir, or <run.root>/<run.name>-<date>-<time> (decide on rank 0 and broadcast it)."""
    if cfg.run.dir is not None:
        return Path(cfg.run.dir)
    return Path(cfg.run.root) / f"{cfg.run.name}-{datetime.now():%Y%m%d-%H%M%S}"


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
