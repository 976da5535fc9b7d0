"""Every command answers --help with its usage, installed or run from a checkout."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
BIN = Path(sys.executable).parent


def _help(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*args, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_answers_help(script):
    if not (BIN / script).exists():
        pytest.skip(f"{script} is not installed in this environment (pip install -e .)")
    out = _help([str(BIN / script)])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage" in out.stdout.lower() or script.removeprefix("rehamot-") in out.stdout


def test_train_help_lists_the_config_keys_three_ways():
    for args in ([sys.executable, "rehamot/train.py"], [sys.executable, "-m", "rehamot.train"]):
        out = _help(args)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "train.batch_size=32" in out.stdout and "loss.threshold_anchor=0.7" in out.stdout
