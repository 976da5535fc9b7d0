"""The motion tower's training hot path: fast_dropout, EncoderLayer, the compile flag."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.profiler import profile

from rehamot.models.motion_encoder import (
    EncoderLayer,
    MotionEncoder,
    MotionEncoderConfig,
    dropout_keep_probability,
    fast_dropout,
)


def small(**overrides) -> MotionEncoderConfig:
    return MotionEncoderConfig(**{"feature_dim": 12, "d_model": 32, "layers": 2, "heads": 4, "ff": 64,
                                  "embed_dim": 48, "dropout": 0.1, **overrides})


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    motion = torch.randn(3, 25, 12, generator=gen)
    mask = torch.ones(3, 25, dtype=torch.bool)
    mask[0, 10:] = False
    mask[2, 19:] = False
    return motion, mask


def plain_copy(encoder: MotionEncoder) -> MotionEncoder:
    """The same weights on nn.TransformerEncoderLayer's own path (the layout before the fast-dropout encoder layer)."""
    plain = copy.deepcopy(encoder)
    for layer in plain.encoder.layers:
        layer.__class__ = nn.TransformerEncoderLayer
    return plain


# --- fast_dropout ---------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_rate_and_scaling_are_inverted_dropout(p):
    torch.manual_seed(0)
    n = 2_000_003  # not a multiple of the four draws per 64-bit word
    out = fast_dropout(torch.ones(n), p)
    q = dropout_keep_probability(p)
    assert abs(q - (1 - p)) <= 2**-17
    dropped = (out == 0).double().mean().item()
    assert abs(dropped - (1 - q)) < 5 * math.sqrt(p * (1 - p) / n)  # 5 sigma
    values = out.unique()
    assert len(values) == 2 and values[0] == 0 and values[1].item() == pytest.approx(1 / q, rel=1e-7)
    assert abs(out.double().mean().item() - 1.0) < 5 * math.sqrt(p / (1 - p) / n)  # E[out] = x
    # The four 16-bit draws of one word are independent: neighbours drop together with p^2.
    both = ((out[:-1] == 0) & (out[1:] == 0)).double().mean().item()
    assert abs(both - (1 - q) ** 2) < 5 * math.sqrt((1 - q) ** 2 / n)


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(1)
    x = torch.randn(4, 7, 33, requires_grad=True)
    out = fast_dropout(x, 0.2)
    grad = torch.randn_like(out)
    out.backward(grad)
    keep = out.detach() != 0
    torch.testing.assert_close(x.grad, grad * keep / dropout_keep_probability(0.2), rtol=1e-6, atol=0)
    torch.testing.assert_close(out[keep], (x[keep] / dropout_keep_probability(0.2)).detach(), rtol=1e-6, atol=0)


def test_masks_follow_the_torch_seed_and_rng_state():
    x = torch.ones(10_000)
    torch.manual_seed(7)
    first = fast_dropout(x, 0.1)
    state = torch.get_rng_state()
    second = fast_dropout(x, 0.1)
    torch.manual_seed(7)
    assert torch.equal(fast_dropout(x, 0.1), first)
    assert not torch.equal(first, second)
    torch.set_rng_state(state)  # what GradCache's replay does
    assert torch.equal(fast_dropout(x, 0.1), second)


def test_identity_when_not_training_and_edge_rates():
    x = torch.randn(100)
    assert fast_dropout(x, 0.5, training=False) is x
    assert fast_dropout(x, 0.0) is x
    assert torch.equal(fast_dropout(x, 1.0), torch.zeros(100))
    with pytest.raises(ValueError, match="dropout rate"):
        fast_dropout(x, 1.5)


# --- EncoderLayer in the tower ----------------------------------------------------------------

