from __future__ import annotations

from pathlib import Path

import pytest

from rehamot.config import DEFAULT_CONFIG, Config, ConfigError, load_config, to_yaml

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


def _attributes_read(exclude: str) -> set[str]:
    """Every attribute name read anywhere in rehamot/ outside `exclude`."""
    import ast

    names: set[str] = set()
    for path in (REPO / "rehamot").rglob("*.py"):
        if path.name != exclude:
            names |= {n.attr for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.Attribute)}
    return names


def test_every_component_option_has_a_schema_key():
    from rehamot.config import LossConfig, build_component
    from rehamot.data import DataConfig, data_config
    from rehamot.models.factory import motion_config, text_config

    cfg = load_config(DEFAULT_CONFIG)
    # build_component refuses a component field that has neither a schema key nor an explicit value
    assert data_config(cfg, "val").split == "val"
    assert motion_config(cfg, 251).feature_dim == 251
    assert text_config(cfg).max_length == cfg.data.max_text_len
    assert isinstance(cfg.loss, LossConfig)  # the objective takes the schema section itself
    with pytest.raises(TypeError, match="DataConfig.split has no schema key"):
        build_component(DataConfig, cfg.data)


def test_every_schema_key_reaches_the_code_that_uses_it():
    from rehamot.config import schema_options
    from rehamot.models.factory import TEXT_KEYS

    read = _attributes_read(exclude="config.py") | set(TEXT_KEYS.values())
    unused = [key for key, _, _ in schema_options() if key.rsplit(".", 1)[-1] not in read]
    assert unused == []


@pytest.mark.parametrize("override, component, field, value", [
    ("model.text_dropout=0.3", "text", "dropout", 0.3),
    ("model.text_layers=2", "text", "num_layers", 2),
    ("model.activation=relu", "motion", "activation", "relu"),
    ("model.length_chunks=3", "motion", "length_chunks", 3),
    ("data.length_buckets=4", "data", "length_buckets", 4),
    ("data.max_text_len=17", "text", "max_length", 17),
])
def test_schema_values_reach_the_components(override, component, field, value):
    from rehamot.data import data_config
    from rehamot.models.factory import motion_config, text_config

    cfg = load_config(DEFAULT_CONFIG, [override])
    built = {"text": text_config(cfg), "motion": motion_config(cfg, 263), "data": data_config(cfg, "train")}[component]
    assert getattr(built, field) == value


def test_per_direction_thresholds_are_settable():
    from rehamot.loss.pairs import DropThresholds, drop_thresholds

    cfg = load_config(None, ["loss.threshold_mode=per_direction", "loss.threshold_anchor=0.6",
                             "loss.threshold_candidate=0.8"])
    assert drop_thresholds(cfg.loss) == DropThresholds(mt_motion=0.6, mt_text=0.8, tm_motion=0.8, tm_text=0.6)


@pytest.mark.parametrize("override, message", [
    ("train.log_every=0", "train.log_every=0: must be >= 1"),
    ("train.epochs=0", "train.epochs=0: must be >= 1"),
    ("train.max_steps=0", "train.max_steps=0: must be >= 1"),
    ("data.num_workers=-1", "data.num_workers=-1: must be >= 0"),
    ("train.lr=nan", "train.lr=nan: must be a finite number"),
    ("loss.threshold_motion=1.5", r"loss.threshold_motion=1.5: must be a cosine in \(-1, 1\]"),
    ("loss.threshold_text=-2", r"loss.threshold_text=-2.0: must be a cosine"),
    ("loss.warmup_steps=3", "warm-up in steps or in epochs"),  # demo.yaml sets warmup_epochs
])
def test_out_of_range_values_are_refused_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEFAULT_CONFIG, [override])


def test_help_lists_every_key_with_its_default():
    from rehamot.config import options_help, schema_options

    text = options_help()
    for key, _, _ in schema_options():
        assert f"  {key}=" in text
    assert "loss.threshold_anchor=0.7" in text and "train.max_steps=null" in text
