"""Per-motion transforms: z-normalisation with the manifest's Mean/Std and cropping.

Crops happen before normalisation so that only the kept frames are touched.
"""
from __future__ import annotations

import numpy as np


def normalize(motion: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(motion - mean) / std as float32; `std` is expected floored already (schema.mean_std)."""
    return ((motion.astype(np.float32, copy=False) - mean) / std).astype(np.float32, copy=False)


def window_bounds(min_len: int | None, max_len: int, frames: int) -> tuple[int, int]:
    """The inclusive range of window lengths a random crop may draw for a motion of `frames`.

    `min_len=None` means "as long as fits": the window is min(frames, max_len), so a motion is
    cut only when it is longer than max_len (captions describe the whole clip, so shortening it
    further is an augmentation the user has to ask for).
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if min_len is not None and not 1 <= min_len <= max_len:
        raise ValueError(f"min_len must lie in [1, max_len={max_len}], got {min_len}")
    high = min(frames, max_len)
    low = high if min_len is None else min(min_len, high)
    return low, high


def random_window(
    frames: int, min_len: int | None, max_len: int, rng: np.random.Generator
) -> tuple[int, int]:
    """A random (start, length): length uniform in window_bounds, start uniform where it fits."""
    low, high = window_bounds(min_len, max_len, frames)
    length = int(rng.integers(low, high + 1))
    start = int(rng.integers(0, frames - length + 1))
    return start, length


def random_crop(
    motion: np.ndarray, min_len: int | None, max_len: int, rng: np.random.Generator
) -> np.ndarray:
    start, length = random_window(motion.shape[0], min_len, max_len, rng)
    return motion[start : start + length]


def eval_crop(motion: np.ndarray, max_len: int) -> np.ndarray:
    """Evaluation sees the motion from its first frame, up to max_len frames (deterministic)."""
    return motion[:max_len]
