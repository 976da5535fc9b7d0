"""Both towers in one module, because DeepSpeed (and one DDP wrapper) take a single model."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rehamot.models.motion_encoder import MotionEncoder, MotionEncoderConfig
from rehamot.models.text_encoder import TextEncoder, TextEncoderConfig

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's cap: the temperature never goes below 0.01


@dataclass
class TwoTowerConfig:
    motion: MotionEncoderConfig = field(default_factory=MotionEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    init_temperature: float = 0.07
    # Only InfoNCE uses the temperature. Under DDP a trainable parameter that no loss touches
    # is an error, so turn this off for SH / MH / DropTriple runs.
    learn_temperature: bool = True


class TwoTower(nn.Module):
    def __init__(self, cfg: TwoTowerConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or TwoTowerConfig()
        if cfg.motion.embed_dim != cfg.text.embed_dim:
            raise ValueError(f"joint spaces differ: motion {cfg.motion.embed_dim}, text {cfg.text.embed_dim}")
        self.cfg = cfg
        self.motion = MotionEncoder(cfg.motion)
        self.text = TextEncoder(cfg.text)
        self.logit_scale = nn.Parameter(
            torch.tensor(math.log(1.0 / cfg.init_temperature)), requires_grad=cfg.learn_temperature
        )

    def temperature(self) -> Tensor:
        """InfoNCE temperature, a 0-d tensor with grad; clamped to [0.01, 1]."""
        return torch.exp(-self.logit_scale.clamp(0.0, MAX_LOGIT_SCALE))

    def encode_motion(self, motion: Tensor, motion_mask: Tensor | None = None) -> Tensor:
        return self.motion(motion, motion_mask)

    def encode_text(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        text_features: Tensor | None = None,
    ) -> Tensor:
        """From token ids, or from pooled LM features precomputed with a frozen LM."""
        if text_features is not None:
            if self.text.finetune:
                raise ValueError("text_features are frozen-LM features; the LM is being fine-tuned")
            return self.text.head(text_features)
        if input_ids is None or attention_mask is None:
            raise ValueError("encode_text needs input_ids and attention_mask, or text_features")
        return self.text(input_ids, attention_mask)

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """batch: motion (B, T, F), motion_mask (B, T) bool, and either input_ids +
        attention_mask (B, L) or text_features (B, H). Returns unit (motion_emb, text_emb)."""
        motion_emb = self.encode_motion(batch["motion"], batch.get("motion_mask"))
        text_emb = self.encode_text(
            batch.get("input_ids"), batch.get("attention_mask"), batch.get("text_features")
        )
        return motion_emb, text_emb

    def param_groups(
        self, lr: float, lm_lr: float, weight_decay: float = 0.0
    ) -> list[dict[str, Any]]:
        """Optimizer groups "motion", "heads" (text projection + logit scale) and "lm".

        Only trainable parameters are listed: the "lm" group is left out while the LM is
        frozen. (A fine-tuned LM that waits for `model.lm_unfreeze_step` is trainable from the
        start with lr 0: DDP and DeepSpeed fix the trainable set when they wrap the model.)
        """
        motion = [p for p in self.motion.parameters() if p.requires_grad]
        heads = [p for p in (*self.text.projection.parameters(), self.logit_scale) if p.requires_grad]
        lm = list(self.text.backbone.parameters()) if self.text.finetune else []
        groups = [
            {"name": "motion", "params": motion, "lr": lr, "weight_decay": weight_decay},
            {"name": "heads", "params": heads, "lr": lr, "weight_decay": weight_decay},
            {"name": "lm", "params": lm, "lr": lm_lr, "weight_decay": weight_decay},
        ]
        return [group for group in groups if group["params"]]
