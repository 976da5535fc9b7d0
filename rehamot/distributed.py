"""The collectives the global-batch objective needs; torch.distributed only (no accelerate).

Every function also works without a process group (plain `python`, one process): gathers
are then the identity and reductions do nothing. Tensors must live on the backend's device
(CPU for gloo, CUDA for NCCL), which is where the embeddings already are.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    is_initialized: bool


def world_info() -> WorldInfo:
    """This process's rank and the world size; (0, 1, False) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return WorldInfo(dist.get_rank(), dist.get_world_size(), True)
    return WorldInfo(0, 1, False)


# torch 2.13 deprecates all_gather_into_tensor (FutureWarning) for all_gather_single, which
# older torch (>= 2.4 is supported) lacks: use whichever this torch has, newest first.
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
# The same for reduce_scatter_tensor -> reduce_scatter_single. NCCL reduce-scatters natively (half
# the bytes of an all-reduce); gloo has it since torch 2.2 as an all-reduce inside (the bytes of
# before, without our clone). So one path on every backend this project launches.
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)


def _all_gather_rows(tensor: Tensor, world_size: int) -> Tensor:
    """(B, ...) on every rank -> (world_size * B, ...), rank r's rows at [r * B, (r + 1) * B)."""
    tensor = tensor.contiguous()
    out = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))
    _all_gather_single(out, tensor)
    return out


def check_equal_rows(tensor: Tensor) -> None:
    """Raise on every rank (not hang) unless all ranks hold the same number of rows.

    The global-batch objective needs equal local batches: the gather packs rank r's rows
    at r * B and the loss scaling assumes W equal shares.
    """
    world = world_info()
    if world.world_size == 1:
        return
    size = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    sizes = _all_gather_rows(size, world.world_size).tolist()
    if len(set(sizes)) != 1:
        raise ValueError(
            f"every rank must hold the same local batch size, got {sizes} (rank {world.rank} "
            f"has {tensor.shape[0]}); use full batches (partial=False) with equal steps per rank"
        )


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradient over ranks and keeps our slice.

    Rank r's rows appear as columns in every rank's loss, so d(sum of all ranks' losses) /
    d(our rows) is the summed gradient of the gathered tensor over ranks, restricted to our
    slice: a reduce-scatter (SUM), which sends each rank only its slice of the sum, where an
    all-reduce followed by narrow sent every rank all W slices. (Together with DDP's averaging
    this gives the single-process gradient.) Every rank holds the same number of rows
    (gather_with_grad checks it), so the gathered gradient splits into W equal slices.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        world = world_info()
        ctx.rows = tensor.shape[0]
        return _all_gather_rows(tensor, world.world_size)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad_output.contiguous()  # read, never written: no copy when already contiguous
        out = grad.new_empty((ctx.rows, *grad.shape[1:]))
        _reduce_scatter_single(out, grad, op=dist.ReduceOp.SUM)
        return out


def gather_with_grad(tensor: Tensor, *, check_sizes: bool = True) -> Tensor:
    """Concatenate every rank's (B, ...) tensor into (W * B, ...) in rank order, with grad.

    Every rank must call it (collective). check_sizes=False skips the extra tiny collective
    when the caller has already checked equal batch sizes.
    """
    world = world_info()
    if world.world_size == 1:
        return tensor
    if check_sizes:
        check_equal_rows(tensor)
    return _GatherWithGrad.apply(tensor)


def gather_no_grad(tensor: Tensor, *, check_sizes: bool = True) -> Tensor:
    """all_gather without autograd (ids, counters): (B, ...) -> (W * B, ...) in rank order."""
    world = world_info()
    if world.world_size == 1:
        return tensor
    if check_sizes:
        check_equal_rows(tensor)
    with torch.no_grad():
        return _all_gather_rows(tensor.detach(), world.world_size)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum `tensor` over ranks in place and return it (unchanged with one process)."""
    if world_info().world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def init_distributed() -> WorldInfo:
    """Join the process group that torchrun / accelerate launch describe in the environment.

    Plain `python` (no WORLD_SIZE, or 1) stays a single process without a group.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world_info()


def local_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
