"""Retrieval metrics and protocols against hand-computed cases."""
from __future__ import annotations

import io

import numpy as np
import pytest
from rich.console import Console

from rehamot.evaluation.retrieval_eval import format_table
from rehamot.evaluation.retrieval_metrics import (
    caption_protocol_ranks,
    evaluate_protocols,
    nsim_ids,
    retrieval_metrics,
    tmr_batches,
    tmr_metrics,
    tmr_ranks,
)

# 5 captions of 3 motions (two multi-caption motions), rows = captions, columns = motions.
CAPTION_MOTION = np.array([0, 0, 1, 2, 2])
SCORES = np.array(
    [
        [0.9, 0.1, 0.2],  # c0 -> m0: rank 0
        [0.3, 0.5, 0.3],  # c1 -> m0: m1 beats it, m2 ties it -> rank 2 (ties count against)
        [0.4, 0.4, 0.1],  # c2 -> m1: m0 ties it -> rank 1
        [0.2, 0.6, 0.7],  # c3 -> m2: rank 0
        [0.8, 0.9, 0.0],  # c4 -> m2: rank 2
    ]
)


def test_captions_protocol_hand_computed():
    t2m, m2t = caption_protocol_ranks(SCORES, CAPTION_MOTION)
    assert t2m.tolist() == [0, 2, 1, 0, 2]
    # m0: best own caption c0 (0.9), nobody else >= 0.9; m1: own c2 = 0.4 < c1, c3, c4;
    # m2: best own c3 = 0.7, its weaker own caption c4 is not an incorrect item
    assert m2t.tolist() == [0, 3, 0]
    metrics = retrieval_metrics(SCORES, CAPTION_MOTION)
    assert metrics == pytest.approx(
        {
            "t2m/R@1": 40.0,
            "t2m/R@5": 100.0,
            "t2m/R@10": 100.0,
            "t2m/MedR": 2.0,
            "m2t/R@1": 200 / 3,
            "m2t/R@5": 100.0,
            "m2t/R@10": 100.0,
            "m2t/MedR": 1.0,
            "rsum": 40 + 100 + 100 + 200 / 3 + 100 + 100,
        }
    )
    assert all(type(v) is float for v in metrics.values())


def test_captions_medr_floors_the_median():
    # ranks [0, 1, 1, 2] -> median 1.0; ranks [0, 0, 1, 1] -> median 0.5 -> floor 0 -> MedR 1
    scores = np.array([[1.0, 0.0], [0.0, 1.0], [0.2, 0.9], [0.1, 0.8]])
    assert caption_protocol_ranks(scores, [0, 1, 0, 0])[0].tolist() == [0, 0, 1, 1]
    assert retrieval_metrics(scores, [0, 1, 0, 0])["t2m/MedR"] == 1.0


def test_motion_without_caption_is_an_error():
    with pytest.raises(ValueError, match="no caption.*motion index 1"):
        retrieval_metrics(SCORES, np.array([0, 0, 2, 2, 2]))
    with pytest.raises(ValueError, match="no caption"):
        evaluate_protocols(np.eye(3), np.eye(3)[[0, 0, 2]], [0, 0, 2], ["a", "b", "c"])


def test_non_finite_scores_are_rejected():
    bad = SCORES.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(bad, CAPTION_MOTION)


def test_tmr_ties_are_averaged_and_medr_is_not_floored():
    sims = np.array(
        [
            [0.5, 0.5, 0.5],  # three-way tie at positions 0,1,2 -> 1.0
            [0.2, 0.8, 0.1],  # 0
            [0.9, 0.3, 0.3],  # one better, two tied at positions 1,2 -> 1.5
        ]
    )
    t2m, m2t = tmr_ranks(sims)
    assert t2m.tolist() == [1.0, 0.0, 1.5]
    assert m2t.tolist() == [1.0, 0.0, 1.0]  # columns: [.5,.2,.9], [.5,.8,.3], [.5,.1,.3]
    metrics = tmr_metrics(sims)
    assert metrics == pytest.approx(
        {
            "t2m/R@1": 100 / 3, "t2m/R@2": 100.0, "t2m/R@3": 100.0, "t2m/R@5": 100.0,
            "t2m/R@10": 100.0, "t2m/MedR": 2.0,
            "m2t/R@1": 100 / 3, "m2t/R@2": 100.0, "m2t/R@3": 100.0, "m2t/R@5": 100.0,
            "m2t/R@10": 100.0, "m2t/MedR": 2.0,
        }
    )
    # a tie at positions 0,1 gives rank 0.5, which counts for R@1; MedR keeps the half
    halves = np.array([[0.7, 0.7], [0.1, 0.4]])
    assert tmr_ranks(halves)[0].tolist() == [0.5, 0.0]
    assert tmr_metrics(halves)["t2m/R@1"] == 100.0
    assert tmr_metrics(halves)["t2m/MedR"] == 1.25


