"""The two towers: motion encoder, text encoder (any Hugging Face encoder) and their wrapper."""
from __future__ import annotations

from rehamot.models.motion_encoder import MotionEncoder, MotionEncoderConfig, sinusoidal_positions
from rehamot.models.text_encoder import (
    TextEncoder,
    TextEncoderConfig,
    check_text_model,
    detect_pooling,
    embedded_model_dir,
    load_tokenizer,
    resolve_text_model,
)
from rehamot.models.two_tower import TwoTower, TwoTowerConfig

__all__ = [
    "MotionEncoder",
    "MotionEncoderConfig",
    "TextEncoder",
    "TextEncoderConfig",
    "check_text_model",
    "TwoTower",
    "TwoTowerConfig",
    "detect_pooling",
    "embedded_model_dir",
    "load_tokenizer",
    "resolve_text_model",
    "sinusoidal_positions",
]
