"""Config files from someone else: read once, size-checked, parsed with YAML's safe loader, and
every problem is one line naming the file (exit 2 from `train.py`), never a traceback or a
command run. The `seed` option's range is one every derived seed accepts."""
from __future__ import annotations

import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from conftest import assert_refused, run_cli

from rehamot.config import MAX_CONFIG_BYTES, MAX_CONFIG_VALUES, ConfigError, load_config

MAX_SEED = 2**32 - 1


def billion_laughs(levels: int = 9) -> str:
    """Nine levels of nine aliases each: 9**9 (387 million) strings once expanded."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def bad_files(marker: Path) -> dict[str, tuple[str, str]]:
    """name -> (file text, a fragment of the refusal)."""
    return {
        "syntax": ("train:\n  epochs: [1, 2\n", "line 3"),
        "list": ("- seed\n- 3\n", "the top level must be a mapping"),
        "scalar": ("42\n", "the top level must be a mapping"),
        "os_system": (f"seed: !!python/object/apply:os.system ['touch {marker}']\n", "is not allowed"),
        "python_name": ("run:\n  name: !!python/name:os.system\n", "is not allowed"),
        "python_object": (f"x: !!python/object/new:subprocess.Popen [['touch', '{marker}']]\n", "is not allowed"),
        "billion_laughs": (billion_laughs(), f"more than {MAX_CONFIG_VALUES} values"),
        "self_alias": ("a: &a [*a]\n", "nested more than"),
        "deep": ("x: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested more than"),
        "over_1mb": ("# padding\n" * (MAX_CONFIG_BYTES // 10) + "seed: 7\n", "over 1 MB"),
    }


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def train(config: Path, *overrides: str):
    return run_cli([sys.executable, "rehamot/train.py", str(config), *overrides], timeout=120, check=False)


@pytest.mark.parametrize("name", list(bad_files(Path("m"))))
def test_a_bad_config_file_is_one_line_naming_it(name, tmp_path):
    marker = tmp_path / "executed"
    text, fragment = bad_files(marker)[name]
    path = write(tmp_path, name, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and fragment in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["syntax", "scalar", "os_system", "billion_laughs", "over_1mb"])
def test_train_refuses_a_bad_config_file_before_anything_runs(name, tmp_path):
    marker = tmp_path / "executed"
    text, fragment = bad_files(marker)[name]
    path = write(tmp_path, name, text)
    out = train(path, f"run.dir={tmp_path / 'run'}")
    assert_refused(out, str(path), fragment)
    assert not marker.exists()  # the tag was never a command
    assert not (tmp_path / "run").exists()  # so the file was never copied anywhere


def test_an_alias_bomb_is_refused_quickly_in_bounded_memory(tmp_path):
    path = write(tmp_path, "bomb", billion_laughs())
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ConfigError, match="values"):
            load_config(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 5
    assert peak < 20 * 2**20, peak


def test_a_file_just_under_the_limit_loads(tmp_path):
    text = "seed: 7\n"
    text = "#" * (MAX_CONFIG_BYTES - len(text) - 1) + "\n" + text
    path = write(tmp_path, "padded", text)
    assert path.stat().st_size == MAX_CONFIG_BYTES
    assert load_config(path).seed == 7


def test_plain_anchors_and_aliases_still_work(tmp_path):
    path = write(tmp_path, "aliases", "model:\n  d_model: &width 48\n  ff: 96\n  embed_dim: *width\n")
    cfg = load_config(path)
    assert (cfg.model.d_model, cfg.model.embed_dim) == (48, 48)


def test_an_empty_file_is_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "empty", "")) == load_config(None)


def test_a_wrong_key_in_the_file_names_the_file_and_the_key(tmp_path):
    path = write(tmp_path, "typo", "train:\n  epochz: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "train.epochz" in str(err.value)


# --------------------------------------------------------------------------- the seed


@pytest.mark.parametrize("seed", ["-1", str(2**70), str(MAX_SEED + 1)])
def test_a_seed_out_of_range_is_refused(seed):
    with pytest.raises(ConfigError, match=r"seed=.*must be in \[0, 2\*\*32 - 1\]"):
        load_config(None, [f"seed={seed}"])


@pytest.mark.parametrize("seed", ["-1", str(2**70)])
def test_train_refuses_a_seed_out_of_range(seed, tmp_path):
    out = train(Path("configs/demo.yaml"), f"seed={seed}", f"run.dir={tmp_path / 'run'}")
    assert_refused(out, f"seed={seed}: must be in [0, 2**32 - 1]")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("seed", [0, MAX_SEED])
def test_every_seed_derived_from_the_range_is_valid(seed):
    """The bounds reach every consumer: accelerate's set_seed (random, numpy's legacy seed,
    torch), the per-step torch seed, and the loader's SeedSequence keys."""
    import numpy as np
    import torch

    from rehamot.training.accelerator import set_seed
    from rehamot.training.trainer import step_seed

    cfg = load_config(None, [f"seed={seed}"])
    set_seed(cfg.seed)
    torch.manual_seed(step_seed(cfg.seed, 10**9, 4095))
    np.random.default_rng([cfg.seed, 10**6, 4095, 255, 10**9]).random()
