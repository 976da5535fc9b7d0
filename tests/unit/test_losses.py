"""Unit tests of rehamot.loss (chunked cores, the dense reference, the single-process objective): hand-computed cases,
exclusion semantics, ties, gradients, chunked == dense reference, low-precision inputs.

Most hand cases use motion embeddings = the identity, so S_ij = m_i . t_j = t_j[i] can be
read off the caption vectors; the expected numbers are worked out in the comments.
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rehamot.config import LOSS_NAMES, LossConfig
from rehamot.loss import negative_search
from rehamot.loss.cores import loss_core, single_process_loss
from rehamot.loss.negative_search import hardest_kept_negatives
from rehamot.loss.objective import GlobalBatchObjective, reduce_stats, scheduled_loss_name
from rehamot.loss.pairs import DropThresholds, Pairs, drop_thresholds

F64 = torch.float64
REPO = Path(__file__).resolve().parents[2]


def _loss(name: str, m: torch.Tensor, t: torch.Tensor, **options):
    """single_process_loss, DropTriple's thresholds given as LossConfig options."""
    threshold_options = {k: options.pop(k) for k in list(options) if k.startswith("threshold")}
    if name == "droptriple":
        options["thresholds"] = drop_thresholds(LossConfig(**threshold_options))
    return single_process_loss(name, m, t, **options)


sum_hinge_loss = partial(_loss, "sh")
max_hinge_loss = partial(_loss, "mh")
drop_triple_loss = partial(_loss, "droptriple")
info_nce_loss = partial(_loss, "infonce")


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


# --- 3x3: m = I, captions t0=(.8,.6,0) t1=(.6,0,.8) t2=(0,.6,.8)
#     S = [[.8, .6, 0], [.6, 0, .6], [0, .8, .8]], diagonal (.8, 0, .8), margin .25
M3 = torch.eye(3, dtype=F64)
T3 = _t([[0.8, 0.6, 0.0], [0.6, 0.0, 0.8], [0.0, 0.6, 0.8]])


def test_hand_3x3_sum_and_max_hinge() -> None:
    # motion->text rows: r0 j1 .25+.6-.8=.05; r1 j0 .85, j2 .85; r2 j1 .25   -> SH 2.0, MH 1.15
    # text->motion cols: c0 j1 .05; c1 j0 .85, j2 1.05; c2 j1 .05           -> SH 2.0, MH 1.15
    assert sum_hinge_loss(M3, T3, margin=0.25, reduction="sum").item() == pytest.approx(4.0, abs=1e-12)
    assert sum_hinge_loss(M3, T3, margin=0.25).item() == pytest.approx(4.0 / 3, abs=1e-12)
    assert max_hinge_loss(M3, T3, margin=0.25, reduction="sum").item() == pytest.approx(2.3, abs=1e-12)
    assert max_hinge_loss(M3, T3, margin=0.25).item() == pytest.approx(2.3 / 3, abs=1e-12)


def test_hand_3x3_drop_triple_and_dropped_count() -> None:
    # caption cosines: t0.t1=.48, t0.t2=.36, t1.t2=.64; motions orthogonal. theta_t=.6 drops
    # the pairs (1,2) and (2,1) in both directions -> dropped = 4.
    # m->t: r0 .05; r1 j0 .85; r2 only j0 left: .25+0-.8 < 0 -> 0     = .9
    # t->m: c0 .05; c1 j0 .85; c2 only j0 left: .25+0-.8 < 0 -> 0     = .9
    loss, stats = drop_triple_loss(
        M3, T3, margin=0.25, threshold_motion=0.75, threshold_text=0.6, reduction="sum", return_stats=True
    )
    assert loss.item() == pytest.approx(1.8, abs=1e-12)
    assert int(stats["dropped"]) == 4
    assert int(stats["candidates"]) == 12  # 3 anchors x 2 negatives x 2 directions


# --- 4x4 with duplicate ids [0, 1, 1, 2]: m = I, t0=(.5,.5,.5,.5) t1=(.6,.8,0,0)
#     t2=(0,.6,.8,0) t3=(.8,0,0,.6); S rows: [.5,.6,0,.8] [.5,.8,.6,0] [.5,0,.8,0] [.5,0,0,.6]
M4 = torch.eye(4, dtype=F64)
T4 = _t([[0.5, 0.5, 0.5, 0.5], [0.6, 0.8, 0.0, 0.0], [0.0, 0.6, 0.8, 0.0], [0.8, 0.0, 0.0, 0.6]])
IDS4 = torch.tensor([0, 1, 1, 2])


