"""Per-motion transforms: normalisation with the manifest's Mean/Std, crop windows."""
from __future__ import annotations

import numpy as np
import pytest

from rehamot.data import schema
from rehamot.data.motion import eval_crop, normalize, random_crop, random_window, window_bounds


def test_normalize_uses_mean_and_floored_std():
    manifest = {"mean": [1.0, -2.0, 0.5], "std": [2.0, 0.5, 1e-7]}
    mean, std = schema.mean_std(manifest)
    motion = np.array([[3.0, -1.0, 0.5], [1.0, -2.0, 0.502]], dtype=np.float64)
    out = normalize(motion, mean, std)
    assert out.dtype == np.float32
    expected = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 2.0]])  # last channel: std floored to 1e-3
    np.testing.assert_allclose(out, expected, atol=1e-4)


@pytest.mark.parametrize(
    ("min_len", "max_len", "frames", "bounds"),
    [(None, 196, 120, (120, 120)), (None, 196, 300, (196, 196)), (40, 196, 30, (30, 30)),
     (40, 196, 100, (40, 100)), (40, 196, 300, (40, 196)), (196, 196, 150, (150, 150))],
)
def test_window_bounds(min_len, max_len, frames, bounds):
    assert window_bounds(min_len, max_len, frames) == bounds


def test_window_bounds_rejects_bad_lengths():
    with pytest.raises(ValueError, match="min_len"):
        window_bounds(50, 40, 100)
    with pytest.raises(ValueError, match="max_len"):
        window_bounds(None, 0, 100)


def test_random_window_stays_inside_and_covers_its_range():
    rng = np.random.default_rng(0)
    frames, low, high = 60, 10, 25
    draws = [random_window(frames, low, high, rng) for _ in range(3000)]
    starts = np.array([s for s, _ in draws])
    lengths = np.array([n for _, n in draws])
    assert lengths.min() == low and lengths.max() == high
    assert starts.min() == 0 and (starts + lengths).max() == frames
    assert ((starts + lengths) <= frames).all()


def test_random_crop_is_a_contiguous_window_and_eval_crop_the_first_frames():
    motion = np.arange(50 * 2, dtype=np.float32).reshape(50, 2)
    window = random_crop(motion, 5, 20, np.random.default_rng(3))
    start = int(window[0, 0]) // 2
    np.testing.assert_array_equal(window, motion[start : start + len(window)])
    assert 5 <= len(window) <= 20
    np.testing.assert_array_equal(eval_crop(motion, 20), motion[:20])
    assert eval_crop(motion, 80).shape == (50, 2)