# texts x motions; caption 0 and caption 1 are near-paraphrases (cosine 0.93), caption 2 is not
THRESHOLD_SIMS = np.array([[0.5, 0.9, 0.1], [0.2, 0.6, 0.7], [0.3, 0.4, 0.8]])
_SIN = np.sqrt(1 - 0.93**2)
THRESHOLD_TEXT = np.array([[1.0, 0.0], [0.93, _SIN], [0.0, 1.0]])


def test_tmr_threshold_marks_similar_captions_correct_in_both_directions():
    plain_t2m, plain_m2t = tmr_ranks(THRESHOLD_SIMS)
    assert plain_t2m.tolist() == [1.0, 1.0, 0.0]
    assert plain_m2t.tolist() == [0.0, 1.0, 0.0]
    # 0.93 > 2*0.95 - 1 = 0.9: text 0 may retrieve motion 1 (t2m row 0 -> 0.9 is correct),
    # and motion 1 may retrieve text 0 (m2t row 1 -> 0.9 is correct). Text 1 still loses to
    # motion 2 (0.7 > 0.6): motion 2's caption is not similar.
    t2m, m2t = tmr_ranks(THRESHOLD_SIMS, THRESHOLD_TEXT, 0.95)
    assert t2m.tolist() == [0.0, 1.0, 0.0]
    assert m2t.tolist() == [0.0, 0.0, 0.0]
    metrics = tmr_metrics(THRESHOLD_SIMS, THRESHOLD_TEXT, 0.95)
    assert metrics["t2m/R@1"] == pytest.approx(200 / 3)
    assert metrics["m2t/R@1"] == 100.0
    assert metrics["t2m/MedR"] == 1.0
    # the rule is cos > 2t - 1, not cos > t: at t = 0.97 (bound 0.94) nothing extra counts
    assert tmr_ranks(THRESHOLD_SIMS, THRESHOLD_TEXT, 0.97)[1].tolist() == [0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="both text_emb and threshold"):
        tmr_metrics(THRESHOLD_SIMS, THRESHOLD_TEXT)


def _loop_caption_ranks(scores, owners):
    """The definition, one query at a time."""
    t2m = [sum(s >= row[o] for j, s in enumerate(row) if j != o) for row, o in zip(scores, owners)]
    m2t = []
    for m in range(scores.shape[1]):
        column = scores[:, m]
        best = max(column[owners == m])
        m2t.append(sum(s >= best for c, s in enumerate(column) if owners[c] != m))
    return t2m, m2t


def _loop_tmr_ranks(sims):
    """TMR's way: positions of the ground truth in the sorted row, averaged over ties."""
    ranks = []
    for i, row in enumerate(sims):
        positions = np.flatnonzero(np.sort(-row) == -row[i])
        ranks.append(positions.mean())
    return ranks


def test_vectorised_ranks_match_per_query_loops_on_tied_random_scores():
    rng = np.random.default_rng(0)
    owners = np.concatenate([np.arange(15), rng.integers(0, 15, 25)])
    scores = rng.integers(0, 6, (40, 15)) / 5.0  # few levels -> many ties
    t2m, m2t = caption_protocol_ranks(scores, owners)
    assert (t2m.tolist(), m2t.tolist()) == _loop_caption_ranks(scores, owners)
    sims = rng.integers(0, 4, (20, 20)) / 3.0
    t2m, m2t = tmr_ranks(sims)
    assert t2m.tolist() == _loop_tmr_ranks(sims)
    assert m2t.tolist() == _loop_tmr_ranks(sims.T)