def test_hand_4x4_duplicate_ids_are_excluded() -> None:
    # With ids: m->t r0 j1 .35 j3 .55; r1 (j2 same id) 0; r2 0; r3 j0 .15   -> SH 1.05, MH .70
    #           t->m c0 j1 j2 j3 .25 each; c1 j0 .05; c2 (j1 same id) 0; c3 j0 .45 -> 1.25, .75
    sh, stats = sum_hinge_loss(M4, T4, margin=0.25, motion_ids=IDS4, reduction="sum", return_stats=True)
    assert sh.item() == pytest.approx(2.3, abs=1e-12)
    assert int(stats["candidates"]) == 2 * (16 - 6)  # 6 (anchor, same-id column) pairs
    assert max_hinge_loss(M4, T4, margin=0.25, motion_ids=IDS4, reduction="sum").item() == pytest.approx(1.45, abs=1e-12)
    assert max_hinge_loss(M4, T4, margin=0.25, motion_ids=IDS4).item() == pytest.approx(1.45 / 4, abs=1e-12)
    # Without ids, r1-j2 and c2-j1 (S = .6 against .8) add .05 each.
    assert sum_hinge_loss(M4, T4, margin=0.25, reduction="sum").item() == pytest.approx(2.4, abs=1e-12)
    assert max_hinge_loss(M4, T4, margin=0.25, reduction="sum").item() == pytest.approx(1.55, abs=1e-12)


def test_hand_4x4_drop_triple_every_candidate_of_anchor0_dropped() -> None:
    # t0 has cosine .7 with t1, t2, t3; theta_t = .65 drops (0,k) and (k,0) for k = 1..3:
    # 6 ordered pairs per direction -> dropped 12. Anchor 0 has no negative left (adds 0);
    # every other remaining hinge is inactive, so the loss is 0 while MH's is not.
    loss, stats = drop_triple_loss(
        M4, T4, margin=0.25, threshold_text=0.65, motion_ids=IDS4, reduction="sum", return_stats=True
    )
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert int(stats["dropped"]) == 12


def test_hand_4x4_info_nce_with_duplicate_ids() -> None:
    # Temperature .5: logits 2*S. Row/column denominators skip the other same-id column.
    s = [[0.5, 0.6, 0.0, 0.8], [0.5, 0.8, 0.6, 0.0], [0.5, 0.0, 0.8, 0.0], [0.5, 0.0, 0.0, 0.6]]
    ids = [0, 1, 1, 2]
    expected = 0.0
    for i in range(4):
        keep = [j for j in range(4) if j == i or ids[j] != ids[i]]
        expected += math.log(sum(math.exp(2 * s[i][j]) for j in keep)) - 2 * s[i][i]  # motion->text
        expected += math.log(sum(math.exp(2 * s[j][i]) for j in keep)) - 2 * s[i][i]  # text->motion
    loss = info_nce_loss(M4, T4, temperature=0.5, motion_ids=IDS4, reduction="sum")
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    mean = info_nce_loss(M4, T4, temperature=torch.tensor(0.5, dtype=F64), motion_ids=IDS4)
    assert mean.item() == pytest.approx(expected / 4, abs=1e-12)


def test_dropped_negative_is_excluded_not_zeroed() -> None:
    # m = I, t0=(0,.6,.8) t1=(0,.8,.6) t2=(-.6,0,.8): S rows [0,0,-.6] [.6,.8,0] [.8,.6,.8].
    # t0.t1 = .96 > .75 drops (0,1),(1,0) in both directions.
    # Ours: m->t r0 only j2: .25-.6-0 < 0 -> 0; r1 only j2 -> 0; r2 max(.25, .05) = .25
    #       t->m c0 only j2: .25+.8-0 = 1.05; c1 only j2: .05; c2 0          -> total 1.35
    # The original multiplies the dropped score by 0 instead: r0 would keep
    # [.25 + 0 - S_00]+ = .25 from the "dropped" j1 and its total would be 1.6.
    m = torch.eye(3, dtype=F64)
    t = _t([[0.0, 0.6, 0.8], [0.0, 0.8, 0.6], [-0.6, 0.0, 0.8]])
    loss, stats = drop_triple_loss(m, t, margin=0.25, reduction="sum", return_stats=True)
    assert loss.item() == pytest.approx(1.35, abs=1e-12)
    assert loss.item() != pytest.approx(1.6, abs=1e-3)
    assert int(stats["dropped"]) == 4


