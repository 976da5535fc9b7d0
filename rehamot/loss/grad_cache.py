"""GradCache: one optimizer step over k micro-batches that keeps every negative.

Plain gradient accumulation scores each micro-batch only against itself, so each loss sees
1/k of the negatives. GradCache (Gao et al., 2021) keeps the whole local batch B (and, through
the objective's gather, the global batch) in one loss, while only one micro-batch of B/k rows
is ever held in the towers' autograd graph:

1. `embed_without_grad`: forward each micro-batch under `torch.no_grad`, saving the RNG state
   before each, and concatenate the outputs into leaf tensors that require grad;
2. the caller computes the global-batch objective on those leaves (its gather carries
   gradients across ranks), checks it (NaN skip, flags) as for an ordinary step, and then
3. `backward_through_cache`: d loss / d (leaves, loss parameters) by autograd, then each
   micro-batch is forwarded again with grad from its saved RNG state (same dropout masks) and
   the surrogate `sum(emb * cached_grad)` is backpropagated through the caller's `backward`
   (so accelerate's loss scaling applies), under `no_sync` for all but the last micro-batch.

With dropout off the loss and every gradient equal one forward/backward of the whole batch
(tests: 1 and 2 gloo ranks, float64, 1e-6). With dropout on they equal a full-graph run that
draws the same masks, i.e. the k micro-batches forwarded one after another from the same RNG
state; a single forward of all B rows draws its masks in another order, so it differs.

Rules:
- RNG: after `backward_through_cache` the RNG state (CPU, and CUDA when the inputs live
  there) is the one left by the k no-grad forwards, whether or not the step was skipped: a
  step consumes exactly k micro-batch forwards' worth of random numbers, so runs are
  deterministic and a checkpoint taken at a step boundary resumes bitwise.
- Parameters the loss uses directly (InfoNCE's logit scale: `loss_params`) get their gradient
  from step 2's autograd call and enter the *last* micro-batch's surrogate as
  `sum(p * grad_p)`: they are then backpropagated in DDP's synchronised backward, where DDP
  averages them like every other parameter (and a loss scaler scales them too).
- Every tensor (or list) of the inputs whose first dimension is B is sliced; others are passed
  whole. Each micro-batch's motion padding is trimmed to its own longest motion (`motion`,
  `motion_mask`): padded frames are masked out of attention, so this only saves work.
- DeepSpeed: not supported (ZeRO has no `no_sync` and divides every backward by its own
  gradient-accumulation count); the trainer refuses `train.micro_batches > 1` with it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
from torch import Tensor

Forward = Callable[[dict[str, Any]], tuple[Tensor, Tensor]]  # inputs -> (motion_emb, text_emb)
MOTION_KEYS = ("motion", "motion_mask")  # the keys padded along time (dim 1) to the longest motion

DEEPSPEED_REFUSAL = (
    "train.micro_batches > 1 (GradCache) is not supported under DeepSpeed: ZeRO has no no_sync and "
    "divides each backward by its own gradient-accumulation count, so the cached gradients would be "
    "reduced k times and scaled wrongly. Use DDP (configs/accelerate/cpu.yaml or the default launch "
    "config) for micro-batches, or train.micro_batches=1 with DeepSpeed."
)


def split_micro_batches(inputs: dict[str, Any], micro_batches: int) -> list[dict[str, Any]]:
    """Split a batch of B rows into `micro_batches` consecutive batches of B / k rows each."""
    rows = int(inputs["motion"].shape[0]) if "motion" in inputs else _batch_rows(inputs)
    if micro_batches < 1 or rows % micro_batches:
        raise ValueError(f"a batch of {rows} rows does not split into {micro_batches} equal micro-batches")
    size = rows // micro_batches
    parts = []
    for index in range(micro_batches):
        rows_slice = slice(index * size, (index + 1) * size)
        part = {key: _slice_rows(value, rows, rows_slice) for key, value in inputs.items()}
        parts.append(trim_motion_padding(part))
    return parts


def _batch_rows(inputs: dict[str, Any]) -> int:
    for value in inputs.values():
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("the inputs hold no batched tensor")


def _slice_rows(value: Any, rows: int, rows_slice: slice) -> Any:
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == rows:
        return value[rows_slice]
    if isinstance(value, (list, tuple)) and len(value) == rows:
        return value[rows_slice]
    return value


def trim_motion_padding(inputs: dict[str, Any]) -> dict[str, Any]:
    """Cut `motion` and `motion_mask` to the longest valid motion of this (micro-)batch."""
    mask = inputs.get("motion_mask")
    if mask is None or mask.dim() != 2 or mask.shape[1] == 0:
        return inputs
    longest = int(mask.any(dim=0).nonzero().max()) + 1 if bool(mask.any()) else 1
    if longest == mask.shape[1]:
        return inputs
    out = dict(inputs)
    for key in MOTION_KEYS:
        if key in out:
            out[key] = out[key][:, :longest]
    return out


@dataclass
class RngState:
    """The generator states a forward pass may draw from: the CPU one and, for CUDA inputs,
    that device's."""

    cpu: Tensor
    cuda: Tensor | None = None
    cuda_device: int | None = None

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            return cls(torch.get_rng_state(), torch.cuda.get_rng_state(index), index)
        return cls(torch.get_rng_state())

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.cuda_device)


