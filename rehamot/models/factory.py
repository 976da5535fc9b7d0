"""Build the two-tower model and its tokenizer from a run config."""
from __future__ import annotations

from rehamot.config import Config, build_component
from rehamot.models import (
    MotionEncoderConfig,
    TextEncoderConfig,
    TwoTower,
    TwoTowerConfig,
    load_tokenizer,
)

# TextEncoderConfig field -> model.* key, where the schema names it for the whole model
TEXT_KEYS = {"model": "text_model", "finetune": "finetune_lm", "num_layers": "text_layers",
             "dropout": "text_dropout", "length_chunks": "text_length_chunks"}


def text_config(cfg: Config) -> TextEncoderConfig:
    return build_component(TextEncoderConfig, cfg.model, TEXT_KEYS, max_length=cfg.data.max_text_len)


def motion_config(cfg: Config, feature_dim: int) -> MotionEncoderConfig:
    # positions for the longest evaluation cut plus the summary token, at least the paper's 512
    return build_component(MotionEncoderConfig, cfg.model, feature_dim=feature_dim,
                           max_len=max(512, cfg.data.max_len + 1))


def build_model(cfg: Config, feature_dim: int) -> TwoTower:
    # The temperature is a parameter only when InfoNCE uses it: an unused trainable parameter
    # would break DDP, and weight decay would drift it.
    infonce = "infonce" in (cfg.loss.name, cfg.loss.warmup_loss if _has_warmup(cfg) else None)
    model = TwoTower(TwoTowerConfig(motion=motion_config(cfg, feature_dim), text=text_config(cfg),
                                    init_temperature=cfg.loss.temperature, learn_temperature=infonce))
    if cfg.model.compile:
        # In place (nn.Module.compile): the state-dict keys stay those of the eager tower, so
        # checkpoints and exported bundles load either way. Compiles lazily, at the first
        # forward and once more when the motion length first changes (dynamic shapes).
        model.motion.compile()
    return model


def _has_warmup(cfg: Config) -> bool:
    return cfg.loss.warmup_steps > 0 or cfg.loss.warmup_epochs > 0


def build_tokenizer(cfg: Config):
    return load_tokenizer(text_config(cfg))
