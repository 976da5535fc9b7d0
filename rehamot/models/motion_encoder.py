"""The paper's motion tower: frames -> one unit vector in the joint space.

Linear(F->d), a learnable summary token prepended, sinusoidal positions, a post-norm GELU
transformer encoder with a padding mask, the token's output L2-normalised, projected to the
joint space and L2-normalised again (the order of the original code).

Attention runs through PyTorch's scaled-dot-product attention: in training,
`nn.MultiheadAttention` calls `F.scaled_dot_product_attention` because
`nn.TransformerEncoderLayer` asks for no attention weights; in eval under `torch.no_grad()`
the fused encoder fast path takes over and packs the padded batch into a nested tensor.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# nn.TransformerEncoder's inference fast path packs padded batches into nested tensors and
# warns once per process that they are a prototype; the path is exact (tests check it).
warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")


@dataclass
class MotionEncoderConfig:
    feature_dim: int = 263  # HumanML3D; KIT-ML is 251
    d_model: int = 256
    layers: int = 3
    heads: int = 4
    ff: int = 1024
    dropout: float = 0.1
    activation: str = "gelu"
    max_len: int = 512  # positions, the summary token's included: at most max_len - 1 frames
    embed_dim: int = 1024


def sinusoidal_positions(max_len: int, dim: int) -> Tensor:
    """The Transformer paper's table (max_len, dim): sin on even channels, cos on odd."""
    position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim)
    table[:, 0::2] = torch.sin(position * div_term)
    table[:, 1::2] = torch.cos(position * div_term[: dim // 2])
    return table


class MotionEncoder(nn.Module):
    def __init__(self, cfg: MotionEncoderConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or MotionEncoderConfig()
        if cfg.d_model % cfg.heads:
            raise ValueError(f"d_model {cfg.d_model} is not divisible by heads {cfg.heads}")
        self.cfg = cfg
        self.input_proj = nn.Linear(cfg.feature_dim, cfg.d_model)
        # randn as in the original; post-norm layers make its scale irrelevant.
        self.summary_token = nn.Parameter(torch.randn(cfg.d_model))
        # Derived from the config, so kept out of checkpoints.
        self.register_buffer("positions", sinusoidal_positions(cfg.max_len, cfg.d_model), persistent=False)
        self.input_dropout = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(
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
        # Padded frames are zeroed so that even NaN/inf padding cannot leak through 0 * x.
        motion = torch.where(mask.unsqueeze(-1), motion, 0.0).to(self.input_proj.weight.dtype)
        x = self.input_proj(motion)
        token = self.summary_token.to(x.dtype).expand(batch, 1, -1)
        x = torch.cat((token, x), dim=1) + self.positions[: frames + 1].to(x.dtype)
        x = self.input_dropout(x)
        valid = torch.cat((torch.ones(batch, 1, dtype=torch.bool, device=mask.device), mask), dim=1)
        x = self.encoder(x, src_key_padding_mask=~valid)
        return x[:, 0]

    def forward(self, motion: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, T, F), (B, T) -> unit embeddings (B, embed_dim)."""
        token = F.normalize(self.summary(motion, mask), dim=-1)
        return F.normalize(self.projection(token), dim=-1)
