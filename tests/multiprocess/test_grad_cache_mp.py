"""GradCache on 2 real gloo ranks under DDP equals one process on the whole batch.

Each rank holds k = 4 micro-batches of 3 pairs (12 local, G = 24) of the real TwoTower (small
motion transformer, MiniLM cut to 1 layer and fine-tuned, dropout off, float64), wrapped in
DDP with its `no_sync`. Loss and every parameter gradient (the InfoNCE logit scale, which the
loss uses outside DDP's forward, included) must equal one process forwarding all 24 pairs at
once (||delta|| / ||g|| <= 1e-6). A counting DDP comm hook shows that the k micro-batches
cost one gradient all-reduce, the same as a plain step.
"""
from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from test_objective_mp import MODEL_SPECS, _free_port, two_tower_batch, two_tower_model
from torch import Tensor
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from rehamot.config import LossConfig
from rehamot.distributed import world_info
from rehamot.loss.grad_cache import backward_through_cache, embed_without_grad
from rehamot.loss.objective import GlobalBatchObjective, reduce_stats

WORLD = 2
MICRO = 4
LOCAL = 12  # 4 micro-batches of 3
TOLERANCE = 1e-6
THRESHOLDS = MODEL_SPECS["two_tower"].thresholds[0]  # drop some, not all, untrained pairs
CASES = {
    "droptriple": dict(name="droptriple", threshold_motion=THRESHOLDS["threshold_motion"],
                       threshold_text=THRESHOLDS["threshold_text"], chunk_size=5),
    "infonce": dict(name="infonce", chunk_size=5),
}


def logit_scale_of(model) -> Tensor:
    return -torch.log(model.temperature())  # the trainer's expression


def counting_allreduce(state: dict[str, int], bucket):
    """A DDP comm hook that all-reduces as usual and counts the buckets it reduced."""
    state["calls"] += 1
    return allreduce_hook(None, bucket)


def _ddp(model) -> tuple[DistributedDataParallel, dict[str, int]]:
    ddp = DistributedDataParallel(model)
    hook = {"calls": 0}
    ddp.register_comm_hook(hook, counting_allreduce)
    return ddp, hook


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        batch = two_tower_batch(WORLD * LOCAL, LOCAL)
        local = {key: value[rank * LOCAL:(rank + 1) * LOCAL] for key, value in batch.items()}
        ids = local.pop("motion_ids")
        results: dict[str, Tensor] = {"world_size": torch.tensor([float(world_info().world_size)])}
        for label, kwargs in CASES.items():
            infonce = kwargs["name"] == "infonce"
            model = two_tower_model(infonce)
            ddp, hook = _ddp(model)
            objective = GlobalBatchObjective(LossConfig(**kwargs))
            cached = embed_without_grad(ddp, local, MICRO)
            out = objective(cached.motion, cached.text, ids, step=0, epoch=0, logit_scale=logit_scale_of(model))
            backward_through_cache(cached, out.loss, ddp, no_sync=ddp.no_sync,
                                   loss_params=[model.logit_scale] if infonce else [])
            summary = reduce_stats(out.stats)
            results[f"{label}/rank_loss"] = out.loss.detach().reshape(1)
            results[f"{label}/logged_loss"] = torch.tensor([summary["loss"]], dtype=torch.float64)
            results[f"{label}/dropped"] = torch.tensor([summary["dropped"]], dtype=torch.float64)
            results[f"{label}/hook_calls"] = torch.tensor([float(hook["calls"])])
            for name, param in model.named_parameters():
                if param.requires_grad:
                    results[f"{label}/grad/{name}"] = param.grad.detach().clone()
            # The same step without micro-batches: how many bucket all-reduces a plain step costs.
            plain, plain_hook = _ddp(two_tower_model(infonce))
            motion_emb, text_emb = plain(local)
            objective(motion_emb, text_emb, ids, step=0, epoch=0,
                      logit_scale=logit_scale_of(plain.module)).loss.backward()
            results[f"{label}/plain_hook_calls"] = torch.tensor([float(plain_hook["calls"])])
        save_file(results, str(Path(out_dir) / f"rank{rank}.safetensors"))
        # every rank done with its collectives before any tears gloo down (a rank destroying
        # its group while a peer still talks to it can abort the process: seen once, SIGABRT)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _single_process(label: str) -> dict[str, Tensor]:
    kwargs = CASES[label]
    model = two_tower_model(kwargs["name"] == "infonce")
    batch = two_tower_batch(WORLD * LOCAL, LOCAL)
    objective = GlobalBatchObjective(LossConfig(**kwargs))
    motion_emb, text_emb = model(batch)
    out = objective(motion_emb, text_emb, batch["motion_ids"], step=0, epoch=0, logit_scale=logit_scale_of(model))
    out.loss.backward()
    expected = {"loss": out.loss.detach(), "dropped": out.stats["dropped"]}
    expected.update({f"grad/{name}": p.grad for name, p in model.named_parameters() if p.requires_grad})
    return expected


@pytest.mark.slow
def test_grad_cache_on_two_ranks_equals_one_process(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned ranks
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [load_file(str(tmp_path / f"rank{rank}.safetensors")) for rank in range(WORLD)]
    for result in ranks:
        assert result["world_size"].item() == WORLD  # no rank silently alone
    for label in CASES:
        expected = _single_process(label)
        mean_loss = torch.cat([result[f"{label}/rank_loss"] for result in ranks]).mean()
        assert abs(mean_loss - expected["loss"]) <= TOLERANCE * expected["loss"].abs(), label
        for result in ranks:
            assert abs(result[f"{label}/logged_loss"][0] - expected["loss"]) <= TOLERANCE * expected["loss"].abs()
            assert result[f"{label}/dropped"].item() == expected["dropped"].item(), label
            # no_sync: the 4 micro-batches all-reduce gradients once, like a plain step
            assert 1 <= result[f"{label}/hook_calls"].item() == result[f"{label}/plain_hook_calls"].item(), label
        if label == "droptriple":
            assert expected["dropped"].item() > 0
        grads = [name for name in expected if name.startswith("grad/")]
        assert any(name.startswith("grad/text.backbone.") for name in grads)
        assert ("grad/logit_scale" in grads) == (label == "infonce")
        total = torch.sqrt(sum(expected[g].norm() ** 2 for g in grads))
        for name in grads:
            want = expected[name]
            # structurally-zero gradients (attention key biases) are compared to the total norm
            scale = max(float(want.norm()), 1e-6 * float(total))
            for rank, result in enumerate(ranks):
                error = float((result[f"{label}/{name}"] - want).norm())
                assert error <= TOLERANCE * scale, (label, name, rank, error, scale)
