"""The model: its two towers, how a config builds it, and how a trained one is stored.

`motion_encoder`, `text_encoder` (any Hugging Face encoder), `two_tower` (their wrapper),
`length_chunks` (length-sorted groups on CPU), `factory` (a model from the config) and `bundle`
(exported bundles: safetensors weights, config, Mean/Std, checksums; `load_bundle`).

May import the foundation (`rehamot.config`, `rehamot.checksums`) only: no data, loss,
torch.distributed or accelerate.
"""
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
