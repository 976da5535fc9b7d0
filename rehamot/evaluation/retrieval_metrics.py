"""Retrieval metrics and the named evaluation protocols (numpy only).

Published motion-text numbers come from protocols that are easy to mix up, so every result
here is keyed by its protocol name:

- ``captions``: the original Rehamot protocol: every test caption queries all motions, every
  motion queries all captions; pessimistic ties; MedR = floor(median rank) + 1.
- ``tmr-all``, ``tmr-threshold(<model>)``, ``tmr-nsim``, ``tmr-batch32``: TMR's protocols
  (a)-(d) (Petrovich et al., ICCV 2023), one caption per motion (its first), ties averaged,
  MedR = median rank + 1.

The TMR rules follow its published code (github.com/Mathux/TMR, ``src/model/metrics.py``:
``all_contrastive_metrics`` / ``contrastive_metrics`` / ``break_ties_average`` /
``cols2metrics``, and ``retrieval.py`` for the batch-of-32 split), re-derived in closed form:
a query's averaged tie position in the sorted row is ``#better + (#tied - 1) / 2``.
TMR rounds to 2 decimals when it prints; we return unrounded floats (batch means are taken
before any rounding, as TMR does); `rehamot.evaluation.retrieval_eval.format_table` prints 2 decimals.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import resources
from os import PathLike
from pathlib import Path

import numpy as np

PROTOCOLS = ("captions", "tmr-all", "tmr-threshold", "tmr-nsim", "tmr-batch32")
NSIM_CORPORA = ("humanml3d", "kitml")
TMR_THRESHOLD = 0.95
TMR_BATCH_SIZE = 32
CAPTIONS_RECALL_KS = (1, 5, 10)
TMR_RECALL_KS = (1, 2, 3, 5, 10)
_UNIT_NORM_ATOL = 1e-3  # cosine == dot product only for unit vectors; fp16 exports stay inside


# --------------------------------------------------------------------------- input checks


def _as_matrix(values: np.ndarray, name: str) -> np.ndarray:
    matrix = np.asarray(values)
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ValueError(f"{name} must be a non-empty 2-D matrix, got shape {matrix.shape}")
    if matrix.dtype not in (np.float32, np.float64):
        matrix = matrix.astype(np.float32)  # numpy has no fast fp16/bf16/int matmul
    if not np.isfinite(matrix).all():
        # NaN compares False everywhere and would silently count as a perfect rank
        raise ValueError(f"{name} contains NaN or inf")
    return matrix


def _as_unit_rows(values: np.ndarray, name: str) -> np.ndarray:
    matrix = _as_matrix(values, name)
    norms = np.linalg.norm(matrix.astype(np.float64), axis=1)
    worst = float(np.max(np.abs(norms - 1.0)))
    if worst > _UNIT_NORM_ATOL:
        raise ValueError(f"{name} rows must be unit vectors (largest |norm - 1| = {worst:.3g})")
    return matrix


def _check_caption_motion(caption_motion: np.ndarray, num_captions: int, num_motions: int) -> np.ndarray:
    owners = np.asarray(caption_motion)
    if owners.shape != (num_captions,) or not np.issubdtype(owners.dtype, np.integer):
        raise ValueError(
            f"caption_motion must be {num_captions} integer motion indices, "
            f"got shape {owners.shape} dtype {owners.dtype}"
        )
    if owners.min() < 0 or owners.max() >= num_motions:
        raise ValueError(f"caption_motion holds indices outside [0, {num_motions})")
    uncaptioned = np.flatnonzero(np.bincount(owners, minlength=num_motions) == 0)
    if uncaptioned.size:
        # such a motion has no correct caption: its motion->text rank is undefined
        raise ValueError(
            f"{uncaptioned.size} motion(s) have no caption, e.g. motion index {int(uncaptioned[0])}"
        )
    return owners.astype(np.intp)


# --------------------------------------------------------------------------- captions protocol


def _captions_summary(ranks: np.ndarray) -> dict[str, float]:
    summary = {f"R@{k}": 100 * float(np.count_nonzero(ranks < k)) / ranks.size for k in CAPTIONS_RECALL_KS}
    summary["MedR"] = float(np.floor(np.median(ranks)) + 1)
    return summary


def caption_protocol_ranks(scores: np.ndarray, caption_motion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer ranks (t2m per caption, m2t per motion) of the all-captions protocol.

    A rank is the number of *incorrect* items scoring >= the query's best correct item.
    """
    scores = _as_matrix(scores, "scores")
    num_captions, num_motions = scores.shape
    owners = _check_caption_motion(caption_motion, num_captions, num_motions)
    own = scores[np.arange(num_captions), owners]
    # text->motion: exactly one correct motion, and it is among those scoring >= itself
    t2m = np.count_nonzero(scores >= own[:, None], axis=1) - 1
    # motion->text: the best of the motion's own captions sets the bar; own captions that
    # reach it (ties with the best) are correct, so they are taken off the count
    best = np.full(num_motions, -np.inf, dtype=scores.dtype)
    np.maximum.at(best, owners, own)
    reaching = np.count_nonzero(scores >= best[None, :], axis=0)
    own_reaching = np.bincount(owners, weights=own >= best[owners], minlength=num_motions)
    m2t = reaching - own_reaching.astype(np.int64)
    return t2m, m2t