def test_anchor_with_everything_dropped_adds_zero_and_still_counts() -> None:
    # m = I, t0=(0,.6,.8) t1=(0,.8,.6) t2=(0,0,1): t0 is within .75 of t1 (.96) and t2 (.8).
    # S rows [0,0,0] [.6,.8,0] [.8,.6,1]. Dropped: (0,1),(1,0),(0,2),(2,0) x 2 directions = 8.
    # m->t: r0 nothing left; r1 j2 -> 0; r2 j1 .25+.6-1 < 0.  t->m: c0 nothing; c1 j2 .05; c2 0.
    m = torch.eye(3, dtype=F64).requires_grad_()
    t = _t([[0.0, 0.6, 0.8], [0.0, 0.8, 0.6], [0.0, 0.0, 1.0]]).requires_grad_()
    loss, stats = drop_triple_loss(m, t, margin=0.25, return_stats=True)
    assert loss.item() == pytest.approx(0.05 / 3, abs=1e-12)  # divided by all 3 anchors
    assert int(stats["dropped"]) == 8
    loss.backward()
    # Pair 0 is nobody's negative and has no hinge: no gradient at all.
    assert torch.count_nonzero(m.grad[0]) == 0 and torch.count_nonzero(t.grad[0]) == 0
    assert torch.count_nonzero(m.grad) > 0


def test_per_direction_thresholds_swap_roles() -> None:
    # m0=(1,0,0) m1=(.8,.6,0) m2=(0,0,1), t = I: S = M, diagonal (1, .6, 1); motions 0 and 1
    # have cosine .8, captions are orthogonal.
    # per_direction (anchor .7, candidate .9): motion->text compares motion cosines with .7,
    # so (0,1),(1,0) are dropped there (2 pairs); text->motion compares them with .9: kept.
    #   m->t: r1's j0 (.25+.8-.6 = .45) is dropped -> 0 ; t->m: c0 j1 .25+.8-1 = .05 -> .05
    # symmetric .75/.75 drops them in both directions (4 pairs) -> 0; MH keeps both -> .5
    m = _t([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]])
    t = torch.eye(3, dtype=F64)
    per_dir, stats = drop_triple_loss(
        m, t, margin=0.25, threshold_mode="per_direction", threshold_anchor=0.7, threshold_candidate=0.9,
        reduction="sum", return_stats=True,
    )
    assert per_dir.item() == pytest.approx(0.05, abs=1e-12)
    assert int(stats["dropped"]) == 2
    symmetric, stats = drop_triple_loss(m, t, margin=0.25, reduction="sum", return_stats=True)
    assert symmetric.item() == pytest.approx(0.0, abs=1e-12)
    assert int(stats["dropped"]) == 4
    assert max_hinge_loss(m, t, margin=0.25, reduction="sum").item() == pytest.approx(0.5, abs=1e-12)
    # per_direction ignores the symmetric thresholds, and vice versa
    per_direction = LossConfig(threshold_motion=0.1, threshold_text=0.2, threshold_mode="per_direction")
    assert drop_thresholds(per_direction) == DropThresholds(0.7, 0.9, 0.9, 0.7)
    assert drop_thresholds(LossConfig(threshold_motion=0.1, threshold_text=0.2)) == DropThresholds(0.1, 0.2, 0.1, 0.2)
    with pytest.raises(ValueError, match="threshold_mode"):
        drop_triple_loss(m, t, threshold_mode="both")


def _tie_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    # Row 1 of M3/T3 ties j0 and j2 (.6 each); widen to 6 columns so that the tied pair can
    # sit in one chunk or in two. Columns 3..5 copy captions 0..2 scaled to be no threat.
    m = torch.zeros(6, 4, dtype=F64)
    m[:3, :3] = M3
    m[3:, 3] = 1.0
    t = torch.zeros(6, 4, dtype=F64)
    t[:3, :3] = T3
    t[3:, 3] = 1.0
    return m, t


