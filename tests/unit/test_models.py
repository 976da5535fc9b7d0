"""The motion tower and the two-tower wrapper."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub from tests

import math

import pytest
import torch
from torch.profiler import profile

from rehamot.data import tokenize
from rehamot.models import (
    MotionEncoder,
    MotionEncoderConfig,
    TextEncoderConfig,
    TwoTower,
    TwoTowerConfig,
    load_tokenizer,
)

PAPER_MOTION_PARAMS = 2_700_288  # Linear(263->256) + token + 3 post-norm layers + Linear(256->1024)


def small_motion(**overrides) -> MotionEncoderConfig:
    return MotionEncoderConfig(**{"feature_dim": 12, "d_model": 32, "layers": 2, "heads": 4, "ff": 64,
                                  "embed_dim": 48, "dropout": 0.0, **overrides})


def padded(motion: torch.Tensor, length: int, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """motion (T, F) padded to `length` with `fill`, and its mask, as a batch of one."""
    frames, features = motion.shape
    out = torch.full((1, length, features), fill)
    out[0, :frames] = motion
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[0, :frames] = True
    return out, mask


def test_paper_motion_encoder_shapes_unit_norm_and_size() -> None:
    torch.manual_seed(0)
    encoder = MotionEncoder(MotionEncoderConfig())
    params = sum(p.numel() for p in encoder.parameters())
    assert 2_600_000 < params < 2_800_000 and params == PAPER_MOTION_PARAMS
    motion = torch.randn(3, 20, 263)
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, 12:] = False
    emb = encoder(motion, mask)
    assert emb.shape == (3, 1024)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
    assert encoder.encoder.layers[0].activation_relu_or_gelu and not encoder.encoder.layers[0].norm_first
    assert "positions" not in encoder.state_dict()  # derived from the config


@pytest.mark.parametrize("mode", ["train_grad", "eval_no_grad"])
def test_padding_does_not_change_the_embedding(mode: str) -> None:
    torch.manual_seed(1)
    encoder = MotionEncoder(small_motion())
    encoder.train(mode == "train_grad")
    motion = torch.randn(17, 12)
    with torch.set_grad_enabled(mode == "train_grad"):
        reference = encoder(*padded(motion, 17, 0.0))
        for length, fill in ((18, 0.0), (40, 1e4), (90, float("nan"))):
            torch.testing.assert_close(encoder(*padded(motion, length, fill)), reference, atol=1e-5, rtol=0)
        # Inside a batch next to a longer motion, padded to the batch maximum.
        other = torch.randn(1, 60, 12)
        batch = torch.cat((padded(motion, 60, -3.0)[0], other))
        mask = torch.cat((padded(motion, 60, 0.0)[1], torch.ones(1, 60, dtype=torch.bool)))
        torch.testing.assert_close(encoder(batch, mask)[0], reference[0], atol=1e-5, rtol=0)
    # A frame that is valid does matter.
    changed = motion.clone()
    changed[-1] += 1.0
    assert (encoder(*padded(changed, 17, 0.0)) - reference).abs().max() > 1e-3


def test_attention_runs_through_sdpa_and_the_fast_path_agrees() -> None:
    torch.manual_seed(2)
    encoder = MotionEncoder(small_motion())
    motion = torch.randn(3, 25, 12)
    mask = torch.ones(3, 25, dtype=torch.bool)
    mask[0, 10:] = False
    mask[2, 20:] = False
    encoder.train()
    with profile() as prof:
        slow = encoder(motion, mask)
    assert "aten::scaled_dot_product_attention" in {event.name for event in prof.events()}
    encoder.eval()
    with torch.no_grad(), profile() as prof:
        fast = encoder(motion, mask)
    assert "aten::_transformer_encoder_layer_fwd" in {event.name for event in prof.events()}
    torch.testing.assert_close(fast, slow.detach(), atol=1e-5, rtol=0)


def test_summary_token_is_learned_and_read_out() -> None:
    torch.manual_seed(3)
    encoder = MotionEncoder(small_motion())
    assert encoder.summary_token.shape == (32,) and encoder.summary_token.requires_grad
    motion = torch.randn(2, 9, 12)
    before = encoder(motion)
    before.sum().backward()
    assert encoder.summary_token.grad is not None and encoder.summary_token.grad.abs().sum() > 0
    with torch.no_grad():
        encoder.summary_token.add_(1.0)
    assert (encoder(motion) - before).abs().max() > 1e-3


def test_dropout_is_configurable_and_off_in_eval() -> None:
    torch.manual_seed(4)
    encoder = MotionEncoder(small_motion(dropout=0.3))
    motion = torch.randn(2, 9, 12)
    encoder.train()
    assert (encoder(motion) - encoder(motion)).abs().max() > 1e-4
    encoder.eval()
    torch.testing.assert_close(encoder(motion), encoder(motion), atol=0, rtol=0)


def test_bad_inputs_fail_clearly() -> None:
    encoder = MotionEncoder(small_motion(max_len=16))
    assert encoder(torch.randn(1, 15, 12)).shape == (1, 48)
    with pytest.raises(ValueError, match="16 frames"):
        encoder(torch.randn(1, 16, 12))
    with pytest.raises(ValueError, match="motion must be"):
        encoder(torch.randn(1, 8, 13))
    with pytest.raises(ValueError, match="mask must be bool"):
        encoder(torch.randn(1, 8, 12), torch.ones(1, 8))


# --- the two-tower wrapper, with a 1-layer MiniLM ------------------------------------------

def two_tower_config(**text) -> TwoTowerConfig:
    return TwoTowerConfig(motion=small_motion(),
                          text=TextEncoderConfig(num_layers=1, embed_dim=48, dropout=0.0, **text))


@pytest.fixture(scope="module")
def frozen_model() -> TwoTower:
    torch.manual_seed(5)
    return TwoTower(two_tower_config())


@pytest.fixture(scope="module")
def batch(frozen_model: TwoTower) -> dict[str, torch.Tensor]:
    torch.manual_seed(6)
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, 7:] = False
    captions = ["a person walks in a circle", "someone waves with the left hand", "a man sits down"]
    return {"motion": torch.randn(3, 20, 12), "motion_mask": mask,
            **tokenize(load_tokenizer(frozen_model.cfg.text), captions, max_length=64)}


def test_frozen_text_features_give_the_same_embeddings_as_tokens(frozen_model: TwoTower, batch) -> None:
    frozen_model.train()
    motion_a, text_a = frozen_model(batch)
    features = frozen_model.text.features(batch["input_ids"], batch["attention_mask"])
    cached = {"motion": batch["motion"], "motion_mask": batch["motion_mask"], "text_features": features}
    motion_b, text_b = frozen_model(cached)
    torch.testing.assert_close(text_b, text_a, atol=1e-6, rtol=0)
    torch.testing.assert_close(motion_b, motion_a, atol=1e-6, rtol=0)
    assert text_a.shape == motion_a.shape == (3, 48)
    with pytest.raises(ValueError, match="input_ids"):
        frozen_model({"motion": batch["motion"], "motion_mask": batch["motion_mask"]})


def test_cached_features_are_refused_while_fine_tuning(batch) -> None:
    model = TwoTower(two_tower_config(finetune=True))
    features = model.text.features(batch["input_ids"], batch["attention_mask"]).detach()
    with pytest.raises(ValueError, match="fine-tuned"):
        model({"motion": batch["motion"], "motion_mask": batch["motion_mask"], "text_features": features})


def _assert_exact_cover(model: TwoTower, groups: list[dict]) -> None:
    listed = [id(p) for group in groups for p in group["params"]]
    assert len(listed) == len(set(listed)), "a parameter is in two groups"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable <= set(listed), "a trainable parameter is in no group"


def test_param_groups_cover_every_trainable_parameter_once(frozen_model: TwoTower) -> None:
    groups = frozen_model.param_groups(lr=2e-4, lm_lr=2e-5, weight_decay=0.01)
    assert [g["name"] for g in groups] == ["motion", "heads"]
    _assert_exact_cover(frozen_model, groups)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in frozen_model.parameters() if p.requires_grad}
    heads = next(g for g in groups if g["name"] == "heads")
    assert any(p is frozen_model.logit_scale for p in heads["params"]) and len(heads["params"]) == 3

    tuned = TwoTower(two_tower_config(finetune=True))
    groups = tuned.param_groups(lr=1e-4, lm_lr=1e-5)
    assert [g["name"] for g in groups] == ["motion", "heads", "lm"]
    _assert_exact_cover(tuned, groups)
    assert len({id(p) for g in groups for p in g["params"]}) == sum(1 for _ in tuned.parameters())


def test_temperature_starts_at_0_07_is_clamped_and_optional(frozen_model: TwoTower) -> None:
    assert frozen_model.temperature().item() == pytest.approx(0.07, rel=1e-6)
    model = TwoTower(two_tower_config())
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.temperature().item() == pytest.approx(0.01, rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.2))
    model.temperature().backward()
    assert model.logit_scale.grad.item() == pytest.approx(-0.2, rel=1e-5)  # d/ds exp(-s)

    fixed = TwoTower(TwoTowerConfig(motion=small_motion(), learn_temperature=False,
                                    text=TextEncoderConfig(num_layers=1, embed_dim=48)))
    assert not fixed.logit_scale.requires_grad
    heads = next(g for g in fixed.param_groups(lr=1e-3, lm_lr=1e-4) if g["name"] == "heads")
    assert all(p is not fixed.logit_scale for p in heads["params"])
    with pytest.raises(ValueError, match="joint spaces differ"):
        TwoTower(TwoTowerConfig(motion=small_motion(), text=TextEncoderConfig(num_layers=1, embed_dim=64)))
