"""The paper's motion tower: frames -> one unit vector in the joint space.

Linear(F->d), a learnable summary token prepended, sinusoidal positions, a post-norm GELU
transformer encoder with a padding mask, the token's output L2-normalised, projected to the
joint space and L2-normalised again (the order of the original code).

The training hot path: `nn.TransformerEncoderLayer` draws its four dropout masks
per layer with `aten::bernoulli_`, which on CPU costs ~10-20 ns per element and took a
third of the original's step. `EncoderLayer` is that class (same submodules, same state-dict
keys, same eval fast path) with `fast_dropout`, which draws 16-bit uniforms four per 64-bit
word, on CPU. Attention: with attention dropout in CPU training, PyTorch's
`F.scaled_dot_product_attention` can only take its math backend (the CPU flash kernel has no
dropout), so we run the same math with the cheaper mask; without dropout (or off CPU, where
the fused kernels handle dropout themselves) it calls `F.scaled_dot_product_attention` with
the padding mask. In eval under `torch.no_grad()` the fused encoder fast path takes over and
packs the padded batch into a nested tensor.

Padding: a batch is padded to its longest motion (1.48x the real frames on HumanML3D-like
lengths at batch 32). With `length_chunks = k > 1` training runs the tower on k groups of
rows sorted by length, each cut to its own longest motion (1.05x at k = 8): the embeddings
and the batch are unchanged, unlike bucketing batches by length in the loader
(data.length_buckets), which changes which motions are each other's negatives.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rehamot.config import ModelSection
from rehamot.models.length_chunks import auto_chunks, run_by_length

NESTED_TENSOR_WARNING = "The PyTorch API of nested tensors is in prototype stage"


@dataclass
class MotionEncoderConfig:
    """The tower's settings; the defaults are the schema's (rehamot.config), written there once."""

    feature_dim: int = 263  # HumanML3D; KIT-ML is 251 (training takes it from the manifest)
    d_model: int = ModelSection.d_model
    layers: int = ModelSection.layers
    heads: int = ModelSection.heads
    ff: int = ModelSection.ff
    dropout: float = ModelSection.dropout
    activation: str = ModelSection.activation
    max_len: int = 512  # positions, the summary token's included: at most max_len - 1 frames
    embed_dim: int = ModelSection.embed_dim
    # Training runs the batch as this many groups of rows sorted by length, each trimmed to
    # its own longest motion (same embeddings, less padding: see MotionEncoder.summary).
    # Standalone default off; training passes model.length_chunks (0 = auto: CPU_LENGTH_CHUNKS on
    # CPU, 1 (off) on accelerators)
    length_chunks: int = 1


def sinusoidal_positions(max_len: int, dim: int) -> Tensor:
    """The Transformer paper's table (max_len, dim): sin on even channels, cos on odd."""
    position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim)
    table[:, 0::2] = torch.sin(position * div_term)
    table[:, 1::2] = torch.cos(position * div_term[: dim // 2])
    return table


_UNIFORM_LEVELS = 1 << 16  # fast_dropout draws uniforms on 16 bits


def dropout_keep_probability(p: float) -> float:
    """The keep probability fast_dropout realises for rate p: p rounded to 1/65536.

    |realised rate - p| <= 2**-17 (7.6e-6); torch's own CPU bernoulli_ rounds p to 2**-24.
    Kept values are scaled by 1 / this, so the expectation is exactly the input.
    """
    return (_UNIFORM_LEVELS - round(p * _UNIFORM_LEVELS)) / _UNIFORM_LEVELS


CPU_LENGTH_CHUNKS = 8  # padded/real frames 1.48 -> 1.05 on demo lengths at batch 32


def fast_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout (F.dropout's semantics) with a mask 4-5x cheaper to draw on CPU.

    One `random_` over full 64-bit words gives four 16-bit uniforms per mt19937 pair, where
    `bernoulli_` spends a generator call and a float conversion per element. The draws come
    from torch's default CPU generator, so `torch.manual_seed` (and saving/restoring its
    state, as GradCache does) reproduces the masks. Off CPU (CUDA's fused native_dropout is
    already cheap), inside torch.compile (inductor has its own RNG lowering), and for rates
    that 16 bits cannot express (p < 2**-17 or p > 1 - 2**-17), it is F.dropout.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout rate must lie in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    dropped = round(p * _UNIFORM_LEVELS)
    if (x.device.type != "cpu" or not 0 < dropped < _UNIFORM_LEVELS
            or torch.compiler.is_compiling()):
        return F.dropout(x, p, training=True)
    words = -(-x.numel() // 4)
    uniform = torch.empty(words, dtype=torch.int64).random_(-(2**63), None).view(torch.int16)
    # int16 spans [-32768, 32767]: keep the top (levels - dropped) values.
    keep = uniform[: x.numel()].view(x.shape) >= dropped - _UNIFORM_LEVELS // 2
    # A scaled mask in x's dtype, as F.dropout's own CPU path builds it (and saves it for
    # backward); the cheapest of the forms measured (benchmarks/motion_hot_path.py).
    return x * keep.to(x.dtype).mul_(1.0 / dropout_keep_probability(p))


class EncoderLayer(nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer with fast_dropout on its training path.

    Same submodules and state-dict keys (checkpoints and exported bundles of the plain layer
    load unchanged), and the eval fast path (`torch._transformer_encoder_layer_fwd`) is the
    parent's: only `_sa_block` and `_ff_block`, which the parent runs outside that path, are
    replaced. The dropout rates are read from the parent's nn.Dropout modules at call time.
    """

    def _sa_block(self, x: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
                  is_causal: bool = False) -> Tensor:
        attn = self.self_attn
        if attn_mask is not None or is_causal or not attn.batch_first or not attn._qkv_same_embed_dim:
            return super()._sa_block(x, attn_mask, key_padding_mask, is_causal)
        batch, frames, width = x.shape
        heads = attn.num_heads
        q, k, v = (F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
                   .view(batch, frames, 3, heads, width // heads).permute(2, 0, 3, 1, 4))
        # The parent's forward made the padding mask additive (0 / -inf) in x's dtype.
        bias = None if key_padding_mask is None else key_padding_mask.view(batch, 1, 1, frames)
        p = attn.dropout if self.training else 0.0
        if p > 0.0 and x.device.type == "cpu" and not torch.compiler.is_compiling():
            # What SDPA's math backend does (the only CPU backend with dropout), with our mask.
            scores = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
            if bias is not None:
                scores = scores + bias
            out = fast_dropout(scores.softmax(dim=-1), p) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        out = attn.out_proj(out.transpose(1, 2).reshape(batch, frames, width))
        return fast_dropout(out, self.dropout1.p, self.training)

    def _ff_block(self, x: Tensor) -> Tensor:
        x = fast_dropout(self.activation(self.linear1(x)), self.dropout.p, self.training)
        return fast_dropout(self.linear2(x), self.dropout2.p, self.training)


class MotionEncoder(nn.Module):
    def __init__(self, cfg: MotionEncoderConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or MotionEncoderConfig()
        if cfg.d_model % cfg.heads:
            raise ValueError(f"d_model {cfg.d_model} is not divisible by heads {cfg.heads}")
        if cfg.length_chunks < 0:
            raise ValueError(f"length_chunks must be >= 1, or 0 for auto, got {cfg.length_chunks}")
        self.cfg = cfg
        self.input_proj = nn.Linear(cfg.feature_dim, cfg.d_model)
        # randn as in the original; post-norm layers make its scale irrelevant.
        self.summary_token = nn.Parameter(torch.randn(cfg.d_model))
        # Derived from the config, so kept out of checkpoints.
        self.register_buffer("positions", sinusoidal_positions(cfg.max_len, cfg.d_model), persistent=False)
        self.input_dropout = nn.Dropout(cfg.dropout)
        layer = EncoderLayer(
            d_model=cfg.d_model,
            nhead=cfg.heads,
            dim_feedforward=cfg.ff,
            dropout=cfg.dropout,
            activation=cfg.activation,
            batch_first=True,
            norm_first=False,
        )
        # enable_nested_tensor lets the eval fast path skip padded frames entirely.
        self.encoder = nn.TransformerEncoder(layer, num_layers=cfg.layers, enable_nested_tensor=True)
        self.projection = nn.Linear(cfg.d_model, cfg.embed_dim)

    @property
    def max_frames(self) -> int:
        return self.cfg.max_len - 1

    def summary(self, motion: Tensor, mask: Tensor | None = None) -> Tensor:
        """The summary token's encoder output (B, d_model), before any normalisation.

        motion: (B, T, F) float; mask: (B, T) bool, True = valid frame (None = all valid).
        """
        if motion.dim() != 3 or motion.shape[-1] != self.cfg.feature_dim:
            raise ValueError(f"motion must be (B, T, {self.cfg.feature_dim}), got {tuple(motion.shape)}")
        batch, frames, _ = motion.shape
        if frames > self.max_frames:
            raise ValueError(
                f"motion has {frames} frames but the encoder has positions for {self.max_frames} "
                f"(max_len {self.cfg.max_len} includes the summary token): crop it or raise max_len"
            )
        if mask is None:
            mask = torch.ones(batch, frames, dtype=torch.bool, device=motion.device)
        elif mask.shape != (batch, frames) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool (B, T) = {(batch, frames)}, got {mask.dtype} {tuple(mask.shape)}")
        chunks = min(auto_chunks(self.cfg.length_chunks, motion.device, CPU_LENGTH_CHUNKS), batch)
        # The eval fast path (no grad) packs the batch into a nested tensor: no padding to save.
        if chunks > 1 and (self.training or torch.is_grad_enabled()):
            return run_by_length(mask, chunks, lambda rows, n: self._summary(motion[rows, :n], mask[rows, :n]))
        return self._summary(motion, mask)

    def _summary(self, motion: Tensor, mask: Tensor) -> Tensor:
        batch, frames, _ = motion.shape
        # Padded frames are zeroed so that even NaN/inf padding cannot leak through 0 * x.
        motion = torch.where(mask.unsqueeze(-1), motion, 0.0).to(self.input_proj.weight.dtype)
        x = self.input_proj(motion)
        token = self.summary_token.to(x.dtype).expand(batch, 1, -1)
        x = torch.cat((token, x), dim=1) + self.positions[: frames + 1].to(x.dtype)
        x = fast_dropout(x, self.input_dropout.p, self.training)
        valid = torch.cat((torch.ones(batch, 1, dtype=torch.bool, device=mask.device), mask), dim=1)
        with warnings.catch_warnings():
            # the inference fast path packs padded batches into nested tensors and warns that
            # they are a prototype; the path is exact (tests check it)
            warnings.filterwarnings("ignore", message=NESTED_TENSOR_WARNING)
            x = self.encoder(x, src_key_padding_mask=~valid)
        return x[:, 0]

    def forward(self, motion: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, T, F), (B, T) -> unit embeddings (B, embed_dim)."""
        token = F.normalize(self.summary(motion, mask), dim=-1)
        return F.normalize(self.projection(token), dim=-1)