@pytest.mark.parametrize("chunk_size", [1, 2, 4, 64])
def test_ties_go_to_lowest_global_column(chunk_size: int) -> None:
    m, t = _tie_inputs()
    ids = torch.tensor([0, 1, 2, 3, 4, 5])
    index_mt, _, _, _ = hardest_kept_negatives(Pairs(m, t, m, t, ids, ids, 0), thresholds=None, chunk_size=chunk_size)
    assert index_mt[1].item() == 0  # j0 and j2 tie at .6
    # Rows 3..5 are the identical motion (0,0,0,1) against identical captions: all of their
    # negatives tie, and the lowest column wins.
    assert index_mt[3:].tolist() == [4, 3, 3]
    # The same rows as local rows of a larger batch (row_offset 3): global columns still win.
    local_index, _, _, _ = hardest_kept_negatives(
        Pairs(m[3:], t[3:], m, t, ids[3:], ids, 3), thresholds=None, chunk_size=chunk_size
    )
    assert local_index.tolist() == [4, 3, 3]
    # Anchor 1 alone (row_offset 1): its motion->text hinge must send its gradient to
    # column 0 and none to the tied column 2, in the chunked and the dense path alike.
    ids3 = torch.arange(3)
    for implementation in ("chunked", "dense"):
        cols_t = T3.clone().requires_grad_()
        terms = loss_core("mh", implementation)(
            Pairs(M3[1:2], T3[1:2], M3, cols_t, ids3[1:2], ids3, 1), margin=0.25, chunk_size=chunk_size
        )
        terms.per_anchor.sum().backward()
        torch.testing.assert_close(cols_t.grad[0], M3[1])
        assert torch.count_nonzero(cols_t.grad[2]) == 0