def retrieval_metrics(scores: np.ndarray, caption_motion: np.ndarray) -> dict[str, float]:
    """The all-captions protocol on a (num_captions, num_motions) similarity matrix.

    Keys: t2m/R@{1,5,10}, t2m/MedR, m2t/R@{1,5,10}, m2t/MedR, rsum (the six recalls added).
    """
    t2m, m2t = caption_protocol_ranks(scores, caption_motion)
    metrics: dict[str, float] = {}
    for direction, ranks in (("t2m", t2m), ("m2t", m2t)):
        for key, value in _captions_summary(ranks).items():
            metrics[f"{direction}/{key}"] = value
    metrics["rsum"] = float(sum(v for k, v in metrics.items() if "/R@" in k))
    return metrics


# --------------------------------------------------------------------------- TMR protocols


def _tmr_ranks(sims: np.ndarray, correct: np.ndarray | None) -> np.ndarray:
    """TMR's averaged tie position of each row's ground truth (diagonal, or best `correct`)."""
    if correct is None:
        truth = np.diagonal(sims)
    else:
        # TMR: "take as GT the minimum score of similar values" (of distances = -sims)
        truth = np.where(correct, sims, -np.inf).max(axis=1)
    better = np.count_nonzero(sims > truth[:, None], axis=1)
    tied = np.count_nonzero(sims == truth[:, None], axis=1)  # includes the truth itself
    return better + (tied - 1) / 2.0


def _tmr_summary(ranks: np.ndarray) -> dict[str, float]:
    summary = {f"R@{k}": 100 * float(np.count_nonzero(ranks < k)) / ranks.size for k in TMR_RECALL_KS}
    summary["MedR"] = float(np.median(ranks) + 1)  # no floor: averaged ties give halves
    return summary


