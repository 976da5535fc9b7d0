"""Guo et al.'s generation metrics against hand-worked cases and closed forms."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from rehamot.evaluation import generation_metrics
from rehamot.evaluation.generation_metrics import (
    diversity,
    frechet_distance,
    matching_score,
    mean_ci95,
    multimodality,
    r_precision,
)

# 1-D embeddings, one group of 4: motions at 0, 1, 2, 3; each text is placed so that its own
# motion is the (i+1)-th nearest: text 0 at 0 (rank 0), text 1 at 0.4 (m0 closer, rank 1),
# text 2 at 0.2 (m0, m1 closer, rank 2), text 3 at 0.1 (m0, m1, m2 closer, rank 3).
RANKED_MOTIONS = np.array([[0.0], [1.0], [2.0], [3.0]])
RANKED_TEXTS = np.array([[0.0], [0.4], [0.2], [0.1]])


def exact_moments_sample(mean: np.ndarray, variances: np.ndarray, rotation: np.ndarray | None = None,
                         num_rows: int = 400, seed: int = 0) -> np.ndarray:
    """Rows whose np.mean / np.cov(rowvar=False) are exactly ``mean`` / R diag(variances) R^T (to round-off)."""
    dim = mean.shape[0]
    noise = np.random.default_rng(seed).normal(size=(num_rows, dim))
    noise -= noise.mean(axis=0)
    # whiten: with C = L L^T the sample covariance, noise @ L^-T has covariance I
    cholesky = np.linalg.cholesky(np.cov(noise, rowvar=False))
    white = np.linalg.solve(cholesky, noise.T).T
    shaped = white * np.sqrt(variances)
    if rotation is not None:
        shaped = shaped @ rotation.T
    return shaped + mean


def gaussian_fid(mean_a, variances_a, mean_b, variances_b) -> float:
    """Closed form for commuting covariances: |mu_a - mu_b|^2 + sum (sqrt(a) - sqrt(b))^2."""
    return float(np.sum((mean_a - mean_b) ** 2) + np.sum((np.sqrt(variances_a) - np.sqrt(variances_b)) ** 2))


def trace_sqrt_product_by_eigh(sigma_a: np.ndarray, sigma_b: np.ndarray) -> float:
    """Tr sqrt(S_a S_b) = sum of sqrt eigenvalues of the PSD matrix S_a^1/2 S_b S_a^1/2 (no sqrtm)."""
    eigenvalues, vectors = np.linalg.eigh(sigma_a)
    root_a = (vectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ vectors.T
    inner = np.linalg.eigvalsh(root_a @ sigma_b @ root_a)
    return float(np.sum(np.sqrt(np.clip(inner, 0, None))))


def drawn_pairs(size: int, num_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The documented draw: first indices, then second indices, without replacement, default_rng(seed)."""
    rng = np.random.default_rng(seed)
    return rng.choice(size, num_pairs, replace=False), rng.choice(size, num_pairs, replace=False)


# --------------------------------------------------------------------------- R-precision


