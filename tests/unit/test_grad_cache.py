"""GradCache on one process: micro-batch splitting, exactness against one big batch, dropout
replay and the RNG rule, with the real TwoTower (a small motion transformer and the packaged
MiniLM cut to 1 layer, fine-tuned so that its gradients are checked too)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub from tests

import copy

import pytest
import torch
from torch import Tensor, nn

from rehamot.config import ConfigError, LossConfig, load_config
from rehamot.data import tokenize
from rehamot.loss.grad_cache import backward_through_cache, embed_without_grad, split_micro_batches
from rehamot.loss.objective import GlobalBatchObjective
from rehamot.models import MotionEncoderConfig, TextEncoderConfig, TwoTower, TwoTowerConfig, load_tokenizer

MICRO = 4  # k micro-batches ...
MICRO_ROWS = 3  # ... of this many rows: one batch of 12
TOLERANCE = 1e-6
# An untrained encoder maps everything close together: thresholds near 1 drop some pairs.
LOSSES = {
    "droptriple": dict(name="droptriple", threshold_motion=0.99, threshold_text=0.95, chunk_size=5),
    "infonce": dict(name="infonce", chunk_size=5),
}
# Per-row motion lengths (of 9 padded frames): micro-batch 0 is at most 4 long, 2 at most 7.
# Row 7 is motion 1 again (another caption).
LENGTHS = [2, 4, 3, 9, 5, 6, 3, 4, 7, 8, 9, 4]
CAPTIONS = ["a person walks forward", "someone jumps twice", "a man waves his left hand",
            "the woman turns right slowly", "a person kicks with the right leg", "someone sits down"]

_BASE: dict[float, nn.Module] = {}


def make_model(dropout: float, learn_temperature: bool) -> TwoTower:
    """float64, fixed seed; the MiniLM load happens once per dropout value."""
    if dropout not in _BASE:
        torch.manual_seed(1234)
        cfg = TwoTowerConfig(
            motion=MotionEncoderConfig(feature_dim=5, d_model=16, layers=1, heads=2, ff=32, dropout=dropout,
                                       embed_dim=12),
            text=TextEncoderConfig(model=None, finetune=True, embed_dim=12, num_layers=1, dropout=dropout),
        )
        base = TwoTower(cfg).double()
        # The 30522 x 384 token table stays frozen: its gradient would be ~94 MB per case.
        base.text.backbone.embeddings.word_embeddings.weight.requires_grad_(False)
        _BASE[dropout] = base
    model = copy.deepcopy(_BASE[dropout])
    model.logit_scale.requires_grad_(learn_temperature)
    return model


def make_inputs() -> dict[str, Tensor]:
    rows, frames = len(LENGTHS), 9
    gen = torch.Generator().manual_seed(11)
    lengths = torch.tensor(LENGTHS)
    # A per-motion offset, or an untrained encoder would map every motion to nearly one point.
    motion = 4 * torch.randn(rows, 1, 5, generator=gen, dtype=torch.float64) + torch.randn(
        rows, frames, 5, generator=gen, dtype=torch.float64)
    mask = torch.arange(frames)[None, :] < lengths[:, None]
    ids = torch.arange(rows, dtype=torch.int64) * 10
    ids[7] = ids[1]  # another caption of motion 1 in another micro-batch: not a negative
    motion[7], mask[7] = motion[1], mask[1]
    tokens = tokenize(load_tokenizer(TextEncoderConfig()), [CAPTIONS[i % len(CAPTIONS)] for i in range(rows)], 16)
    return {"motion": motion, "motion_mask": mask, "lengths": lengths, "motion_index": ids, **tokens}


def objective_loss(objective: GlobalBatchObjective, model: TwoTower, motion_emb: Tensor, text_emb: Tensor,
                   ids: Tensor):
    # The trainer's expression for the logit scale (clamped temperature).
    out = objective(motion_emb, text_emb, ids, step=0, epoch=0, logit_scale=-torch.log(model.temperature()))
    return out


def grads_of(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_grads_close(got: dict[str, Tensor], want: dict[str, Tensor], tolerance: float = TOLERANCE) -> None:
    assert got.keys() == want.keys()
    total = torch.sqrt(sum(w.norm() ** 2 for w in want.values()))
    for name, w in want.items():
        # A gradient that is structurally zero (attention key biases: softmax ignores a shift)
        # is rounding noise on both sides: compare it against the total norm instead.
        scale = max(float(w.norm()), 1e-6 * float(total))
        error = float((got[name] - w).norm())
        assert error <= tolerance * scale, (name, error, scale)


def one_batch_reference(model: TwoTower, inputs: dict[str, Tensor], objective: GlobalBatchObjective):
    motion_emb, text_emb = model(inputs)
    out = objective_loss(objective, model, motion_emb, text_emb, inputs["motion_index"])
    out.loss.backward()
    return out


def grad_cache_run(model: TwoTower, inputs: dict[str, Tensor], objective: GlobalBatchObjective,
                   forward=None):
    forward = forward or model
    cached = embed_without_grad(forward, inputs, MICRO)
    out = objective_loss(objective, model, cached.motion, cached.text, inputs["motion_index"])
    loss_params = [model.logit_scale] if model.logit_scale.requires_grad else []
    backward_through_cache(cached, out.loss, forward, loss_params=loss_params)
    return out, cached


# ----------------------------------------------------------------------------- splitting


def test_split_slices_every_batched_tensor_and_trims_each_motion_padding() -> None:
    inputs = make_inputs()
    inputs["text_features"] = torch.randn(12, 7)  # the frozen-LM feature cache's input
    inputs["scale"] = torch.tensor(3.0)  # not batched: passed whole
    parts = split_micro_batches(inputs, MICRO)
    assert len(parts) == MICRO
    for index, part in enumerate(parts):
        rows = slice(index * MICRO_ROWS, (index + 1) * MICRO_ROWS)
        longest = max(LENGTHS[rows])
        assert part["motion"].shape == (MICRO_ROWS, longest, 5)
        assert torch.equal(part["motion"], inputs["motion"][rows, :longest])
        assert torch.equal(part["motion_mask"], inputs["motion_mask"][rows, :longest])
        for key in ("lengths", "motion_index", "input_ids", "attention_mask", "text_features"):
            assert torch.equal(part[key], inputs[key][rows]), key
        assert part["scale"] is inputs["scale"]
    assert [p["motion"].shape[1] for p in parts] == [4, 9, 7, 9]
    with pytest.raises(ValueError, match="does not split into 5"):
        split_micro_batches(inputs, 5)


def test_micro_batches_must_divide_the_batch_in_the_config() -> None:
    assert load_config(overrides=["train.batch_size=12", "train.micro_batches=4"]).train.micro_batches == 4
    with pytest.raises(ConfigError, match="train.micro_batches=5: must divide train.batch_size=12"):
        load_config(overrides=["train.batch_size=12", "train.micro_batches=5"])
    with pytest.raises(ConfigError, match="train.micro_batches=0"):
        load_config(overrides=["train.micro_batches=0"])


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_k_micro_batches_equal_one_batch_without_dropout(loss: str) -> None:
    inputs = make_inputs()
    infonce = loss == "infonce"
    objective = GlobalBatchObjective(LossConfig(**LOSSES[loss]))
    reference = make_model(0.0, infonce)
    want = one_batch_reference(reference, inputs, objective)
    model = make_model(0.0, infonce)
    got, cached = grad_cache_run(model, inputs, objective)
    got_loss, want_loss = float(got.loss.detach()), float(want.loss.detach())
    assert abs(got_loss - want_loss) <= TOLERANCE * abs(want_loss)
    assert float(got.stats["dropped"]) == float(want.stats["dropped"])
    if loss == "droptriple":
        assert float(want.stats["dropped"]) > 0  # the thresholds really drop pairs
    grads = grads_of(model)
    assert any(name.startswith("text.backbone.") for name in grads)  # the fine-tuned LM counts
    assert ("logit_scale" in grads) == infonce
    assert_grads_close(grads, grads_of(reference))
    # The leaves hold the local batch in input order, and no graph of the towers.
    assert cached.motion.shape == (12, 12) and cached.motion.grad_fn is None


# ----------------------------------------------------------------------------- dropout and RNG


def test_dropout_replay_draws_the_same_masks_and_keeps_the_rng_rule() -> None:
    inputs = make_inputs()
    objective = GlobalBatchObjective(LossConfig(**LOSSES["droptriple"]))
    model = make_model(0.1, False)
    outputs: dict[bool, list[tuple[Tensor, Tensor]]] = {False: [], True: []}

    def recording_forward(part):
        motion_emb, text_emb = model(part)
        outputs[torch.is_grad_enabled()].append((motion_emb.detach().clone(), text_emb.detach().clone()))
        return motion_emb, text_emb

    torch.manual_seed(5)
    grad_cache_run(model, inputs, objective, recording_forward)
    after_grad_cache = torch.get_rng_state()
    got = grads_of(model)
    # Each micro-batch's with-grad replay saw exactly its no-grad embeddings (same masks).
    assert len(outputs[False]) == len(outputs[True]) == MICRO
    for (m0, t0), (m1, t1) in zip(outputs[False], outputs[True]):
        assert torch.equal(m0, m1) and torch.equal(t0, t1)

    # What holds with dropout: the gradients of one graph over the k micro-batches forwarded
    # one after another from the same RNG state; the RNG ends where those k forwards leave it.
    full_graph = make_model(0.1, False)
    torch.manual_seed(5)
    embeddings = [full_graph(part) for part in split_micro_batches(inputs, MICRO)]
    assert torch.equal(torch.get_rng_state(), after_grad_cache)
    motion_emb, text_emb = (torch.cat(side) for side in zip(*embeddings))
    objective_loss(objective, full_graph, motion_emb, text_emb, inputs["motion_index"]).loss.backward()
    assert_grads_close(got, grads_of(full_graph))
    assert torch.equal(torch.cat([m for m, _ in outputs[False]]), motion_emb.detach())

    # What does not: one forward of all 12 rows draws its masks in another order.
    one_batch = make_model(0.1, False)
    torch.manual_seed(5)
    one_batch_reference(one_batch, inputs, objective)
    want = grads_of(one_batch)
    difference = torch.sqrt(sum((got[n] - want[n]).norm() ** 2 for n in want))
    assert difference > 1e-3 * torch.sqrt(sum(w.norm() ** 2 for w in want.values()))


def test_a_skipped_step_leaves_the_rng_where_a_taken_step_does() -> None:
    """The rule that keeps runs resumable: the RNG after a step is the one after its k no-grad
    forwards, whether the step's backward ran (taken) or not (non-finite loss, skipped)."""
    inputs = make_inputs()
    model = make_model(0.1, False)
    torch.manual_seed(9)
    embed_without_grad(model, inputs, MICRO)
    skipped = torch.get_rng_state()
    torch.manual_seed(9)
    grad_cache_run(model, inputs, GlobalBatchObjective(LossConfig(**LOSSES["droptriple"])))
    assert torch.equal(torch.get_rng_state(), skipped)
    torch.manual_seed(9)
    assert not torch.equal(torch.get_rng_state(), skipped)  # dropout did draw numbers