def _clustered(num: int, dim: int, clusters: int, seed: int, spread: float = 0.8) -> tuple[torch.Tensor, ...]:
    """Unit embeddings around a few centres (so DropTriple really drops) and ids with repeats."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=gen, dtype=F64)
    which = torch.randint(clusters, (num,), generator=gen)
    m = F.normalize(centres[which] + spread * torch.randn(num, dim, generator=gen, dtype=F64), dim=1)
    t = F.normalize(centres[which] + spread * torch.randn(num, dim, generator=gen, dtype=F64), dim=1)
    ids = torch.randint(num - 3, (num,), generator=gen)  # a few repeated motion ids
    return m, t, ids


def _core_kwargs(name: str, scale: torch.Tensor | None = None) -> dict:
    if name == "infonce":
        return {"scale": scale if scale is not None else 1 / 0.07}
    kwargs = {"margin": 0.2}
    if name == "droptriple":
        kwargs["thresholds"] = DropThresholds(0.75, 0.7, 0.7, 0.75)
    return kwargs


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_chunked_equals_dense_reference_values_and_gradients(name: str) -> None:
    m, t, ids = _clustered(13, 6, clusters=3, seed=1)
    offset, rows = 4, 5  # local rows 4..8 of 13 global columns
    reference = None
    for implementation, chunk_size in [("dense", 0), ("chunked", 1), ("chunked", 3), ("chunked", 5), ("chunked", 64)]:
        inputs = [m[offset:offset + rows], t[offset:offset + rows], m, t]
        inputs = [x.clone().requires_grad_() for x in inputs]
        scale = torch.tensor(1 / 0.07, dtype=F64, requires_grad=True)
        terms = loss_core(name, implementation)(
            Pairs(*inputs, ids[offset:offset + rows], ids, offset), chunk_size=chunk_size, **_core_kwargs(name, scale)
        )
        weights = torch.linspace(0.5, 1.5, rows, dtype=F64)  # a non-uniform upstream gradient
        (terms.per_anchor * weights).sum().backward()
        grads = [x.grad for x in inputs] + ([scale.grad] if name == "infonce" else [])
        result = (terms.per_anchor.detach(), grads, int(terms.dropped), int(terms.candidates))
        if reference is None:
            reference = result
            continue
        torch.testing.assert_close(result[0], reference[0], rtol=1e-12, atol=1e-12)
        for got, want in zip(result[1], reference[1]):
            torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)
        assert result[2:] == reference[2:]
    assert reference[0].abs().sum() > 0
    if name == "droptriple":
        assert reference[2] > 0  # clustered inputs really drop pairs
    assert (reference[0] > 0).sum() >= 3  # several anchors have an active hinge


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradcheck_chunked_cores(name: str) -> None:
    m, t, ids = _clustered(6, 4, clusters=2, seed=2)  # DropTriple drops 4 pairs here
    offset, rows = 2, 2
    inputs = [x.clone().requires_grad_() for x in (m[offset:offset + rows], t[offset:offset + rows], m, t)]
    if name == "infonce":  # the learnable scale is an input too
        inputs.append(torch.tensor(5.0, dtype=F64, requires_grad=True))
    core = loss_core(name, "chunked")

    def fn(rows_m, rows_t, cols_m, cols_t, *scale):
        kwargs = _core_kwargs(name, *scale)
        pairs = Pairs(rows_m, rows_t, cols_m, cols_t, ids[offset:offset + rows], ids, offset)
        return core(pairs, chunk_size=4, **kwargs).per_anchor

    assert fn(*inputs).abs().sum() > 0  # some hinge is active: the check is not vacuous
    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-7)


def test_temperature_tensor_gets_the_gradient() -> None:
    m, t, ids = _clustered(9, 5, clusters=3, seed=3)
    temperature = torch.tensor(0.1, dtype=F64, requires_grad=True)
    info_nce_loss(m, t, temperature=temperature, motion_ids=ids).backward()
    dense_temperature = torch.tensor(0.1, dtype=F64, requires_grad=True)
    info_nce_loss(m, t, temperature=dense_temperature, motion_ids=ids, implementation="dense").backward()
    assert temperature.grad is not None and temperature.grad.abs() > 0
    torch.testing.assert_close(temperature.grad, dense_temperature.grad, rtol=1e-10, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_low_precision_inputs_are_scored_in_fp32(name: str, dtype: torch.dtype) -> None:
    m, t, ids = _clustered(10, 8, clusters=3, seed=4)
    m_low, t_low = m.to(dtype).requires_grad_(), t.to(dtype).requires_grad_()
    m_32, t_32 = m.to(dtype).float().requires_grad_(), t.to(dtype).float().requires_grad_()
    fn = {
        "sh": sum_hinge_loss, "mh": max_hinge_loss, "droptriple": drop_triple_loss, "infonce": info_nce_loss,
    }[name]
    low = fn(m_low, t_low, motion_ids=ids, chunk_size=3)
    ref = fn(m_32, t_32, motion_ids=ids, chunk_size=3)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=1e-6, atol=1e-6)
    low.backward()
    ref.backward()
    assert m_low.grad.dtype == dtype and t_low.grad.dtype == dtype
    torch.testing.assert_close(m_low.grad, m_32.grad.to(dtype))
    torch.testing.assert_close(t_low.grad, t_32.grad.to(dtype))


def test_invalid_inputs_raise_clearly() -> None:
    with pytest.raises(ValueError, match="reduction"):
        sum_hinge_loss(M3, T3, reduction="avg")
    with pytest.raises(ValueError, match="one shape"):
        sum_hinge_loss(M3, T4)
    with pytest.raises(ValueError, match="ids"):
        max_hinge_loss(M3, T3, motion_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="chunk_size"):
        info_nce_loss(M3, T3, chunk_size=-1)
    with pytest.raises(ValueError, match="unknown loss"):
        loss_core("triplet")


# ----------------------------------------------------------------------------- objective, one process


def test_schedule_and_config() -> None:
    by_steps = LossConfig(name="droptriple", warmup_steps=100)
    assert scheduled_loss_name(by_steps, step=99, epoch=7) == "sh"
    assert scheduled_loss_name(by_steps, step=100, epoch=0) == "droptriple"
    by_epochs = LossConfig(name="mh", warmup_epochs=5)
    assert scheduled_loss_name(by_epochs, step=10_000, epoch=4) == "sh"
    assert scheduled_loss_name(by_epochs, step=0, epoch=5) == "mh"
    assert scheduled_loss_name(LossConfig(name="infonce"), step=0, epoch=0) == "infonce"
    with pytest.raises(ValueError, match="not both"):
        LossConfig(warmup_steps=1, warmup_epochs=1)
    with pytest.raises(ValueError, match="loss.name"):
        LossConfig(name="triplet")
    with pytest.raises(ValueError, match="threshold_mode"):
        LossConfig(threshold_mode="swap")


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_objective_single_process_matches_single_process_losses(name: str) -> None:
    m, t, ids = _clustered(12, 6, clusters=3, seed=5)
    cfg = LossConfig(name=name, chunk_size=5, threshold_text=0.7)
    logit_scale = torch.tensor(math.log(1 / 0.05), dtype=F64)
    out = GlobalBatchObjective(cfg)(m, t, ids, step=0, epoch=0, logit_scale=logit_scale)
    expected, stats = {
        "sh": lambda: sum_hinge_loss(m, t, motion_ids=ids, return_stats=True),
        "mh": lambda: max_hinge_loss(m, t, motion_ids=ids, return_stats=True),
        "droptriple": lambda: drop_triple_loss(m, t, threshold_text=0.7, motion_ids=ids, return_stats=True),
        "infonce": lambda: info_nce_loss(m, t, temperature=0.05, motion_ids=ids, return_stats=True),
    }[name]()
    assert out.loss_name == name
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)
    summary = reduce_stats(out.stats)  # no process group: a plain sum over one rank
    assert summary["loss"] == pytest.approx(expected.item(), rel=1e-12)
    assert summary["dropped"] == int(stats["dropped"])
    assert summary["global_batch"] == 12
    if name == "droptriple":
        assert summary["dropped"] > 0 and 0 < summary["drop_rate"] < 1


def test_objective_warmup_and_sum_reduction() -> None:
    m, t, ids = _clustered(8, 4, clusters=2, seed=6)
    objective = GlobalBatchObjective(LossConfig(name="droptriple", warmup_steps=3, reduction="sum"))
    early = objective(m, t, ids, step=2, epoch=0)
    late = objective(m, t, ids, step=3, epoch=0)
    assert (early.loss_name, late.loss_name) == ("sh", "droptriple")
    torch.testing.assert_close(early.loss, sum_hinge_loss(m, t, motion_ids=ids, reduction="sum"))
    torch.testing.assert_close(late.loss, drop_triple_loss(m, t, motion_ids=ids, reduction="sum"))
    with pytest.raises(ValueError, match="int64"):
        objective(m, t, ids.to(torch.int32), step=0, epoch=0)


def test_auto_chunk_width_bounds_the_cells_per_chunk() -> None:
    from rehamot.loss.negative_search import CHUNK_CELLS, chunk_width

    assert chunk_width(0, 32) == CHUNK_CELLS // 32  # a training step: every column at once
    assert chunk_width(0, 8192) == 512  # a big single-process batch: narrow chunks
    assert chunk_width(0, 10**9) == 64
    assert chunk_width(100, 8192) == 100  # an explicit width wins


@pytest.mark.parametrize("shared", [True, False])
def test_chosen_hinge_gradients_match_autograd(shared: bool) -> None:
    """The hand-written backward of the MH / DropTriple hinge equals autograd on the plain
    formula, with rows and columns one tensor (one process) and separate (gathered)."""

    gen = torch.Generator().manual_seed(3)
    m = F.normalize(torch.randn(40, 8, generator=gen, dtype=torch.float64), dim=1)
    t = F.normalize(m + 0.7 * torch.randn(40, 8, generator=gen, dtype=torch.float64), dim=1)
    ids = torch.arange(40) // 2  # pairs share a motion: excluded candidates
    for implementation in ("chunked", "dense"):
        leaves = [x.clone().requires_grad_(True) for x in (m, t)]
        cols = leaves if shared else [x.clone().requires_grad_(True) for x in (m, t)]
        core = loss_core("droptriple", implementation)
        terms = core(Pairs(leaves[0][8:24], leaves[1][8:24], cols[0], cols[1], ids[8:24], ids, 8),
                     margin=0.2, thresholds=DropThresholds(0.8, 0.8, 0.8, 0.8), chunk_size=7)
        (terms.per_anchor * torch.linspace(0.5, 2.0, 16, dtype=torch.float64)).sum().backward()
        grads = [x.grad for x in leaves] + ([] if shared else [x.grad for x in cols])
        if implementation == "chunked":
            chunked = grads
        else:
            for a, b in zip(chunked, grads):
                assert torch.allclose(a, b, atol=1e-12)
    assert float(chunked[0].norm()) > 0


# --- the top-k search: the same choices as the plain scan, whatever settles them ---------------


def _choices(pairs: Pairs, thresholds, **options):
    index_mt, index_tm, dropped, candidates = hardest_kept_negatives(pairs, thresholds=thresholds, **options)
    return index_mt.tolist(), index_tm.tolist(), int(dropped), int(candidates)


def _dense_choices(pairs: Pairs, thresholds: DropThresholds) -> tuple[list[int], list[int]]:
    """Each row's hardest kept negative from whole B x G matrices (first maximum on ties)."""
    from rehamot.loss.pairs import chunk_masks, drop_masks

    _, not_negative = chunk_masks(pairs, 0, pairs.num_cols)
    drop_mt, drop_tm = drop_masks(pairs, thresholds, not_negative)
    result = []
    for scores, drop in ((pairs.rows_m @ pairs.cols_t.T, drop_mt), (pairs.rows_t @ pairs.cols_m.T, drop_tm)):
        kept = ~(not_negative | drop)
        value, index = scores.masked_fill(~kept, float("-inf")).max(dim=1)
        result.append(torch.where(kept.any(1), index, -1).tolist())
    return result[0], result[1]