def test_tmr_batches_follow_tmr_seeding():
    batches = tmr_batches(70)
    assert [b.shape for b in batches] == [(32,), (32,)]
    assert len(set(np.concatenate(batches).tolist())) == 64
    assert all(0 <= b.min() and b.max() < 70 for b in batches)
    saved = np.random.get_state()
    try:  # TMR's retrieval.py: np.random.seed(0); np.random.shuffle(arange(N))
        np.random.seed(0)
        reference = np.arange(70)
        np.random.shuffle(reference)
        np.random.seed(0)
        untouched = np.random.random()
        np.random.seed(0)
        tmr_batches(70)
        assert np.random.random() == untouched  # our split leaves the global generator alone
    finally:
        np.random.set_state(saved)
    np.testing.assert_array_equal(np.concatenate(batches), reference[:64])
    assert batches[0][:5].tolist() == [26, 27, 48, 22, 30]  # pinned: numpy legacy stream, seed 0
    assert not np.array_equal(tmr_batches(70, seed=1)[0], batches[0])
    assert tmr_batches(31) == [] and len(tmr_batches(64, size=16)) == 4


def test_protocols_differ_on_the_same_embeddings():
    # motion 0 has a second caption that points at motion 1; TMR only sees first captions
    motions = np.eye(2)
    captions = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    results = evaluate_protocols(motions, captions, [0, 0, 1], ["m0", "m1"], protocols=("captions", "tmr-all"))
    assert results["captions"]["t2m/R@1"] == pytest.approx(200 / 3)  # ranks [0, 1, 0]
    assert results["captions"]["m2t/R@1"] == 50.0  # m1 ties with motion 0's caption c1
    assert results["captions"]["m2t/MedR"] == 1.0  # median 0.5, floored
    assert results["tmr-all"]["t2m/R@1"] == 100.0 and results["tmr-all"]["m2t/R@1"] == 100.0
    # two identical motions: the captions protocol counts the tie against, TMR averages it
    same = np.array([[1.0, 0.0], [1.0, 0.0]])
    results = evaluate_protocols(same, same, [0, 1], ["a", "b"], protocols=("captions", "tmr-all"))
    assert results["captions"]["t2m/R@1"] == 0.0 and results["captions"]["t2m/MedR"] == 2.0
    assert results["tmr-all"]["t2m/R@1"] == 100.0 and results["tmr-all"]["t2m/MedR"] == 1.5


def test_first_caption_default_and_override():
    motions = np.eye(2)
    # captions listed out of motion order: motion 0's lowest caption index is 1
    captions = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    owners = [1, 0, 0]
    default = evaluate_protocols(motions, captions, owners, ["a", "b"], protocols=("tmr-all",))
    assert default["tmr-all"]["t2m/R@1"] == 100.0
    # choosing caption 2 (which looks like motion 1) for motion 0: motion 1 beats it
    chosen = evaluate_protocols(motions, captions, owners, ["a", "b"], protocols=("tmr-all",), first_caption=[2, 0])
    assert chosen["tmr-all"]["t2m/R@1"] == 50.0
    with pytest.raises(ValueError, match="caption of motion"):
        evaluate_protocols(motions, captions, owners, ["a", "b"], protocols=("tmr-all",), first_caption=[0, 1])


