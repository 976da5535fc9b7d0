"""The worker's job: load one motion, validate it, cut sub-clips, crop, encode its samples.

Runs in a process pool; everything it takes and returns is plain data, and it reads nothing
but its own task, so the output does not depend on how many workers there are.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from rehamot.data import schema
from shards.npy_header import PickledNpy, load_checked
from shards.plan import Caption, MotionTask, Skip, caption_ref

NPY_MAGIC = b"\x93NUMPY"


@dataclass(frozen=True)
class ConvertOptions:
    corpus: str
    feature_dim: int
    fps: float  # output frame rate; motions at another rate are resampled to it
    min_frames: int
    max_frames: int  # 0: no crop
    dtype: str = "float32"  # or "float16"
    stats_splits: tuple[str, ...] = ()  # splits whose moments feed a computed Mean/Std


@dataclass
class EncodedSample:
    id: str
    captions: int
    frames: int
    motion: bytes | None  # the motion.npy member (None: left out, as in a damaged shard)
    meta: bytes  # the json member
    # (frames, per-feature mean, per-feature sum of squared deviations), float64
    moments: tuple[int, np.ndarray, np.ndarray] | None = None


@dataclass
class MotionResult:
    task_id: str
    split: str
    samples: list[EncodedSample] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    planned: list[str] = field(default_factory=list)  # every sample id the task could produce


def load_motion(task: MotionTask, feature_dim: int) -> tuple[np.ndarray | None, Skip | None]:
    """The motion (T, F) as stored, or why it cannot be used. Never unpickles."""
    def skip(reason: str, detail: str) -> tuple[None, Skip]:
        return None, Skip(task.id, reason, f"{task.file}: {detail}", "motion")

    try:
        with open(task.path, "rb") as f:
            # np.load takes anything without the .npy magic for a pickle: say what it is
            if f.read(len(NPY_MAGIC)) != NPY_MAGIC:
                return skip("unreadable_motion", "not an .npy file")
            f.seek(0)
            # the header is checked against the file size before numpy allocates anything
            array = load_checked(f, os.fstat(f.fileno()).st_size)
    except PickledNpy:
        return skip("pickled_motion", "object array; refusing to unpickle")
    except ValueError as err:  # NpyHeaderError included: a header that lies about the data
        return skip("unreadable_motion", f"{type(err).__name__}: {err}")
    except (OSError, EOFError) as err:
        return skip("unreadable_motion", f"{type(err).__name__}: {err}")
    if array.dtype.kind not in "fiu":
        return skip("unreadable_motion", f"dtype {array.dtype} is not numeric")
    if array.ndim != 2 or array.shape[1] != feature_dim:
        return skip("bad_feature_dim", f"shape {array.shape}, expected (T, {feature_dim})")
    if array.shape[0] == 0:
        return skip("too_few_frames", "no frames")
    bad = int(array.size - np.isfinite(array).sum())
    if bad:
        return skip("non_finite", f"{bad} NaN/inf values")
    return array, None


def resample(motion: np.ndarray, src_fps: float, dst_fps: float) -> np.ndarray:
    """Linear interpolation over time; keeps the duration (T / fps seconds)."""
    if src_fps == dst_fps:
        return motion
    motion = motion.astype(np.float64)
    frames = max(1, round(len(motion) * dst_fps / src_fps))
    pos = np.minimum(np.arange(frames) * (src_fps / dst_fps), len(motion) - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, len(motion) - 1)
    weight = (pos - lo)[:, None]
    return motion[lo] * (1.0 - weight) + motion[hi] * weight


def frame_at(seconds: float, fps: float) -> int:
    """Frame index of a time, rounded half up (Python's round() would round 12.5 to 12)."""
    return math.floor(seconds * fps + 0.5)


def convert_motion(task: MotionTask, options: ConvertOptions) -> MotionResult:
    result = MotionResult(task.id, task.split, planned=task.sample_ids())
    motion, problem = load_motion(task, options.feature_dim)
    if problem is not None:
        result.skipped.append(problem)
        return result
    motion = resample(motion, task.fps, options.fps)
    total = len(motion)
    if total < options.min_frames:
        result.skipped.append(Skip(task.id, "too_few_frames",
                                   f"{total} frames < --min-frames {options.min_frames}",
                                   "motion"))
        return result

    # (sample id, captions, first frame, end frame) of the parent, before the max-frames crop
    pieces: list[tuple[str, list[Caption], int, int]] = []
    whole = task.whole_clip_captions()
    if whole:
        pieces.append((task.id, whole, 0, total))
    for caption in task.subclip_captions():
        first = frame_at(caption.start, options.fps)
        end = min(frame_at(caption.end, options.fps), total)
        ref = caption_ref(task.id, caption.line)
        if first >= total or end <= first:
            result.skipped.append(Skip(ref, "bad_caption_span",
                                       f"[{caption.start}, {caption.end}] s lies outside the "
                                       f"{total / options.fps:.2f} s motion", "caption"))
        elif end - first < options.min_frames:
            result.skipped.append(Skip(ref, "too_few_frames",
                                       f"sub-clip has {end - first} frames < --min-frames "
                                       f"{options.min_frames}", "caption"))
        else:
            pieces.append((task.subclip_id(caption), [caption], first, end))

    encoded = []
    for sample_id, captions, first, end in pieces:
        if options.max_frames:
            end = min(end, first + options.max_frames)
        clip = motion[first:end].astype(options.dtype)
        if not np.isfinite(clip).all():  # float64 input can overflow the stored dtype
            result.skipped.append(Skip(task.id, "non_finite",
                                       f"values overflow {options.dtype}", "motion"))
            return result
        encoded.append(_encode(task, sample_id, captions, clip, (first, end), options))
    if not encoded:
        result.skipped.append(Skip(task.id, "no_captions",
                                   "every caption's sub-clip was skipped", "motion"))
    result.samples = encoded
    return result


def _encode(task: MotionTask, sample_id: str, captions: list[Caption], clip: np.ndarray,
            crop: tuple[int, int], options: ConvertOptions) -> EncodedSample:
    meta = {
        "id": sample_id,
        "parent_id": task.id,
        "split": task.split,
        "fps": float(options.fps),
        "frames": int(len(clip)),
        "captions": [{"caption_id": schema.caption_id(sample_id, k), "text": c.text,
                      "start": float(c.start), "end": float(c.end)}
                     for k, c in enumerate(captions)],
        "source": {"corpus": options.corpus, "file": task.file, "crop": [crop[0], crop[1]],
                   "caption_lines": [c.line for c in captions]},
    }
    moments = None
    if task.split in options.stats_splits:
        values = clip.astype(np.float64)
        mean = values.mean(axis=0)
        moments = (len(values), mean, ((values - mean) ** 2).sum(axis=0))
    return EncodedSample(sample_id, len(captions), len(clip), schema.encode_motion(clip),
                         schema.encode_meta(meta), moments)


# Process-pool plumbing: options are sent once per worker, not with every task.
_OPTIONS: ConvertOptions | None = None


def init_worker(options: ConvertOptions) -> None:
    global _OPTIONS
    _OPTIONS = options


def convert_in_worker(task: MotionTask) -> MotionResult:
    assert _OPTIONS is not None, "init_worker was not called"
    return convert_motion(task, _OPTIONS)
