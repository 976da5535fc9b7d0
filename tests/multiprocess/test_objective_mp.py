"""The global-batch objective on real gloo ranks equals one process on the whole batch.

One launch per world size W runs every loss: W ranks x B local pairs, the model wrapped in
DDP (so gradient averaging is the real one) and the chunked cores, against one process
holding all W * B pairs with the dense reference cores. Loss, logged global loss, dropped
count and every parameter gradient must agree (float64, ||delta|| / ||g|| <= 1e-6).

The model comes from a `ModelSpec` so that the real two-tower model can be added next to
the tiny one: give it a factory, a batch builder and an `embed` adapter.
"""
from __future__ import annotations

import datetime
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from rehamot.config import LossConfig
from rehamot.distributed import gather_with_grad, world_info
from rehamot.loss.cores import single_process_loss
from rehamot.loss.objective import GlobalBatchObjective, reduce_stats

LOCAL_BATCH = 6
CHUNK_SIZE = 5  # divides neither B nor G: chunks straddle rank boundaries
CASES: dict[str, dict] = {
    "sh": {"name": "sh"},
    "mh": {"name": "mh"},
    "droptriple": {"name": "droptriple"},
    "droptriple_per_direction": {"name": "droptriple", "threshold_mode": "per_direction"},
    "droptriple_sum": {"name": "droptriple", "reduction": "sum"},
    "infonce": {"name": "infonce"},
}
TOLERANCE = 1e-6


# ----------------------------------------------------------------------------- model specs