@pytest.mark.parametrize("local", [False, True])
@pytest.mark.parametrize("top_k", [1, 2, 8, 64])
def test_top_k_search_chooses_what_the_scan_chooses(top_k: int, local: bool) -> None:
    """Clustered embeddings drop many of each anchor's best candidates: with a small top_k
    most rows fall back to the scan, with a large one the top-k settle them; both exact."""
    m, t, ids = _clustered(300, 8, clusters=6, seed=7, spread=0.5)
    thresholds = DropThresholds(0.8, 0.75, 0.75, 0.8)
    pairs = Pairs(m[100:180], t[100:180], m, t, ids[100:180], ids, 100) if local else Pairs.single(m, t, ids)
    scan = _choices(pairs, thresholds, strategy="plain", chunk_size=37)
    topk = _choices(pairs, thresholds, strategy="topk", top_k=top_k, chunk_size=37)
    assert topk == scan
    assert (topk[0], topk[1]) == _dense_choices(pairs, thresholds)
    _, _, settled = negative_search.top_k_search(pairs, None, thresholds, top_k, 37)
    unsettled = int((~settled).sum())
    assert scan[2] > 0  # the thresholds really drop pairs
    if top_k <= 2:
        assert unsettled > 0  # the scan settles some rows
    if top_k == 64:
        assert unsettled < settled.numel() // 2  # the top-k settle most