def test_r_precision_hand_ranked_group():
    np.testing.assert_array_equal(r_precision(RANKED_TEXTS, RANKED_MOTIONS, batch_size=4, top_k=4),
                                  [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(r_precision(RANKED_TEXTS, RANKED_MOTIONS, batch_size=4), [0.25, 0.5, 0.75])


def test_r_precision_ties_go_to_the_earlier_column():
    # both texts at 0.5 are exactly 0.5 from both motions: text 0's own motion is the earlier
    # column (rank 0, hit), text 1's own motion comes after motion 0 (rank 1, miss at k=1)
    texts = np.array([[0.5], [0.5]])
    motions = np.array([[0.0], [1.0]])
    np.testing.assert_array_equal(r_precision(texts, motions, batch_size=2, top_k=2), [0.5, 1.0])


def test_r_precision_drops_the_last_incomplete_group():
    # two extra pairs whose texts sit on each other's motions: two misses if they were counted
    texts = np.vstack([RANKED_TEXTS, [[10.0], [11.0]]])
    motions = np.vstack([RANKED_MOTIONS, [[11.0], [10.0]]])
    np.testing.assert_array_equal(r_precision(texts, motions, batch_size=4), [0.25, 0.5, 0.75])


def test_r_precision_ranks_within_each_group_only():
    # group 1 is perfect; in group 2 every text is 0.3 from its own motion and >= 0.7 from the
    # group's others, but only 0.1 from a group-1 motion, which must not compete
    group_1 = np.array([[0.0], [1.0], [2.0], [3.0]])
    texts = np.vstack([group_1, group_1 + 0.1])
    motions = np.vstack([group_1, group_1 + 0.4])
    np.testing.assert_array_equal(r_precision(texts, motions, batch_size=4), [1.0, 1.0, 1.0])
    # 8 pairs: the ranked group (1, 2, 3 hits of 4) and a perfect group (4 of 4)
    texts = np.vstack([RANKED_TEXTS, group_1 + 10])
    motions = np.vstack([RANKED_MOTIONS, group_1 + 10])
    np.testing.assert_array_equal(r_precision(texts, motions, batch_size=4), [5 / 8, 6 / 8, 7 / 8])


def test_r_precision_identical_embeddings_are_perfect():
    emb = np.random.default_rng(0).normal(size=(70, 8))
    np.testing.assert_array_equal(r_precision(emb, emb.copy()), [1.0, 1.0, 1.0])


def test_r_precision_fewer_rows_than_a_batch_is_an_error():
    emb = np.zeros((10, 4))
    with pytest.raises(ValueError, match=r"10 text/motion pairs.*batch_size=32"):
        r_precision(emb, emb)
    with pytest.raises(ValueError, match="top_k=5 exceeds batch_size=4"):
        r_precision(RANKED_TEXTS, RANKED_MOTIONS, batch_size=4, top_k=5)


# --------------------------------------------------------------------------- matching score


def test_matching_score_pythagorean_pairs_and_dropped_rows():
    texts = np.zeros((5, 2))
    motions = np.array([[3.0, 4.0], [6.0, 8.0], [0.0, 5.0], [5.0, 12.0], [300.0, 400.0]])
    # distances 5, 10, 5, 13 in the full group of 4; the fifth pair (500) is dropped
    assert matching_score(texts, motions, batch_size=4) == pytest.approx(33 / 4, rel=1e-12)
    assert matching_score(texts, motions, batch_size=5) == pytest.approx(533 / 5, rel=1e-12)


# --------------------------------------------------------------------------- FID


def test_fid_diagonal_gaussians_closed_form():
    mean_a, var_a = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 4.0, 0.25, 2.0])
    mean_b, var_b = np.array([1.0, 1.0, 0.0, 0.5]), np.array([9.0, 1.0, 0.25, 0.5])
    a = exact_moments_sample(mean_a, var_a, seed=1)
    b = exact_moments_sample(mean_b, var_b, seed=2)
    # means: 1 + 4; sqrt-variances (1, 2, .5, 1.414) vs (3, 1, .5, .707): 4 + 1 + 0 + 0.5
    assert frechet_distance(a, b) == pytest.approx(gaussian_fid(mean_a, var_a, mean_b, var_b), abs=1e-9)
    assert gaussian_fid(mean_a, var_a, mean_b, var_b) == pytest.approx(1 + 4 + 4 + 1 + 0.5)


def test_fid_commuting_rotated_covariances_closed_form():
    rotation, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(6, 6)))
    mean_a, var_a = np.arange(6.0), np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    mean_b, var_b = np.arange(6.0)[::-1].copy(), np.array([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    a = exact_moments_sample(mean_a, var_a, rotation, seed=4)
    b = exact_moments_sample(mean_b, var_b, rotation, seed=5)
    assert frechet_distance(a, b) == pytest.approx(gaussian_fid(mean_a, var_a, mean_b, var_b), abs=1e-8)


def test_fid_general_covariances_match_eigen_formula():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5)) + 0.5
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    gap = a.mean(axis=0) - b.mean(axis=0)
    expected = gap @ gap + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_sqrt_product_by_eigh(sigma_a, sigma_b)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_fid_of_a_set_with_itself_is_zero():
    emb = np.random.default_rng(7).normal(size=(500, 16))
    assert frechet_distance(emb, emb) == pytest.approx(0.0, abs=1e-6)