def tmr_ranks(
    sims: np.ndarray, text_emb: np.ndarray | None = None, threshold: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """TMR's (t2m, m2t) ranks for a square text x motion matrix, ground truth on the diagonal."""
    sims = _as_matrix(sims, "sims")
    size = sims.shape[0]
    if sims.shape != (size, size):
        raise ValueError(f"TMR metrics need a square matrix (one caption per motion), got {sims.shape}")
    if (text_emb is None) != (threshold is None):
        raise ValueError("the threshold rule needs both text_emb and threshold (or neither)")
    correct = None
    if text_emb is not None:
        text = _as_unit_rows(text_emb, "text_emb")
        if text.shape[0] != size:
            raise ValueError(f"text_emb has {text.shape[0]} rows for a {size}x{size} matrix")
        # TMR maps the threshold from [0, 1] to cosine space: cos > 2*threshold - 1
        correct = (text @ text.T) > 2 * float(threshold) - 1
        np.fill_diagonal(correct, True)  # the pair itself is always correct (cos = 1 in TMR)
    # the same text-similarity rows serve both directions: row i is caption i's neighbours,
    # i.e. the items that count as correct for text i (t2m) and for motion i (m2t), as in TMR
    return _tmr_ranks(sims, correct), _tmr_ranks(sims.T, correct)


def tmr_metrics(
    sims: np.ndarray, text_emb: np.ndarray | None = None, threshold: float | None = None
) -> dict[str, float]:
    """TMR's metrics on a square (texts, motions) matrix with the ground truth on the diagonal.

    With `text_emb` (unit sentence embeddings of the captions, row i for caption i) and
    `threshold`, any item whose caption has cosine > 2*threshold - 1 with the query's caption
    is also correct, in both directions; the best-scoring correct item gives the rank.
    Keys: t2m/R@{1,2,3,5,10}, t2m/MedR and the same for m2t.
    """
    t2m, m2t = tmr_ranks(sims, text_emb, threshold)
    metrics: dict[str, float] = {}
    for direction, ranks in (("t2m", t2m), ("m2t", m2t)):
        for key, value in _tmr_summary(ranks).items():
            metrics[f"{direction}/{key}"] = value
    return metrics


def tmr_batches(num_items: int, size: int = TMR_BATCH_SIZE, seed: int = 0) -> list[np.ndarray]:
    """TMR's small-gallery split: positions into the id-sorted items, floor(N/size) batches.

    TMR calls np.random.seed(seed) then np.random.shuffle(arange(N)); the legacy global
    generator is a RandomState, so a private RandomState(seed) gives the same permutation
    without touching the caller's global random state.
    """
    if num_items < 0 or size < 1:
        raise ValueError(f"need num_items >= 0 and size >= 1, got {num_items}, {size}")
    order = np.arange(num_items)
    np.random.RandomState(seed).shuffle(order)
    return [order[i * size : (i + 1) * size] for i in range(num_items // size)]


def _mean_over(per_batch: Sequence[Mapping[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([m[key] for m in per_batch])) for key in per_batch[0]}


# --------------------------------------------------------------------------- nsim id lists


def _parse_ids(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def nsim_ids(corpus: str | PathLike[str]) -> list[str]:
    """TMR's fixed nsim test ids: `humanml3d` (100 ids), `kitml` (101 ids), or an id-list file."""
    name = str(corpus)
    if name in NSIM_CORPORA:
        packaged = resources.files("rehamot.evaluation.protocol_lists").joinpath(f"{name}-nsim_test.txt")
        return _parse_ids(packaged.read_text(encoding="utf-8"))
    path = Path(name)
    if path.is_file():
        try:
            return _parse_ids(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"nsim list {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    raise ValueError(
        f"unknown nsim list {name!r}: give a corpus name ({', '.join(NSIM_CORPORA)}) "
        "or the path of a file with one motion id per line"
    )


def _nsim_indices(source: str | PathLike[str] | Sequence[str] | None, motion_ids: Sequence[str]) -> np.ndarray:
    if source is None:
        raise ValueError(
            "protocol tmr-nsim needs nsim_ids: a corpus name (humanml3d, kitml), "
            "an id-list path, or a list of motion ids"
        )
    ids = nsim_ids(source) if isinstance(source, (str, PathLike)) else [str(i) for i in source]
    if len(set(ids)) != len(ids) or not ids:
        raise ValueError("the nsim id list is empty or repeats an id")
    position = {motion_id: index for index, motion_id in enumerate(motion_ids)}
    missing = [i for i in ids if i not in position]
    if missing:
        # a partial subset would not be TMR's protocol (c); refuse rather than report it
        raise ValueError(
            f"{len(missing)} of {len(ids)} nsim ids are not among the evaluated motions, "
            f"e.g. {missing[:3]}"
        )
    return np.array([position[i] for i in ids], dtype=np.intp)


# --------------------------------------------------------------------------- protocol layer


def _first_captions(owners: np.ndarray, num_motions: int, first_caption: np.ndarray | None) -> np.ndarray:
    if first_caption is None:
        first = np.full(num_motions, owners.size, dtype=np.intp)
        np.minimum.at(first, owners, np.arange(owners.size))
        return first  # every motion has a caption (checked), so no sentinel is left
    first = np.asarray(first_caption)
    if first.shape != (num_motions,) or not np.issubdtype(first.dtype, np.integer):
        raise ValueError(f"first_caption must be {num_motions} integer caption indices")
    if first.min() < 0 or first.max() >= owners.size or (owners[first] != np.arange(num_motions)).any():
        raise ValueError("first_caption[m] must index a caption of motion m")
    return first.astype(np.intp)


def threshold_protocol_name(sentence_model_name: str | None, threshold: float = TMR_THRESHOLD) -> str:
    """`tmr-threshold(MiniLM)`; a threshold other than TMR's 0.95 is written into the name."""
    parts = [p for p in (sentence_model_name, None if threshold == TMR_THRESHOLD else f"{threshold:g}") if p]
    return f"tmr-threshold({', '.join(parts)})" if parts else "tmr-threshold"


def evaluate_protocols(
    motion_emb: np.ndarray,
    caption_emb: np.ndarray,
    caption_motion: np.ndarray,
    motion_ids: Sequence[str],
    *,
    protocols: Sequence[str] = ("captions",),
    first_caption: np.ndarray | None = None,
    sentence_emb: np.ndarray | None = None,
    sentence_model_name: str | None = None,
    threshold: float = TMR_THRESHOLD,
    nsim_ids: str | PathLike[str] | Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of each requested protocol, keyed by the protocol's printed name.

    motion_emb (M, D) and caption_emb (C, D) are unit vectors; caption_motion (C,) gives each
    caption's motion index; motion_ids (M,) are the motions' ids (tmr-batch32 sorts by id);
    first_caption (M,) picks each motion's caption for the TMR protocols (default: its lowest
    caption index); sentence_emb (C, d) are unit sentence embeddings for tmr-threshold;
    nsim_ids is a corpus name, an id-list path or the ids themselves for tmr-nsim.
    """
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol(s) {unknown}; choose from {', '.join(PROTOCOLS)}")
    motions = _as_unit_rows(motion_emb, "motion_emb")
    captions = _as_unit_rows(caption_emb, "caption_emb")
    if motions.shape[1] != captions.shape[1]:
        raise ValueError(f"embedding sizes differ: motions {motions.shape[1]}, captions {captions.shape[1]}")
    num_motions = motions.shape[0]
    owners = _check_caption_motion(caption_motion, captions.shape[0], num_motions)
    ids = [str(i) for i in motion_ids]
    if len(ids) != num_motions or len(set(ids)) != num_motions:
        raise ValueError(f"motion_ids must be {num_motions} distinct ids, one per motion")
    first = _first_captions(owners, num_motions, first_caption)
    first_text = captions[first]  # TMR evaluates one caption per motion: its first
    first_sims: list[np.ndarray] = []  # computed once, shared by tmr-all and tmr-threshold

    def all_first_sims() -> np.ndarray:
        if not first_sims:
            first_sims.append(first_text @ motions.T)
        return first_sims[0]

    results: dict[str, dict[str, float]] = {}
    for protocol in dict.fromkeys(protocols):  # keep order, drop repeats
        if protocol == "captions":
            results[protocol] = retrieval_metrics(captions @ motions.T, owners)
        elif protocol == "tmr-all":
            results[protocol] = tmr_metrics(all_first_sims())
        elif protocol == "tmr-threshold":
            if sentence_emb is None:
                raise ValueError("protocol tmr-threshold needs sentence_emb (C, d) of the captions")
            sentences = np.asarray(sentence_emb)
            if sentences.ndim != 2 or sentences.shape[0] != captions.shape[0]:
                raise ValueError(f"sentence_emb must have one row per caption ({captions.shape[0]})")
            name = threshold_protocol_name(sentence_model_name, threshold)
            results[name] = tmr_metrics(all_first_sims(), sentences[first], threshold)
        elif protocol == "tmr-nsim":
            subset = _nsim_indices(nsim_ids, ids)
            results[protocol] = tmr_metrics(first_text[subset] @ motions[subset].T)
        elif protocol == "tmr-batch32":
            by_id = np.array(sorted(range(num_motions), key=ids.__getitem__), dtype=np.intp)
            batches = tmr_batches(num_motions, TMR_BATCH_SIZE, seed=0)
            if not batches:
                raise ValueError(f"tmr-batch32 needs at least {TMR_BATCH_SIZE} motions, got {num_motions}")
            per_batch = []
            for positions in batches:
                members = by_id[positions]
                per_batch.append(tmr_metrics(first_text[members] @ motions[members].T))
            results[protocol] = _mean_over(per_batch)  # MedR averaged too, as in TMR
    return results
