"""Shared fixtures: offline text models, the demo shards built once per session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_cli(args: list[str], timeout: float = 600, env: dict[str, str] | None = None, check: bool = True,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """A small demo corpus (300 motions) sharded once for the whole test session."""
    out = tmp_path_factory.mktemp("demo") / "shards"
    run_cli([sys.executable, "shards/make_shards.py", "demo", "--motions", "300", "--out", str(out),
             "--workers", "2", "--shard-mb", "2"])
    return out