def _unit(rng, rows, dim):
    x = rng.standard_normal((rows, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_threshold_protocol_is_named_after_the_sentence_model():
    motions = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    captions = np.array([[0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    args = (motions, captions, [0, 1, 2], ["a", "b", "c"])
    out = evaluate_protocols(*args, protocols=("tmr-threshold",), sentence_emb=THRESHOLD_TEXT,
                             sentence_model_name="MiniLM")
    assert list(out) == ["tmr-threshold(MiniLM)"]
    assert out["tmr-threshold(MiniLM)"] == tmr_metrics(captions @ motions.T, THRESHOLD_TEXT, 0.95)
    assert list(evaluate_protocols(*args, protocols=("tmr-threshold",), sentence_emb=THRESHOLD_TEXT)) == ["tmr-threshold"]
    other = evaluate_protocols(*args, protocols=("tmr-threshold",), sentence_emb=THRESHOLD_TEXT,
                               sentence_model_name="MiniLM", threshold=0.9)
    assert list(other) == ["tmr-threshold(MiniLM, 0.9)"]
    with pytest.raises(ValueError, match="sentence_emb"):
        evaluate_protocols(*args, protocols=("tmr-threshold",))
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate_protocols(*args, protocols=("tmr-guo",))


def test_batch32_sorts_by_id_and_averages_every_metric():
    rng = np.random.default_rng(3)
    n = 70
    motions = _unit(rng, n, 4)
    captions = _unit(rng, n, 4) * 1.5 + motions  # correlated, far from perfect
    captions /= np.linalg.norm(captions, axis=1, keepdims=True)
    ids = [f"{(n - i) * 7 % 101:05d}" for i in range(n)]  # distinct, not in index order
    out = evaluate_protocols(motions, captions, np.arange(n), ids, protocols=("tmr-all", "tmr-batch32"))
    by_id = np.argsort(np.array(ids), kind="stable")
    per_batch = [tmr_metrics(captions[by_id[b]] @ motions[by_id[b]].T) for b in tmr_batches(n)]
    expected = {k: float(np.mean([m[k] for m in per_batch])) for k in per_batch[0]}
    assert out["tmr-batch32"] == expected
    # index order instead of id order gives other galleries, so other numbers
    unsorted = [tmr_metrics(captions[b] @ motions[b].T) for b in tmr_batches(n)]
    assert {k: float(np.mean([m[k] for m in unsorted])) for k in unsorted[0]} != expected
    assert out["tmr-batch32"]["t2m/R@1"] > out["tmr-all"]["t2m/R@1"]  # 32 items are easier
    with pytest.raises(ValueError, match="at least 32"):
        evaluate_protocols(motions[:31], captions[:31], np.arange(31), ids[:31], protocols=("tmr-batch32",))


def test_nsim_lists_ship_with_the_package(tmp_path):
    humanml = nsim_ids("humanml3d")
    kit = nsim_ids("kitml")
    assert len(humanml) == 100 and len(set(humanml)) == 100 and humanml[0] == "007742"
    assert len(kit) == 101 and kit[0] == "00355"
    listed = tmp_path / "mine.txt"
    listed.write_text("b\n\nd\n", encoding="utf-8")
    assert nsim_ids(listed) == ["b", "d"] and nsim_ids(str(listed)) == ["b", "d"]
    with pytest.raises(ValueError, match="humanml3d, kitml"):
        nsim_ids("humanml")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"nsim list {latin1}: not UTF-8"):
        nsim_ids(latin1)


def test_nsim_protocol_scores_the_listed_subset(tmp_path):
    rng = np.random.default_rng(5)
    motions = _unit(rng, 6, 4)
    captions = _unit(rng, 6, 4)
    ids = ["a", "b", "c", "d", "e", "f"]
    listed = tmp_path / "nsim.txt"
    listed.write_text("e\nb\nd\n", encoding="utf-8")
    out = evaluate_protocols(motions, captions, np.arange(6), ids, protocols=("tmr-nsim",), nsim_ids=listed)
    subset = [4, 1, 3]
    assert out["tmr-nsim"] == tmr_metrics(captions[subset] @ motions[subset].T)
    assert out == evaluate_protocols(motions, captions, np.arange(6), ids, protocols=("tmr-nsim",),
                                     nsim_ids=["e", "b", "d"])
    with pytest.raises(ValueError, match="1 of 2 nsim ids"):
        evaluate_protocols(motions, captions, np.arange(6), ids, protocols=("tmr-nsim",), nsim_ids=["a", "z"])
    with pytest.raises(ValueError, match="needs nsim_ids"):
        evaluate_protocols(motions, captions, np.arange(6), ids, protocols=("tmr-nsim",))


def test_embeddings_must_be_unit_vectors():
    with pytest.raises(ValueError, match="unit vectors"):
        evaluate_protocols(2 * np.eye(2), np.eye(2), [0, 1], ["a", "b"])


def test_format_table_lists_each_protocol():
    results = {
        "captions": retrieval_metrics(SCORES, CAPTION_MOTION),
        "tmr-all": tmr_metrics(THRESHOLD_SIMS),
    }
    table = format_table(results, title="test")
    header = [c.header for c in table.columns]
    assert header[:5] == ["protocol", "direction", "R@1", "R@2", "R@3"] and header[-1] == "rsum"
    console = Console(file=io.StringIO(), width=110)
    console.print(table)
    text = console.file.getvalue()
    assert "captions" in text and "tmr-all" in text and "506.67" in text and "66.67" in text
    assert "text→motion" in text and "motion→text" in text and "…" not in text
    narrow = Console(file=io.StringIO(), width=80)  # the captions protocol alone fits a terminal
    narrow.print(format_table({"captions": results["captions"]}))
    assert "…" not in narrow.file.getvalue()