@dataclass
class CachedEmbeddings:
    """Step 1's result: the local batch's embeddings as leaves, and how to replay them."""

    motion: Tensor  # (B, D) leaf, requires grad; rows in input order
    text: Tensor  # (B, D) leaf, requires grad
    micro_inputs: list[dict[str, Any]]
    rng_before: list[RngState]  # the state each micro-batch's forward started from
    rng_after: RngState  # the state after all k no-grad forwards

    @property
    def micro_rows(self) -> int:
        return self.motion.shape[0] // len(self.micro_inputs)


def _device_of(inputs: dict[str, Any]) -> torch.device:
    for value in inputs.values():
        if isinstance(value, Tensor):
            return value.device
    return torch.device("cpu")


def embed_without_grad(forward: Forward, inputs: dict[str, Any], micro_batches: int) -> CachedEmbeddings:
    """Step 1: every micro-batch's embeddings without autograd graphs, concatenated as leaves."""
    micro_inputs = split_micro_batches(inputs, micro_batches)
    device = _device_of(inputs)
    rng_before, motion, text = [], [], []
    with torch.no_grad():
        for part in micro_inputs:
            rng_before.append(RngState.capture(device))
            motion_emb, text_emb = forward(part)
            motion.append(motion_emb)
            text.append(text_emb)
    return CachedEmbeddings(
        motion=torch.cat(motion).requires_grad_(),
        text=torch.cat(text).requires_grad_(),
        micro_inputs=micro_inputs,
        rng_before=rng_before,
        rng_after=RngState.capture(device),
    )


def backward_through_cache(
    cached: CachedEmbeddings,
    loss: Tensor,
    forward: Forward,
    *,
    backward: Callable[[Tensor], None] = Tensor.backward,
    no_sync: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
    loss_params: Sequence[Tensor] = (),
) -> None:
    """Steps 2 and 3: accumulate d loss / d parameters into `.grad` via k replays.

    `loss` must be computed from `cached.motion` / `cached.text` (and `loss_params`). Every
    rank must call this when the loss uses collectives (the objective's gather does).
    """
    params = [p for p in loss_params if p.requires_grad]
    grads = torch.autograd.grad(loss, [cached.motion, cached.text, *params], allow_unused=True)
    grad_motion, grad_text = (g if g is not None else torch.zeros_like(e)
                              for g, e in zip(grads[:2], (cached.motion, cached.text)))
    # An unused loss parameter still enters the synchronised backward (with a zero
    # gradient): DDP waits for every parameter it registered.
    grad_params = [(p, g if g is not None else torch.zeros_like(p)) for p, g in zip(params, grads[2:])]
    size, last = cached.micro_rows, len(cached.micro_inputs) - 1
    try:
        for index, part in enumerate(cached.micro_inputs):
            rows = slice(index * size, (index + 1) * size)
            cached.rng_before[index].restore()  # the same dropout masks as in step 1
            sync = index == last
            with (contextlib.nullcontext() if sync else no_sync()):
                motion_emb, text_emb = forward(part)
                surrogate = (motion_emb * grad_motion[rows].to(motion_emb.dtype)).sum() + (
                    text_emb * grad_text[rows].to(text_emb.dtype)).sum()
                if sync:  # inside DDP's synchronised backward, so DDP averages them too
                    for param, grad in grad_params:
                        surrogate = surrogate + (param * grad).sum()
                backward(surrogate)
    finally:
        cached.rng_after.restore()
