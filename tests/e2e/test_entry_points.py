"""Every command answers --help with its own usage line, each way a user runs it: the console
command, the file in a checkout and `python -m`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
BIN = Path(sys.executable).parent
# console command -> (its file in the checkout, its module for `python -m`)
COMMANDS = {
    "rehamot-train": ("rehamot/train.py", "rehamot.train"),
    "rehamot-eval": ("rehamot/evaluate.py", "rehamot.evaluate"),
    "rehamot-search": ("rehamot/search.py", "rehamot.search"),
    "rehamot-render": ("rehamot/render.py", "rehamot.render"),
    "rehamot-eval-generation": ("rehamot/evaluate_generation.py", "rehamot.evaluate_generation"),
    "rehamot-shards": ("shards/make_shards.py", "shards.make_shards"),
}
WAYS = ["console", "file", "module"]


def _help(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*args, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)


def _usage_line(command: str, out: str) -> str:
    """The line that names how to call the command: argparse's, or the training usage's first."""
    if command == "rehamot-train":
        return next(line.strip() for line in out.splitlines() if line.strip().startswith("rehamot-train"))
    return out.splitlines()[0]


def test_every_console_command_is_covered():
    assert set(SCRIPTS) == set(COMMANDS)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_answers_help_with_its_own_usage(command, way):
    file, module = COMMANDS[command]
    if way == "console" and not (BIN / command).exists():
        pytest.fail(f"{command} is not installed in this environment (pip install -e .)")
    args = {"console": [str(BIN / command)], "file": [sys.executable, file],
            "module": [sys.executable, "-m", module]}[way]
    out = _help(args)
    assert out.returncode == 0, out.stderr[-2000:]
    line = _usage_line(command, out.stdout)
    if command == "rehamot-train":
        assert line.startswith("rehamot-train [CONFIG.yaml] [key=value ...]"), line
    else:
        assert line.startswith(f"usage: {command} "), line


@pytest.mark.parametrize("way", WAYS)
def test_train_help_lists_the_config_keys(way):
    args = {"console": [str(BIN / "rehamot-train")], "file": [sys.executable, "rehamot/train.py"],
            "module": [sys.executable, "-m", "rehamot.train"]}[way]
    out = _help(args)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "train.batch_size=32" in out.stdout and "loss.threshold_anchor=0.7" in out.stdout
