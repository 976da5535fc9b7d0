"""Text-to-motion generation metrics of Guo et al. (CVPR 2022), numpy + scipy only.

Generation papers on HumanML3D / KIT-ML report R-precision, matching score, FID, diversity and
multimodality computed on the embeddings of Guo et al.'s pretrained text and motion
evaluators, following their repository (``EricGuo5513/text-to-motion``: ``utils/metrics.py`` and
``final_evaluations.py``). This module re-derives that protocol so that numbers computed from
our own embeddings are comparable with the published tables:

- R-precision and matching score: consecutive groups of ``batch_size`` (32) text/motion pairs,
  the last incomplete group dropped (Guo's loader uses ``drop_last``); within a group each text
  ranks the group's motions by Euclidean distance.
- FID: Fréchet distance between Gaussians fitted with ``np.mean`` / ``np.cov(rowvar=False)``,
  the usual ``scipy.linalg.sqrtm`` computation and its ``eps * I`` fallback.
- Diversity / multimodality: mean distance between randomly paired embeddings (300 pairs over
  the whole set; 10 pairs among each prompt's generations), each index set drawn without
  replacement, first and second draws independent, as Guo draws them.
- ``mean_ci95``: mean and 95% confidence half-width over replications (population std).

What differs from Guo's code:

- Random draws use ``np.random.default_rng(seed)`` instead of numpy's global state, so a value is
  reproducible from its seed (it cannot reproduce Guo's exact draws; only the estimator is the same).
- Distances are computed from coordinate differences rather than ``|a|^2 - 2ab + |b|^2``; the
  expansion can go slightly negative (NaN after the square root) for near-identical pairs.
  Ranks coincide with Guo's except for exact or round-off-level ties, which Guo leaves to an
  unstable ``argsort``; here ties are broken by column order (a stable argsort).
- Sets too small for the requested number of random pairs are warned about and use as many pairs
  as Guo's precondition (strictly more items than pairs) allows, where Guo's code asserts.
- Inputs are validated (shapes, finiteness) with a ``ValueError`` instead of ``assert``.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy.linalg import LinAlgWarning, sqrtm
from scipy.spatial.distance import cdist

GUO_BATCH_SIZE = 32
GUO_TOP_K = 3
GUO_DIVERSITY_TIMES = 300
GUO_MULTIMODALITY_TIMES = 10
FID_EPS = 1e-6
_IMAGINARY_ATOL = 1e-3  # FID literature's bound on sqrtm's imaginary round-off (diagonal)


# --------------------------------------------------------------------------- input checks


def _as_float64(values, name: str, ndim: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim or 0 in array.shape:
        raise ValueError(f"{name} must be a non-empty {ndim}-D array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or inf")
    return array


def _as_pairs(text_emb, motion_emb) -> tuple[np.ndarray, np.ndarray]:
    text = _as_float64(text_emb, "text_emb", 2)
    motion = _as_float64(motion_emb, "motion_emb", 2)
    if text.shape != motion.shape:
        raise ValueError(f"text_emb {text.shape} and motion_emb {motion.shape} must have the same shape")
    return text, motion


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _rows_in_full_batches(num_rows: int, batch_size: int) -> int:
    """Rows kept when the last incomplete batch is dropped (Guo's loader: drop_last=True)."""
    batch_size = _positive_int(batch_size, "batch_size")
    if num_rows < batch_size:
        raise ValueError(f"{num_rows} text/motion pairs is fewer than one batch of batch_size={batch_size}")
    return num_rows - num_rows % batch_size


# --------------------------------------------------------------------------- R-precision, matching score


def r_precision(text_emb, motion_emb, batch_size: int = GUO_BATCH_SIZE, top_k: int = GUO_TOP_K) -> np.ndarray:
    """Top-1..top_k R-precision of text -> motion retrieval in groups of ``batch_size`` pairs.

    Row i of ``text_emb`` and ``motion_emb`` is a matching pair. The rows are cut into consecutive
    groups of ``batch_size`` (the last incomplete group is dropped); in each group every text ranks
    the group's motions by Euclidean distance, and counts as a hit at k when its own motion is
    among the k nearest. Ties: the own motion's rank is its position in a stable argsort of the
    text's distance row, i.e. (motions strictly closer) + (equally close motions in an earlier
    column). Returns a float64 array of shape (top_k,): hits at k = 1..top_k (cumulative) over
    all rows used.
    """
    text, motion = _as_pairs(text_emb, motion_emb)
    top_k = _positive_int(top_k, "top_k")
    used = _rows_in_full_batches(text.shape[0], batch_size)
    if top_k > batch_size:
        raise ValueError(f"top_k={top_k} exceeds batch_size={batch_size}")
    hits = np.zeros(top_k, dtype=np.int64)
    earlier_column = np.tri(batch_size, k=-1, dtype=bool)  # [i, j] is True for j < i
    for start in range(0, used, batch_size):
        group = slice(start, start + batch_size)
        distances = cdist(text[group], motion[group])  # (batch, batch): text row x motion column
        own = np.diagonal(distances)[:, None]
        ranks = np.count_nonzero(distances < own, axis=1) + np.count_nonzero(
            (distances == own) & earlier_column, axis=1
        )
        hits += np.count_nonzero(ranks[:, None] < np.arange(1, top_k + 1)[None, :], axis=0)
    return hits / used


def matching_score(text_emb, motion_emb, batch_size: int = GUO_BATCH_SIZE) -> float:
    """Mean Euclidean distance between paired text and motion embeddings.

    Uses the same rows as `r_precision` (full groups of ``batch_size``), since Guo takes it from
    the same per-batch distance matrices (their trace).
    """
    text, motion = _as_pairs(text_emb, motion_emb)
    used = _rows_in_full_batches(text.shape[0], batch_size)
    return float(np.linalg.norm(text[:used] - motion[:used], axis=1).mean())


# --------------------------------------------------------------------------- FID


def _sqrtm_of_product(sigma_a: np.ndarray, sigma_b: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        # A singular product (rank-deficient covariances) still has a square root here (the
        # product of two PSD matrices has non-negative eigenvalues); a failed root shows up as
        # non-finite values, which the caller checks.
        warnings.simplefilter("ignore", LinAlgWarning)
        return sqrtm(sigma_a @ sigma_b)


def frechet_distance(emb_a, emb_b) -> float:
    """Fréchet distance between Gaussians fitted to two embedding sets (FID on the evaluator).

    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b))`` with ``S = np.cov(x, rowvar=False)``.
    When ``sqrtm`` of the product is not finite, ``FID_EPS * I`` is added to both covariances for
    the square root only (the traces keep the unshifted covariances), with a warning, as in the
    FID literature. A negligible imaginary part of the root is dropped; a significant one
    (diagonal |imag| > 1e-3) raises ValueError. The result is not clipped at 0, so identical
    sets can give a round-off-sized negative value.
    """
    a = _as_float64(emb_a, "emb_a", 2)
    b = _as_float64(emb_b, "emb_b", 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"emb_a and emb_b must have the same dimension, got {a.shape[1]} and {b.shape[1]}")
    for name, emb in (("emb_a", a), ("emb_b", b)):
        if emb.shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 rows to estimate a covariance, got {emb.shape[0]}")
    # atleast_2d: np.cov of a single column is 0-D
    return frechet_distance_of_gaussians(a.mean(axis=0), np.atleast_2d(np.cov(a, rowvar=False)),
                                         b.mean(axis=0), np.atleast_2d(np.cov(b, rowvar=False)))


def frechet_distance_of_gaussians(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """The Fréchet distance of two fitted Gaussians (means (D,), covariances (D, D)); what
    `frechet_distance` computes after fitting, usable on saved statistics."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    sigma_a, sigma_b = np.asarray(sigma_a, np.float64), np.asarray(sigma_b, np.float64)
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape or sigma_a.shape != mu_a.shape * 2:
        raise ValueError(f"Gaussians of different dimensions: means {mu_a.shape} and {mu_b.shape}, "
                         f"covariances {sigma_a.shape} and {sigma_b.shape}")
    covmean = _sqrtm_of_product(sigma_a, sigma_b)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"frechet_distance: sqrtm of the covariance product is not finite; "
            f"adding {FID_EPS} to the covariance diagonals",
            stacklevel=2,
        )
        offset = FID_EPS * np.eye(sigma_a.shape[0])
        covmean = _sqrtm_of_product(sigma_a + offset, sigma_b + offset)
        if not np.isfinite(covmean).all():
            raise ValueError("frechet_distance: sqrtm of the covariance product is not finite even with eps")
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=_IMAGINARY_ATOL):
            raise ValueError(f"frechet_distance: sqrtm has an imaginary component of {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real

    mean_gap = mu_a - mu_b
    return float(mean_gap @ mean_gap + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean))


# --------------------------------------------------------------------------- diversity, multimodality


def pairs_to_draw(available: int, times: int) -> int:
    """Guo requires strictly more items than pairs; smaller sets use ``available - 1`` pairs."""
    return times if available > times else available - 1


def _checked_pairs(available: int, times: int, what: str) -> int:
    """`pairs_to_draw`, refusing fewer than 2 items and warning when fewer pairs than asked."""
    times = _positive_int(times, "times")
    if available < 2:
        raise ValueError(f"{what} needs at least 2 items to pair, got {available}")
    pairs = pairs_to_draw(available, times)
    if pairs < times:
        warnings.warn(f"{what}: {available} items is not more than times={times}; using {pairs} pairs", stacklevel=3)
    return pairs


def diversity(emb, times: int = GUO_DIVERSITY_TIMES, seed: int = 0) -> float:
    """Mean distance between ``times`` random pairs of rows of ``emb`` (N, D).

    Draws ``times`` first indices, then ``times`` second indices, each without replacement from
    range(N), with ``np.random.default_rng(seed)``; pair k is (first[k], second[k]), so a pair can
    be a row with itself (distance 0), as in Guo's estimator. Guo requires N > times; when
    N <= times this warns and uses N - 1 pairs. N < 2 raises ValueError.
    """
    emb = _as_float64(emb, "emb", 2)
    num_pairs = _checked_pairs(emb.shape[0], times, "diversity")
    rng = np.random.default_rng(seed)
    first = rng.choice(emb.shape[0], num_pairs, replace=False)
    second = rng.choice(emb.shape[0], num_pairs, replace=False)
    return float(np.linalg.norm(emb[first] - emb[second], axis=1).mean())


def multimodality(emb, times: int = GUO_MULTIMODALITY_TIMES, seed: int = 0) -> float:
    """Mean distance between random pairs of generations of the same prompt, ``emb`` (N, R, D).

    R generations per prompt. Like Guo, one draw of ``times`` first and ``times`` second indices
    (each without replacement from range(R), ``np.random.default_rng(seed)``) is shared by all N
    prompts; the result is the mean over all prompts and pairs. Guo requires R > times; when
    R <= times this warns and uses R - 1 pairs. R < 2 raises ValueError.
    """
    emb = _as_float64(emb, "emb", 3)
    num_pairs = _checked_pairs(emb.shape[1], times, "multimodality")
    rng = np.random.default_rng(seed)
    first = rng.choice(emb.shape[1], num_pairs, replace=False)
    second = rng.choice(emb.shape[1], num_pairs, replace=False)
    return float(np.linalg.norm(emb[:, first] - emb[:, second], axis=2).mean())


# --------------------------------------------------------------------------- replications


def mean_ci95(values) -> tuple:
    """Mean and 95% confidence half-width over replications (axis 0), as Guo reports them.

    ``ci95 = 1.96 * std / sqrt(n)`` with the population std (ddof=0), n = number of replications.
    Scalars per replication give floats; vectors (e.g. R-precision at 1..3) give arrays.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim not in (1, 2) or array.shape[0] == 0:
        raise ValueError(f"values must be a non-empty 1-D or 2-D array of replications, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("values contains NaN or inf")
    mean = array.mean(axis=0)
    ci95 = 1.96 * array.std(axis=0) / np.sqrt(array.shape[0])
    if array.ndim == 1:
        return float(mean), float(ci95)
    return mean, ci95
