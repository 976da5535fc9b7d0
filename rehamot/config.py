"""Typed training configuration: schema defaults <- YAML file <- dotted `key=value` overrides.

OmegaConf structured configs do the merging and the checking: an unknown key or a value of
the wrong type is an error that names the key. The resolved config written to a run
directory reloads under the same schema (`load_config(run_dir / "config.yaml")`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import MISSING, OmegaConf  # noqa: F401  (MISSING re-exported for callers)
from omegaconf.errors import OmegaConfBaseException

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


@dataclass
class RunSection:
    dir: Optional[str] = None  # unset: chosen once on rank 0 as <root>/<name>-<time>, broadcast
    root: str = "runs"
    name: str = "rehamot"


@dataclass
class DataSection:
    shards: str = "data/demo"  # folder holding manifest.json, or a URL prefix
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    num_workers: int = 1
    min_len: Optional[int] = None  # training crop: None = min(T, max_len) frames at a random start
    max_len: int = 196  # training crop window and evaluation cut, frames
    shuffle_buffer: int = 1000
    max_text_len: int = 64
    strict: bool = False  # corrupt samples: skip and count (False) or raise (True)
    length_buckets: int = 0  # n > 1: batches from pools of n sorted by length (less padding)


@dataclass
class ModelSection:
    text_model: Optional[str] = None  # None: the embedded all-MiniLM-L6-v2; else hub name or path
    pooling: str = "auto"  # auto | mean | cls
    text_layers: Optional[int] = None  # keep only the first N LM layers (fast tests)
    finetune_lm: bool = False
    lm_unfreeze_step: int = 0  # with finetune_lm: LM lr stays 0 until this optimizer step
    # With a frozen LM (finetune_lm false) each training caption's pooled LM features are
    # computed once and cached (rehamot/text_cache.py); false: run the LM every step
    text_cache: bool = True
    text_cache_dir: Optional[str] = None  # None: <shards>/text-cache if writable, else <run.root>/text-cache
    d_model: int = 256
    layers: int = 3
    heads: int = 4
    ff: int = 1024
    dropout: float = 0.1
    embed_dim: int = 1024
    # Training runs the motion tower on this many length-sorted groups of each batch's rows,
    # each cut to its own longest motion: same embeddings and batches, less padding.
    # 0 = auto: 8 on CPU, 1 (off) on GPUs, where the extra launches cost more than the padding
    length_chunks: int = 0
    # The same for the language model's captions (fine-tuned LM, evaluation); 0 = auto: 4 on CPU
    text_length_chunks: int = 0
    compile: bool = False  # torch.compile the motion tower in place (slower on CPU: benchmarks.md)


@dataclass
class LossSection:
    name: str = "droptriple"  # sh | mh | droptriple | infonce
    margin: float = 0.2
    threshold_motion: float = 0.75
    threshold_text: float = 0.75
    threshold_mode: str = "symmetric"  # symmetric | per_direction (the MMAsia code's 0.7/0.9)
    warmup_loss: str = "sh"
    warmup_steps: int = 0
    warmup_epochs: int = 0
    chunk_size: int = 0  # loss columns per chunk; 0: auto (~4M score cells per chunk)
    temperature: float = 0.07  # InfoNCE initial temperature (learnable)


@dataclass
class TrainSection:
    epochs: int = 10
    max_steps: Optional[int] = None  # optimizer steps; stops early
    batch_size: int = 32  # per process and per optimizer step
    # GradCache (rehamot/grad_cache.py): split each step's batch into k micro-batches; the loss
    # still sees every negative of the global batch. Must divide batch_size; DDP only.
    micro_batches: int = 1
    lr: float = 2e-4
    lm_lr: float = 2e-5
    weight_decay: float = 0.0
    # AdamW as one fused kernel per parameter (CPU and GPU): 7.6x faster a step than the
    # per-parameter loop over the fine-tuned model's 26M parameters (benchmarks.md)
    fused_adamw: bool = True
    grad_clip: float = 0.0  # max global grad norm; 0 disables
    schedule: str = "step"  # constant | step | cosine
    lr_warmup_steps: int = 0
    decay_steps: list[int] = field(default_factory=list)  # "step" schedule: x decay_factor at each
    decay_factor: float = 0.1
    log_every: int = 10
    val_every: int = 0  # optimizer steps; 0: at the end of every epoch
    save_every: int = 0  # optimizer steps; 0: at the end of every epoch
    keep_checkpoints: int = 2
    nonfinite: str = "skip"  # skip | stop: what a NaN/inf loss on any rank does
    collective_timeout_s: int = 300  # a dead rank makes the others fail after this
    eval_batch_size: int = 128


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossSection = field(default_factory=LossSection)
    train: TrainSection = field(default_factory=TrainSection)
    seed: int = 1234
    resume: Optional[str] = None  # a checkpoint path, or "latest" (no checkpoint: start fresh)


_CHOICES = {
    "model.pooling": ("auto", "mean", "cls"),
    "loss.name": ("sh", "mh", "droptriple", "infonce"),
    "loss.warmup_loss": ("sh", "mh", "droptriple", "infonce"),
    "loss.threshold_mode": ("symmetric", "per_direction"),
    "train.schedule": ("constant", "step", "cosine"),
    "train.nonfinite": ("skip", "stop"),
}


def _check_choices(cfg: Config) -> None:
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(allowed)}")
    if cfg.train.batch_size < 1:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size}: must be >= 1")
    if cfg.train.micro_batches < 1 or cfg.train.batch_size % cfg.train.micro_batches:
        raise ConfigError(f"train.micro_batches={cfg.train.micro_batches}: must be >= 1 and divide "
                          f"train.batch_size={cfg.train.batch_size} (each step's batch is split evenly)")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Schema defaults, then the YAML file (if any), then `key=value` overrides."""
    try:
        merged = OmegaConf.structured(Config)
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        reason = str(getattr(err, "msg", err)).splitlines()[0]
        raise ConfigError(f"config key {key!r}: {reason}") from None
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    _check_choices(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]