def test_without_dropout_the_training_path_equals_the_plain_layer():
    torch.manual_seed(2)
    encoder = MotionEncoder(small(dropout=0.0)).train()
    plain = plain_copy(encoder)
    motion, mask = padded_batch()
    with profile() as prof:
        ours = encoder(motion, mask)
    names = {event.name for event in prof.events()}
    # No dropout: PyTorch's SDPA (its CPU flash kernel) with the padding mask.
    assert "aten::scaled_dot_product_attention" in names
    assert any("flash_attention" in name for name in names)
    reference = plain(motion, mask)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)
    ours.square().sum().backward()
    reference.square().sum().backward()
    for (name, a), b in zip(encoder.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_dropout_path_draws_no_bernoulli_and_is_seeded():
    torch.manual_seed(3)
    encoder = MotionEncoder(small()).train()
    motion, mask = padded_batch()
    with profile() as prof:
        torch.manual_seed(10)
        first = encoder(motion, mask)
    names = {event.name for event in prof.events()}
    assert "aten::random_" in names and "aten::bernoulli_" not in names
    torch.manual_seed(10)
    torch.testing.assert_close(encoder(motion, mask), first, atol=0, rtol=0)
    assert (encoder(motion, mask) - first).abs().max() > 1e-4  # fresh masks
    # Padded frames never leak through the dropout path: NaN padding, same seed, same output.
    poisoned = motion.masked_fill(~mask.unsqueeze(-1), float("nan"))
    torch.manual_seed(11)
    clean = encoder(motion, mask)
    torch.manual_seed(11)
    torch.testing.assert_close(encoder(poisoned, mask), clean, atol=0, rtol=0)
    # Rates are read from the nn.Dropout modules at call time: all zero -> deterministic.
    for module in encoder.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    encoder.encoder.layers[0].self_attn.dropout = 0.0
    encoder.encoder.layers[1].self_attn.dropout = 0.0
    torch.testing.assert_close(encoder(motion, mask), encoder(motion, mask), atol=0, rtol=0)


def test_eval_is_the_fused_fast_path_and_identity_of_dropout():
    torch.manual_seed(4)
    encoder = MotionEncoder(small(dropout=0.5)).eval()
    motion, mask = padded_batch()
    with torch.no_grad(), profile() as prof:
        a = encoder(motion, mask)
    assert "aten::_transformer_encoder_layer_fwd" in {event.name for event in prof.events()}
    with torch.no_grad():
        torch.testing.assert_close(encoder(motion, mask), a, atol=0, rtol=0)
    torch.testing.assert_close(plain_copy(encoder)(motion, mask).detach(), a, atol=1e-5, rtol=0)


def test_state_dicts_are_the_plain_layout_both_ways():
    torch.manual_seed(5)
    encoder = MotionEncoder(small())
    assert isinstance(encoder.encoder.layers[0], EncoderLayer)
    # A checkpoint of the old layout: the same module tree with nn.TransformerEncoderLayer.
    old = plain_copy(MotionEncoder(small()))
    assert list(old.state_dict()) == list(encoder.state_dict())
    encoder.load_state_dict(old.state_dict(), strict=True)
    motion, mask = padded_batch(1)
    with torch.no_grad():
        torch.testing.assert_close(encoder.eval()(motion, mask), old.eval()(motion, mask), atol=0, rtol=0)
    fresh = plain_copy(MotionEncoder(small()))
    fresh.load_state_dict(encoder.state_dict(), strict=True)


# --- length chunks: the batch run as length-sorted row groups -----------------------------------

def ragged_batch(seed: int, rows: int = 9, frames: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, frames + 1, (rows,), generator=gen)
    lengths[3] = frames  # one full row
    mask = torch.arange(frames)[None, :] < lengths[:, None]
    motion = torch.randn(rows, frames, 12, generator=gen).masked_fill(~mask.unsqueeze(-1), float("nan"))
    return motion, mask


@pytest.mark.parametrize("chunks", [2, 4, 9, 50])
def test_length_chunks_give_the_same_embeddings_and_gradients(chunks):
    torch.manual_seed(6)
    whole = MotionEncoder(small(dropout=0.0, layers=1)).train()
    chunked = MotionEncoder(small(dropout=0.0, layers=1, length_chunks=chunks)).train()
    chunked.load_state_dict(whole.state_dict())
    motion, mask = ragged_batch(chunks)
    with profile(record_shapes=True) as prof:
        ours = chunked(motion, mask)
    # One tower pass per group (capped at the batch size), each no longer than its longest row.
    passes = [e for e in prof.events() if e.name == "aten::linear" and e.input_shapes
              and len(e.input_shapes[0]) == 3 and e.input_shapes[0][-1] == 12]
    assert len(passes) == min(chunks, 9)
    assert sum(shape[0] * shape[1] for shape in (e.input_shapes[0] for e in passes)) < 9 * 40
    reference = whole(motion, mask)
    torch.testing.assert_close(ours, reference, atol=2e-6, rtol=0)
    weights = torch.randn_like(ours)
    (ours * weights).sum().backward()
    (reference * weights).sum().backward()
    for (name, a), b in zip(chunked.named_parameters(), whole.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_length_chunks_replay_the_same_dropout_masks_and_skip_eval():
    torch.manual_seed(7)
    encoder = MotionEncoder(small(length_chunks=3)).train()
    motion, mask = ragged_batch(1)
    state = torch.get_rng_state()
    with torch.no_grad():
        first = encoder(motion, mask)  # GradCache's no-grad pass ...
    torch.set_rng_state(state)
    torch.testing.assert_close(encoder(motion, mask).detach(), first, atol=0, rtol=0)  # ... and its replay
    encoder.eval()
    with torch.no_grad(), profile() as prof:
        fast = encoder(motion, mask)
    assert [e.name for e in prof.events()].count("aten::_transformer_encoder_layer_fwd") == 2  # one pass
    with pytest.raises(ValueError, match="length_chunks"):
        MotionEncoder(small(length_chunks=-1))
    assert torch.isfinite(fast).all()


def test_compile_flag_compiles_the_motion_tower_in_place():
    from rehamot.config import load_config
    from rehamot.models.factory import build_model

    cfg = load_config(None, ["model.d_model=32", "model.layers=1", "model.heads=2", "model.ff=64",
                             "model.embed_dim=48", "model.text_layers=1", "model.compile=true"])
    model = build_model(cfg, feature_dim=12)
    assert model.motion.cfg.length_chunks == 0  # model.length_chunks, the config default (auto)
    assert model.motion._compiled_call_impl is not None  # compiles lazily, at the first call
    assert model.text._compiled_call_impl is None
    eager = MotionEncoder(MotionEncoderConfig(feature_dim=12, d_model=32, layers=1, heads=2, ff=64, embed_dim=48))
    assert list(model.motion.state_dict()) == list(eager.state_dict())  # checkpoints load either way


def test_auto_length_chunks_follow_the_device():
    from rehamot.models.length_chunks import auto_chunks

    assert auto_chunks(0, torch.device("cpu"), 8) == 8
    assert auto_chunks(0, torch.device("cuda"), 8) == 1  # only the device type is read
    assert auto_chunks(3, torch.device("cuda"), 8) == 3  # an explicit value is kept anywhere
    encoder = MotionEncoder(small(dropout=0.0, layers=1, length_chunks=0)).train()
    motion, mask = ragged_batch(3)
    with profile(record_shapes=True) as prof:
        encoder(motion, mask)
    passes = [e for e in prof.events() if e.name == "aten::linear" and e.input_shapes
              and len(e.input_shapes[0]) == 3 and e.input_shapes[0][-1] == 12]
    assert len(passes) == 8  # auto on CPU: 8 groups of the 9 rows