def test_top_k_settles_ties_at_its_boundary_by_the_scan() -> None:
    """Twelve candidates tie for the best score; top_k=4 holds only some of them, and the
    chosen one must still be the lowest column among the tied kept ones."""
    dim = 4
    m = torch.zeros(13, dim, dtype=F64)
    t = torch.zeros(13, dim, dtype=F64)
    m[:, 0] = 1.0
    t[1:, 0] = 1.0  # every caption but the first scores 1 against every motion
    t[0, 1] = 1.0
    m[1:3, 2] = 1.0  # motions 1 and 2 lean elsewhere: anchor 0 drops them by motion similarity
    m = F.normalize(m, dim=1)
    ids = torch.arange(13)
    thresholds = DropThresholds(0.99, 2.0, 0.99, 2.0)
    pairs = Pairs.single(m, t, ids)
    scan = _choices(pairs, thresholds, strategy="plain")
    assert _choices(pairs, thresholds, strategy="topk", top_k=4) == scan
    assert _choices(pairs, thresholds, strategy="bounded") == scan
    assert scan[0][0] == 1  # anchor 0's tied best candidates: columns 1..12, the lowest kept is 1


def test_drops_are_counted_only_when_asked_and_choices_do_not_change() -> None:
    m, t, ids = _clustered(64, 8, clusters=4, seed=8, spread=0.5)
    pairs = Pairs.single(m, t, ids)
    thresholds = DropThresholds(0.8, 0.8, 0.8, 0.8)
    counted = _choices(pairs, thresholds)
    uncounted = _choices(pairs, thresholds, count_drops=False)
    assert counted[:2] == uncounted[:2] and counted[3] == uncounted[3]
    assert counted[2] > 0 and uncounted[2] == -1
    cfg = LossConfig(name="droptriple", warmup_steps=0, warmup_epochs=0)
    counted = _choices(pairs, drop_thresholds(cfg))
    objective = GlobalBatchObjective(cfg)
    out = objective(m, t, ids, step=5, epoch=1, count_drops=False)
    summary = reduce_stats(out.stats)
    assert math.isnan(summary["dropped"]) and math.isnan(summary["drop_rate"])
    again = objective(m, t, ids, step=5, epoch=1)
    assert float(again.loss) == float(out.loss) and reduce_stats(again.stats)["dropped"] == counted[2]