def test_fid_singular_covariances_stay_finite():
    # two constant columns (exactly zero variance) in both sets, at different values
    mean_a, var_a = np.array([0.0, 0.0]), np.array([1.0, 4.0])
    mean_b, var_b = np.array([2.0, 0.0]), np.array([4.0, 1.0])
    a = np.hstack([exact_moments_sample(mean_a, var_a, seed=8, num_rows=256), np.full((256, 2), 1.0)])
    b = np.hstack([exact_moments_sample(mean_b, var_b, seed=9, num_rows=256), np.full((256, 2), 3.0)])
    expected = gaussian_fid(mean_a, var_a, mean_b, var_b) + 2 * (3.0 - 1.0) ** 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # whether scipy needs the eps fallback depends on its version
        value = frechet_distance(a, b)
    assert np.isfinite(value)
    assert value == pytest.approx(expected, abs=1e-5)
    # fewer rows than dimensions: rank-deficient covariances
    rng = np.random.default_rng(10)
    a, b = rng.normal(size=(5, 12)), rng.normal(size=(6, 12)) + 1
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    gap = a.mean(axis=0) - b.mean(axis=0)
    expected = gap @ gap + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_sqrt_product_by_eigh(sigma_a, sigma_b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert frechet_distance(a, b) == pytest.approx(expected, abs=1e-5)


def test_fid_eps_fallback_when_sqrtm_fails(monkeypatch):
    real_sqrtm = generation_metrics.sqrtm
    calls = []

    def sqrtm_failing_once(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(generation_metrics, "sqrtm", sqrtm_failing_once)
    mean_a, var_a = np.zeros(3), np.array([1.0, 2.0, 3.0])
    mean_b, var_b = np.ones(3), np.array([3.0, 2.0, 1.0])
    a = exact_moments_sample(mean_a, var_a, seed=11)
    b = exact_moments_sample(mean_b, var_b, seed=12)
    with pytest.warns(UserWarning, match="adding 1e-06"):
        value = frechet_distance(a, b)
    assert len(calls) == 2
    np.testing.assert_allclose(np.diagonal(calls[1]), (var_a + 1e-6) * (var_b + 1e-6), rtol=1e-9)
    # the traces keep the unshifted covariances; only the root sees the eps
    expected = 3 + var_a.sum() + var_b.sum() - 2 * np.sum(np.sqrt((var_a + 1e-6) * (var_b + 1e-6)))
    assert value == pytest.approx(expected, abs=1e-9)


def test_fid_significant_imaginary_root_is_an_error(monkeypatch):
    monkeypatch.setattr(generation_metrics, "sqrtm", lambda matrix: np.eye(matrix.shape[0]) * (1 + 0.1j))
    emb = np.random.default_rng(13).normal(size=(20, 3))
    with pytest.raises(ValueError, match="imaginary component"):
        frechet_distance(emb, emb)


# --------------------------------------------------------------------------- diversity, multimodality


def test_diversity_equidistant_points():
    # rows scale * e_i: distinct rows are sqrt(2) * scale apart; a pair may draw the same row twice
    size, times, seed, scale = 400, 300, 3, 2.5
    emb = scale * np.eye(size)
    first, second = drawn_pairs(size, times, seed)
    expected = np.sqrt(2) * scale * np.count_nonzero(first != second) / times
    assert diversity(emb, times=times, seed=seed) == pytest.approx(expected, rel=1e-12)
    assert diversity(np.ones((50, 4)), times=10) == 0.0


def test_diversity_is_seeded():
    emb = np.random.default_rng(14).normal(size=(400, 8))
    assert diversity(emb, seed=5) == diversity(emb, seed=5)
    assert diversity(emb, seed=5) != diversity(emb, seed=6)


def test_diversity_small_set_uses_n_minus_one_pairs():
    emb = 3.0 * np.eye(5)
    first, second = drawn_pairs(5, 4, seed=0)
    expected = np.sqrt(2) * 3.0 * np.count_nonzero(first != second) / 4
    with pytest.warns(UserWarning, match="using 4 pairs"):
        assert diversity(emb, times=10, seed=0) == pytest.approx(expected, rel=1e-12)
    with pytest.warns(UserWarning, match="using 299 pairs"):
        diversity(np.eye(300), times=300)  # Guo needs strictly more rows than pairs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diversity(np.eye(301), times=300)


def test_multimodality_equidistant_generations():
    # prompt p's R generations are scale_p * e_r: distinct generations are sqrt(2) * scale_p apart
    repeats, times, seed = 12, 10, 4
    scales = np.array([1.0, 2.0, 4.5])
    emb = scales[:, None, None] * np.eye(repeats)[None]
    first, second = drawn_pairs(repeats, times, seed)  # one draw shared by all prompts
    expected = np.sqrt(2) * scales.mean() * np.count_nonzero(first != second) / times
    assert multimodality(emb, times=times, seed=seed) == pytest.approx(expected, rel=1e-12)


def test_multimodality_small_repeat_count_uses_r_minus_one_pairs():
    emb = np.stack([np.eye(6), 2 * np.eye(6)])
    first, second = drawn_pairs(6, 5, seed=1)
    expected = np.sqrt(2) * 1.5 * np.count_nonzero(first != second) / 5
    with pytest.warns(UserWarning, match="using 5 pairs"):
        assert multimodality(emb, times=10, seed=1) == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------- replications


def test_mean_ci95_population_std():
    mean, ci95 = mean_ci95([1.0, 2.0, 3.0, 4.0])
    # population variance of 1..4 is 1.25
    assert mean == 2.5
    assert ci95 == pytest.approx(1.96 * np.sqrt(1.25) / 2, rel=1e-12)
    assert mean_ci95([7.0]) == (7.0, 0.0)
    means, cis = mean_ci95([[0.5, 1.0], [0.7, 1.0]])
    np.testing.assert_allclose(means, [0.6, 1.0])
    np.testing.assert_allclose(cis, [1.96 * 0.1 / np.sqrt(2), 0.0], atol=1e-15)


# --------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: r_precision(np.zeros((32, 4)), np.zeros((32, 5))), "same shape"),
        (lambda: r_precision(np.zeros(32), np.zeros(32)), "2-D"),
        (lambda: matching_score(np.full((32, 2), np.nan), np.zeros((32, 2))), "NaN or inf"),
        (lambda: r_precision(np.zeros((32, 2)), np.zeros((32, 2)), batch_size=0), "batch_size"),
        (lambda: frechet_distance(np.zeros((10, 3)), np.zeros((10, 4))), "same dimension"),
        (lambda: frechet_distance(np.zeros((1, 3)), np.zeros((10, 3))), "at least 2 rows"),
        (lambda: frechet_distance(np.array([[0.0, np.inf], [1.0, 1.0]]), np.zeros((3, 2))), "NaN or inf"),
        (lambda: diversity(np.zeros((1, 3))), "at least 2 items"),
        (lambda: diversity(np.zeros((10, 3, 2))), "2-D"),
        (lambda: diversity(np.zeros((10, 3)), times=0), "times"),
        (lambda: multimodality(np.zeros((10, 3))), "3-D"),
        (lambda: multimodality(np.zeros((4, 1, 3))), "at least 2 items"),
        (lambda: mean_ci95([]), "non-empty"),
        (lambda: mean_ci95([1.0, np.nan]), "NaN or inf"),
    ],
)
def test_invalid_inputs_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
