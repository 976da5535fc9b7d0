"""The global-batch objective: gather with grad -> local rows x global columns -> loss.

Each of W ranks holds B local pairs. The embeddings of all ranks are gathered with
gradients (G = W * B columns, rank r's rows at [r * B, (r + 1) * B)) and the motion ids
without; each rank scores only its B local anchors against the G columns, in both
directions, and returns the mean over its local anchors. So:
- the mean over ranks of the returned losses equals the single-process loss on the
  concatenated batch (log that mean: `reduce_stats`);
- the gather's backward sums gradients over ranks and DDP averages them, so every
  parameter gradient equals the single-process gradient.
The loss is chosen by a schedule: `warmup_loss` (SH) for the first warm-up steps or epochs,
then the configured loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rehamot.config import LossConfig
from rehamot.distributed import all_reduce_sum, gather_no_grad, gather_with_grad, world_info
from rehamot.loss.cores import loss_core
from rehamot.loss.pairs import Pairs, drop_thresholds

# Additive statistics: summed over ranks (one all_reduce), each gives its global value.
STATS_KEYS = ("loss_sum", "anchors", "dropped", "candidates", "global_batch")


def scheduled_loss_name(cfg: LossConfig, step: int, epoch: int) -> str:
    """The loss in force at a 0-based global step and epoch."""
    in_warmup = step < cfg.warmup_steps or epoch < cfg.warmup_epochs
    return cfg.warmup_loss if in_warmup else cfg.name


@dataclass
class ObjectiveOutput:
    loss: Tensor  # 0-d, to backward; its mean over ranks is the single-process loss
    loss_name: str
    stats: dict[str, Tensor]  # local, detached, float64 0-d; keys STATS_KEYS


class GlobalBatchObjective:
    """Callable computing this rank's share of the global-batch loss; see the module doc."""

    def __init__(self, cfg: LossConfig, search: str = "auto") -> None:
        self.cfg = cfg
        self.search = search  # DropTriple's search strategy (same result; benchmarks compare them)

    def _core_kwargs(self, name: str, logit_scale: Tensor | None) -> dict[str, object]:
        cfg = self.cfg
        if name == "infonce":
            # logit_scale follows CLIP: logits = exp(logit_scale) * cos = cos / temperature.
            scale = logit_scale.exp() if logit_scale is not None else 1.0 / cfg.temperature
            return {"scale": scale, "chunk_size": cfg.chunk_size}
        kwargs: dict[str, object] = {"margin": cfg.margin, "chunk_size": cfg.chunk_size}
        if name == "droptriple":
            kwargs["thresholds"] = drop_thresholds(cfg)
            if cfg.implementation == "chunked":
                kwargs["strategy"] = self.search
        return kwargs

    def __call__(
        self,
        motion_emb: Tensor,
        text_emb: Tensor,
        motion_ids: Tensor,
        *,
        step: int,
        epoch: int,
        logit_scale: Tensor | None = None,
        count_drops: bool = True,
    ) -> ObjectiveOutput:
        """This rank's loss; count_drops=False skips counting DropTriple's dropped pairs (every
        intra-modal similarity the search could skip: ask on the steps that log them), leaving
        stats["dropped"] negative."""
        if motion_emb.ndim != 2 or motion_emb.shape != text_emb.shape:
            raise ValueError(
                f"expected two local (B, D) embeddings of one shape, got {tuple(motion_emb.shape)} "
                f"and {tuple(text_emb.shape)}"
            )
        if motion_ids.shape != (motion_emb.shape[0],) or motion_ids.dtype != torch.int64:
            raise ValueError(f"motion_ids must be int64 of shape ({motion_emb.shape[0]},), got "
                             f"{motion_ids.dtype} {tuple(motion_ids.shape)}")
        motion_ids = motion_ids.to(motion_emb.device)  # NCCL gathers device tensors only
        name = scheduled_loss_name(self.cfg, step, epoch)
        world = world_info()
        local, dim = motion_emb.shape
        # The ids gather checks equal batch sizes; one gather then carries both modalities.
        col_ids = gather_no_grad(motion_ids)
        # Gather in the scoring precision (fp32 for bf16/fp16 embeddings): the gathered
        # columns' gradients are then summed over ranks in fp32, not in bf16.
        dtype = torch.float64 if torch.float64 in (motion_emb.dtype, text_emb.dtype) else torch.float32
        motion_emb, text_emb = motion_emb.to(dtype), text_emb.to(dtype)
        if world.world_size == 1:
            # Rows are the columns: no concatenated copy, and the cores then write one gradient
            # per modality instead of a row and a column gradient to be summed.
            cols_m, cols_t = motion_emb, text_emb
        else:
            both = gather_with_grad(torch.cat([motion_emb, text_emb], dim=1), check_sizes=False)
            cols_m, cols_t = both[:, :dim], both[:, dim:]
        core = loss_core(name, self.cfg.implementation)
        pairs = Pairs(motion_emb, text_emb, cols_m, cols_t, motion_ids, col_ids, world.rank * local)
        terms = core(pairs, count_drops=count_drops, **self._core_kwargs(name, logit_scale))
        total = terms.per_anchor.sum()
        # "sum" is scaled by W so that the mean over ranks (what DDP's averaging optimises)
        # is the single-process sum.
        loss = total / local if self.cfg.reduction == "mean" else total * world.world_size
        as_stat = dict(dtype=torch.float64, device=total.device)
        stats = {
            "loss_sum": total.detach().to(torch.float64),
            "anchors": torch.tensor(float(local), **as_stat),
            "dropped": terms.dropped.to(torch.float64),
            "candidates": terms.candidates.to(torch.float64),
            # this rank's share: the sum over ranks is G
            "global_batch": torch.tensor(float(local), **as_stat),
        }
        return ObjectiveOutput(loss=loss, loss_name=name, stats=stats)


def stats_vector(stats: dict[str, Tensor]) -> Tensor:
    """The stats as one float64 vector in STATS_KEYS order, ready for a single all_reduce.

    A trainer may torch.cat its own flags after it and reduce everything at once, then pass
    the first len(STATS_KEYS) entries to `summarize_stats`.
    """
    return torch.stack([stats[key].detach().to(torch.float64).reshape(()) for key in STATS_KEYS])


def summarize_stats(summed: Tensor) -> dict[str, float]:
    """Global figures from the rank-summed stats vector.

    loss = sum of per-anchor losses / number of anchors = the single-process "mean" loss on
    the concatenated batch (whatever the configured reduction); loss_sum is the paper's sum.
    """
    values = dict(zip(STATS_KEYS, summed.tolist()))
    anchors, candidates = values["anchors"], values["candidates"]
    if values["dropped"] < 0:  # not counted on this step (every rank skipped it alike)
        values["dropped"] = float("nan")
    return {
        "loss": values["loss_sum"] / anchors if anchors else float("nan"),
        "loss_sum": values["loss_sum"],
        "dropped": values["dropped"],
        "drop_rate": values["dropped"] / candidates if candidates else 0.0,  # NaN when not counted
        "candidates": candidates,
        "global_batch": values["global_batch"],
    }


def reduce_stats(stats: dict[str, Tensor]) -> dict[str, float]:
    """One all_reduce (sum) of the local stats -> global mean loss and dropped count."""
    return summarize_stats(all_reduce_sum(stats_vector(stats)))