def test_the_probe_picks_plain_bounded_or_top_k() -> None:
    """The worst case, every pair dropped, goes to the plain scan (no wasted search); tight
    clusters whose best candidates are all dropped to the bounded scan; few drops to top-k."""
    m, t, ids = _clustered(512, 8, clusters=2, seed=9, spread=0.3)
    pairs = Pairs.single(m, t, ids)
    everything = DropThresholds(-0.99, -0.99, -0.99, -0.99)
    assert negative_search.probe(pairs, everything, negative_search.TOP_K) == "plain"
    nothing = DropThresholds(0.999, 0.999, 0.999, 0.999)
    assert negative_search.probe(pairs, nothing, negative_search.TOP_K) == "topk"
    m, t, ids = _clustered(512, 16, clusters=8, seed=9, spread=0.3)  # tight clusters: top-k all dropped
    assert negative_search.probe(Pairs.single(m, t, ids), DropThresholds(0.8, 0.8, 0.8, 0.8), 2) == "bounded"
    choices = _choices(pairs, everything)
    assert choices == _choices(pairs, everything, strategy="plain")
    assert set(choices[0]) == {-1} and set(choices[1]) == {-1}


@pytest.mark.parametrize("thresholds", [DropThresholds(0.8, 0.75, 0.75, 0.8), DropThresholds(0.7, 0.7, 0.7, 0.7),
                                        DropThresholds(0.95, 0.3, 0.3, 0.95)])
@pytest.mark.parametrize("local", [False, True])
def test_bounded_scan_chooses_and_counts_what_the_plain_scan_does(thresholds: DropThresholds, local: bool) -> None:
    """Tight clusters: at high thresholds the bound rules most (anchor, group) tiles out, and
    what it keeps gives the plain scan's choices and drop count, symmetric thresholds or not."""
    m, t, ids = _clustered(600, 16, clusters=12, seed=11, spread=0.3)
    ids[5], ids[17] = ids[17], ids[5]  # and a motion id shared by two captions
    ids[40] = ids[41]
    pairs = Pairs(m[200:300], t[200:300], m, t, ids[200:300], ids, 200) if local else Pairs.single(m, t, ids)
    plain = _choices(pairs, thresholds, strategy="plain", chunk_size=53)
    bounded = _choices(pairs, thresholds, strategy="bounded", chunk_size=53)
    assert bounded == plain
    assert plain[2] > 0  # pairs really are dropped
    assert (plain[0], plain[1]) == _dense_choices(pairs, thresholds)
    assert int(negative_search.count_dropped_pairs(pairs, thresholds, 53)) == plain[2]
    tiles = negative_search._BoundedTiles(pairs.rows_m, pairs.rows_t, pairs.row_ids, pairs.row_index(), pairs,
                                          thresholds, 53)
    if min(thresholds.mt_motion, thresholds.mt_text) >= 0.75:
        assert tiles.usable  # the bound prunes enough tiles to be used


def test_bound_never_rules_out_a_dropped_pair() -> None:
    """The bound on cos(x_i, member) holds for every pair, on clustered and random data."""
    for spread, clusters in ((0.3, 8), (1.0, 3), (5.0, 1)):
        m, t, _ = _clustered(400, 12, clusters=clusters, seed=12, spread=spread)
        groups = negative_search._group_columns(m, t)
        member = torch.empty(400, dtype=torch.int64)
        for slot, (lo, hi) in enumerate(groups.bounds):
            member[groups.order[lo:hi]] = slot
        for x, centres, lowest in ((m, groups.centres_m, groups.lowest_m), (t, groups.centres_t, groups.lowest_t)):
            bound = negative_search._may_exceed(x @ centres.T, lowest, x.shape[1])
            assert bool(((x @ x.T) <= bound.gather(1, member.expand(400, 400))).all())


@pytest.mark.parametrize("rows", [1, 5, 63, 64, 65, 130, 200])
def test_first_max_rows_takes_the_first_of_tied_rows(rows: int) -> None:
    """The blocked column reduction returns each column's first maximal row, -1 when empty."""
    gen = torch.Generator().manual_seed(rows)
    scores = torch.randint(0, 4, (rows, 37), generator=gen).float()  # many exact ties
    scores[:, 3] = float("-inf")
    expected = [int(torch.nonzero(column == column.max())[0]) if column.max() > float("-inf") else -1
                for column in scores.T]
    assert negative_search._first_max_rows(scores).tolist() == expected