class TinyTwoTower(nn.Module):
    """Linear + L2 normalisation per modality; a learnable CLIP-style logit scale if asked."""

    def __init__(self, motion_dim: int, text_dim: int, joint_dim: int, learn_temperature: bool) -> None:
        super().__init__()
        self.motion = nn.Linear(motion_dim, joint_dim)
        self.text = nn.Linear(text_dim, joint_dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.5)) if learn_temperature else None

    def forward(self, motion: Tensor, text: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        # The scale is returned from forward so that DDP sees it used in the graph.
        return F.normalize(self.motion(motion), dim=-1), F.normalize(self.text(text), dim=-1), self.logit_scale


def tiny_model(learn_temperature: bool) -> nn.Module:
    torch.manual_seed(1234)
    return TinyTwoTower(8, 7, 6, learn_temperature).double()


def tiny_batch(global_batch: int, local_batch: int) -> dict[str, Tensor]:
    """Clustered features (DropTriple drops pairs) with repeated motions across ranks."""
    gen = torch.Generator().manual_seed(7)
    clusters = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    text_of_cluster = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    which = torch.randint(3, (global_batch,), generator=gen)
    motion = clusters[which] + 0.6 * torch.randn(global_batch, 8, generator=gen, dtype=torch.float64)
    text = text_of_cluster[which] + 0.6 * torch.randn(global_batch, 7, generator=gen, dtype=torch.float64)
    ids = torch.arange(global_batch, dtype=torch.int64) * 10
    ranks = global_batch // local_batch
    for rank in range(1, ranks):
        # The same motion (another caption) on the previous rank: same id, same features.
        here, there = rank * local_batch + rank % local_batch, (rank - 1) * local_batch + rank % local_batch
        ids[here], motion[here] = ids[there], motion[there]
    # An exact duplicate pair under another id on the last rank: a false negative that
    # DropTriple drops (cosine 1) and MH keeps.
    motion[-1], text[-1] = motion[local_batch - 1], text[local_batch - 1]
    return {"motion": motion, "text": text, "motion_ids": ids}


def tiny_embed(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
    return model(batch["motion"], batch["text"])


@dataclass(frozen=True)
class ModelSpec:
    make_model: Callable[[bool], nn.Module]  # learn_temperature -> float64 model, fixed seed
    make_batch: Callable[[int, int], dict[str, Tensor]]  # (G, B) -> tensors with "motion_ids"
    embed: Callable[[nn.Module, dict[str, Tensor]], tuple[Tensor, Tensor, Tensor | None]]
    # DropTriple thresholds that drop some but not all pairs for this model's embeddings
    thresholds: tuple[dict, ...] = ()

    def loss_kwargs(self, label: str) -> dict:
        kwargs = dict(CASES[label])
        if kwargs["name"] == "droptriple":
            for extra in self.thresholds:
                kwargs.update(extra)
        return kwargs


_TWO_TOWER_CACHE: dict[str, nn.Module] = {}


def two_tower_model(learn_temperature: bool) -> nn.Module:
    """The real TwoTower: a small motion transformer and the packaged MiniLM cut to 1 layer,
    fine-tuned (so the language model's gradients are checked too), dropout off, float64."""
    import copy

    from rehamot.models import MotionEncoderConfig, TextEncoderConfig, TwoTower, TwoTowerConfig

    if "base" not in _TWO_TOWER_CACHE:  # load MiniLM once per process, copy it per case
        torch.manual_seed(1234)
        cfg = TwoTowerConfig(
            motion=MotionEncoderConfig(feature_dim=5, d_model=16, layers=1, heads=2, ff=32, dropout=0.0, embed_dim=12),
            text=TextEncoderConfig(model=None, finetune=True, embed_dim=12, num_layers=1, dropout=0.0),
        )
        base = TwoTower(cfg).double()
        # The 30522 x 384 token table stays frozen: its gradient would be ~94 MB per case.
        base.text.backbone.embeddings.word_embeddings.weight.requires_grad_(False)
        _TWO_TOWER_CACHE["base"] = base
    model = copy.deepcopy(_TWO_TOWER_CACHE["base"])
    model.logit_scale.requires_grad_(learn_temperature)
    return model


_CAPTIONS = ["a person walks forward", "someone jumps twice", "a man waves his left hand",
             "the woman turns right slowly", "a person kicks with the right leg", "someone sits down"]


def two_tower_batch(global_batch: int, local_batch: int) -> dict[str, Tensor]:
    """Padded motions of several lengths, real tokens, repeated motions across ranks."""
    from rehamot.data import tokenize
    from rehamot.models import TextEncoderConfig, load_tokenizer

    gen = torch.Generator().manual_seed(11)
    frames = 9
    lengths = torch.randint(3, frames + 1, (global_batch,), generator=gen)
    # A per-motion offset: an untrained encoder's summary token otherwise sees near-identical
    # averages of noise and every motion embedding would coincide.
    offset = 4 * torch.randn(global_batch, 1, 5, generator=gen, dtype=torch.float64)
    motion = offset + torch.randn(global_batch, frames, 5, generator=gen, dtype=torch.float64)
    mask = torch.arange(frames)[None, :] < lengths[:, None]
    texts = [_CAPTIONS[i % len(_CAPTIONS)] for i in range(global_batch)]
    ids = torch.arange(global_batch, dtype=torch.int64) * 10
    for rank in range(1, global_batch // local_batch):  # another caption of a motion on the previous rank
        here, there = rank * local_batch, (rank - 1) * local_batch
        ids[here], motion[here], mask[here] = ids[there], motion[there], mask[there]
    tokens = tokenize(load_tokenizer(TextEncoderConfig()), texts, 16)
    # Pad every caption to one length so that rank slices and the whole batch agree.
    return {"motion": motion, "motion_mask": mask, "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"], "motion_ids": ids}


def two_tower_embed(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
    motion_emb, text_emb = model(batch)
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return motion_emb, text_emb, inner.logit_scale if inner.logit_scale.requires_grad else None


MODEL_SPECS: dict[str, ModelSpec] = {
    "tiny": ModelSpec(tiny_model, tiny_batch, tiny_embed),
    # An untrained encoder maps everything close together: thresholds near 1 drop some pairs.
    "two_tower": ModelSpec(two_tower_model, two_tower_batch, two_tower_embed,
                           ({"threshold_motion": 0.99, "threshold_text": 0.95,
                             "threshold_anchor": 0.99, "threshold_candidate": 0.95},)),
}


# ----------------------------------------------------------------------------- ranks


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, spec_name: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=60),  # a mismatched collective fails, not hangs
    )
    try:
        spec = MODEL_SPECS[spec_name]
        batch = spec.make_batch(world_size * LOCAL_BATCH, LOCAL_BATCH)
        local = {key: value[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH] for key, value in batch.items()}
        results: dict[str, Tensor] = {"world_size": torch.tensor([float(world_info().world_size)])}
        for label in CASES:
            kwargs = spec.loss_kwargs(label)
            model = spec.make_model(kwargs["name"] == "infonce")
            ddp = DistributedDataParallel(model)
            objective = GlobalBatchObjective(LossConfig(chunk_size=CHUNK_SIZE, **kwargs))
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # -W error over our collectives and the loss
                motion_emb, text_emb, logit_scale = spec.embed(ddp, local)
                out = objective(motion_emb, text_emb, local["motion_ids"], step=0, epoch=0, logit_scale=logit_scale)
                out.loss.backward()
                summary = reduce_stats(out.stats)
            results[f"{label}/rank_loss"] = out.loss.detach().reshape(1)
            results[f"{label}/logged_loss"] = torch.tensor([summary["loss"]], dtype=torch.float64)
            results[f"{label}/dropped"] = torch.tensor([summary["dropped"]], dtype=torch.float64)
            results[f"{label}/global_batch"] = torch.tensor([summary["global_batch"]], dtype=torch.float64)
            for name, param in model.named_parameters():
                if param.requires_grad:
                    results[f"{label}/grad/{name}"] = param.grad.detach().clone()
        results.update(_tie_case(rank, world_size))
        try:  # unequal local batches must raise on every rank, not hang
            gather_with_grad(torch.zeros(LOCAL_BATCH + rank, 3))
        except ValueError as error:
            results["unequal_batches_raised"] = torch.tensor([float("same local batch size" in str(error))])
        save_file(results, str(Path(out_dir) / f"rank{rank}.safetensors"))
        # every rank done with its collectives before any tears gloo down (a rank destroying
        # its group while a peer still talks to it can abort the process: seen once, SIGABRT)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _tie_embeddings(global_batch: int) -> tuple[Tensor, Tensor, Tensor]:
    # Identical unit rows, distinct ids: every candidate of every anchor ties exactly.
    rows = torch.full((global_batch, 4), 0.5, dtype=torch.float64)
    return rows.clone(), rows.clone(), torch.arange(global_batch, dtype=torch.int64)


def _tie_case(rank: int, world_size: int) -> dict[str, Tensor]:
    """MH on the ranks' leaf embeddings (no DDP): the raw gather-with-grad gradients."""
    motion, text, ids = _tie_embeddings(world_size * LOCAL_BATCH)
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    motion_emb, text_emb = motion[local].requires_grad_(), text[local].requires_grad_()
    objective = GlobalBatchObjective(LossConfig(name="mh", chunk_size=CHUNK_SIZE))
    objective(motion_emb, text_emb, ids[local], step=0, epoch=0).loss.backward()
    return {"tie/grad_motion": motion_emb.grad, "tie/grad_text": text_emb.grad}


def _single_process(spec: ModelSpec, global_batch: int, label: str) -> dict[str, Tensor]:
    kwargs = spec.loss_kwargs(label)
    model = spec.make_model(kwargs["name"] == "infonce")
    batch = spec.make_batch(global_batch, LOCAL_BATCH)
    objective = GlobalBatchObjective(LossConfig(implementation="dense", **kwargs))
    motion_emb, text_emb, logit_scale = spec.embed(model, batch)
    out = objective(motion_emb, text_emb, batch["motion_ids"], step=0, epoch=0, logit_scale=logit_scale)
    out.loss.backward()
    summary = reduce_stats(out.stats)
    expected = {"loss": out.loss.detach(), "logged_loss": torch.tensor(summary["loss"], dtype=torch.float64)}
    expected["dropped"] = torch.tensor(summary["dropped"], dtype=torch.float64)
    expected.update({f"grad/{name}": p.grad for name, p in model.named_parameters() if p.requires_grad})
    return expected


def _relative_error(got: Tensor, want: Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.slow
@pytest.mark.parametrize("spec_name, world_size", [("tiny", 2), ("tiny", 4), ("two_tower", 2), ("two_tower", 4)])
def test_global_batch_objective_equals_single_process(spec_name: str, world_size: int, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned ranks
    mp.spawn(_rank_main, args=(world_size, _free_port(), spec_name, str(tmp_path)), nprocs=world_size, join=True)
    ranks = [load_file(str(tmp_path / f"rank{rank}.safetensors")) for rank in range(world_size)]
    spec = MODEL_SPECS[spec_name]
    for result in ranks:
        assert result["world_size"].item() == world_size  # no rank silently alone
        assert result["unequal_batches_raised"].item() == 1.0
    for label in CASES:
        expected = _single_process(spec, world_size * LOCAL_BATCH, label)
        # The mean over ranks of the returned losses is the single-process loss ...
        mean_loss = torch.cat([result[f"{label}/rank_loss"] for result in ranks]).mean()
        assert _relative_error(mean_loss, expected["loss"]) <= TOLERANCE, label
        for result in ranks:
            # ... reduce_stats logs the per-anchor mean and the global dropped count on
            # every rank, and every parameter gradient is the single-process one.
            assert _relative_error(result[f"{label}/logged_loss"][0], expected["logged_loss"]) <= TOLERANCE, label
            assert result[f"{label}/dropped"].item() == expected["dropped"].item(), label
            assert result[f"{label}/global_batch"].item() == world_size * LOCAL_BATCH
        if label.startswith("droptriple"):
            assert expected["dropped"].item() > 0, label  # the clusters really drop pairs
        grads = [name for name in expected if name.startswith("grad/")]
        if spec_name == "tiny":
            assert len(grads) == (5 if label == "infonce" else 4), label  # incl. the logit scale
        else:  # motion tower, projection heads and the fine-tuned 1-layer MiniLM
            assert any(name.startswith("grad/text.backbone.") for name in grads), label
            assert ("grad/logit_scale" in grads) == (label == "infonce"), label
        for name in grads:
            want = expected[name]
            total = torch.sqrt(sum(expected[g].norm() ** 2 for g in grads))
            if want.norm() <= 1e-10 * total:
                # Structurally zero up to rounding (e.g. attention key biases: softmax ignores a
                # shift): a relative error of rounding noise means nothing; both must be ~0.
                for result in ranks:
                    assert (result[f"{label}/{name}"] - want).norm() <= 1e-10 * total, (label, name)
                continue
            for rank, result in enumerate(ranks):
                error = _relative_error(result[f"{label}/{name}"], want)
                assert error <= TOLERANCE, (label, name, rank, error)
    # Ties go to the lowest global column on every rank. Without DDP's averaging each rank's
    # leaf gradient is d(sum of the W rank losses) = W x the single-process gradient.
    motion, text, ids = _tie_embeddings(world_size * LOCAL_BATCH)
    motion.requires_grad_(), text.requires_grad_()
    single_process_loss("mh", motion, text, motion_ids=ids, implementation="dense").backward()
    for rank, result in enumerate(ranks):
        local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        for key, full in (("tie/grad_motion", motion.grad), ("tie/grad_text", text.grad)):
            torch.testing.assert_close(result[key], world_size * full[local], rtol=1e-12, atol=1e-12)
