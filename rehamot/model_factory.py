"""Build the two-tower model and its tokenizer from a run config."""
from __future__ import annotations

from rehamot.config import Config
from rehamot.models import (
    MotionEncoderConfig,
    TextEncoderConfig,
    TwoTower,
    TwoTowerConfig,
    load_tokenizer,
)


def text_config(cfg: Config) -> TextEncoderConfig:
    m = cfg.model
    return TextEncoderConfig(
        model=m.text_model,
        pooling=m.pooling,
        finetune=m.finetune_lm,
        embed_dim=m.embed_dim,
        num_layers=m.text_layers,
        max_length=cfg.data.max_text_len,
        length_chunks=m.text_length_chunks,
    )


def build_model(cfg: Config, feature_dim: int) -> TwoTower:
    m = cfg.model
    motion = MotionEncoderConfig(
        feature_dim=feature_dim,
        d_model=m.d_model,
        layers=m.layers,
        heads=m.heads,
        ff=m.ff,
        dropout=m.dropout,
        max_len=max(512, cfg.data.max_len + 1),
        embed_dim=m.embed_dim,
        length_chunks=m.length_chunks,
    )
    # The temperature is a parameter only when InfoNCE uses it: an unused trainable parameter
    # would break DDP, and weight decay would drift it.
    infonce = "infonce" in (cfg.loss.name, cfg.loss.warmup_loss if _has_warmup(cfg) else None)
    model = TwoTower(TwoTowerConfig(motion=motion, text=text_config(cfg), init_temperature=cfg.loss.temperature,
                                    learn_temperature=infonce))
    if m.compile:
        # In place (nn.Module.compile): the state-dict keys stay those of the eager tower, so
        # checkpoints and exported bundles load either way. Compiles lazily, at the first
        # forward and once more when the motion length first changes (dynamic shapes).
        model.motion.compile()
    return model


def _has_warmup(cfg: Config) -> bool:
    return cfg.loss.warmup_steps > 0 or cfg.loss.warmup_epochs > 0


def build_tokenizer(cfg: Config):
    return load_tokenizer(text_config(cfg))
