from __future__ import annotations

from pathlib import Path

import pytest

from rehamot.config import Config, ConfigError, DEFAULT_CONFIG, load_config, to_yaml

REPO = Path(__file__).resolve().parents[2]


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_size: 16\n  lr: 1.0e-3\nloss:\n  name: mh\n")
    cfg = load_config(path, ["train.batch_size=8", "loss.threshold_text=0.9", "resume=latest"])
    assert cfg.train.batch_size == 8          # override beats file
    assert cfg.train.lr == pytest.approx(1e-3)  # file beats default
    assert cfg.loss.name == "mh"
    assert cfg.loss.threshold_text == pytest.approx(0.9)
    assert cfg.train.epochs == Config().train.epochs  # schema default
    assert cfg.resume == "latest"


@pytest.mark.parametrize("override, key", [
    ("train.bach_size=3", "train.bach_size"),
    ("train.batch_size=abc", "train.batch_size"),
    ("nosuch.key=1", "nosuch"),
    ("model.finetune_lm=maybe", "model.finetune_lm"),
])
def test_unknown_keys_and_wrong_types_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_choices_and_malformed_override():
    with pytest.raises(ConfigError, match="loss.name"):
        load_config(None, ["loss.name=triplet"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["seed"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent.yaml")


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n  warmup: 2\n")
    with pytest.raises(ConfigError, match="train.warmup"):
        load_config(path)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(DEFAULT_CONFIG, ["train.decay_steps=[10,20]", "run.dir=/x/y"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


@pytest.mark.parametrize("name", ["demo.yaml", "humanml3d.yaml", "kitml.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.train.batch_size > 0
