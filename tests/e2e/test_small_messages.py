"""What the commands say: --help names the command and every choice, a wrong path says it does not
exist (instead of suggesting to build or download something there), timings are labelled."""
from __future__ import annotations

import re
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_RUN, run_cli

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent


def train(args: list[str], cwd: Path | None = None):
    kwargs = {"cwd": cwd} if cwd else {}
    return run_cli([str(VENV_BIN / "rehamot-train"), *args], check=False, **kwargs)


def one_line_refusal(out) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rehamot: ") and "Traceback" not in out.stderr, out.stderr
    return lines[0]


def test_shards_help_names_the_command_as_installed():
    for command in ([str(VENV_BIN / "rehamot-shards"), "--help"], [sys.executable, "shards/make_shards.py", "--help"],
                    [str(VENV_BIN / "rehamot-shards"), "verify", "--help"]):
        usage = run_cli(command).stdout.splitlines()[0]
        assert usage.startswith("usage: rehamot-shards"), usage


def test_train_help_lists_the_choices_of_every_choice_option():
    from rehamot.config import Config

    text = train(["--help"]).stdout
    lines = {line.split("=", 1)[0].strip(): line for line in text.splitlines() if re.match(r"^  [a-z_]+\.\w+=", line)}
    assert "[sh | mh | droptriple | infonce]" in lines["loss.name"]
    assert "[constant | step | cosine]" in lines["train.schedule"]
    sections = [f for f in fields(Config) if is_dataclass(f.default_factory)]
    for section in sections:
        for option in fields(section.default_factory):
            if option.metadata.get("choices"):
                assert f"[{' | '.join(option.metadata['choices'])}]" in lines[f"{section.name}.{option.name}"]
    assert len(sections) == 5


def test_a_wrong_shard_path_is_said_not_to_exist(tmp_path):
    line = one_line_refusal(train([f"data.shards={tmp_path / 'no' / 'such'}"]))
    assert f"shard folder {tmp_path / 'no' / 'such'} does not exist" in line
    assert "demo" not in line  # building demo shards at a mistyped path helps nobody
    # the demo's own default folder, not built yet: that one is worth building
    line = one_line_refusal(train([], cwd=tmp_path))
    assert "shard folder data/demo does not exist" in line and "make demo" in line


def test_a_missing_text_model_folder_is_not_offered_a_download(demo_shards, tmp_path):
    missing = tmp_path / "models" / "my-bert"
    line = one_line_refusal(train([f"data.shards={demo_shards}", f"run.dir={tmp_path / 'run'}",
                                   f"model.text_model={missing}"]))
    assert f"text model folder {missing} does not exist" in line and "hf download" not in line
    # a hub id is what a download fetches (offline here: the test environment sets HF_HUB_OFFLINE)
    line = one_line_refusal(train([f"data.shards={demo_shards}", f"run.dir={tmp_path / 'run'}",
                                   "model.text_model=rehamot-test/no-such-model"]))
    assert "hf download rehamot-test/no-such-model" in line
    assert not (tmp_path / "run").exists()


def test_the_generation_evaluator_labels_its_time(demo_shards, tmp_path):
    from rehamot.evaluation.generation_eval import read_split

    run_dir = tmp_path / "run"
    run_cli([sys.executable, "rehamot/train.py", "configs/demo.yaml", *TINY_RUN, f"data.shards={demo_shards}",
             f"run.dir={run_dir}", "train.max_steps=2", "train.val_every=100"])
    folder = tmp_path / "generated"
    folder.mkdir()
    _, _, motions = read_split(str(demo_shards), "test")
    for motion_id, motion in motions.items():  # the real motions stand in for generated ones
        np.save(folder / f"{motion_id}.npy", motion, allow_pickle=False)
    out = run_cli([sys.executable, "rehamot/evaluate_generation.py", str(run_dir), "--generated", str(folder),
                   "--batch-size", "8", "--repeats", "2"])
    last = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"evaluation time: \d+\.\d s", last), last
