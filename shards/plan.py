"""What a source reader hands the converter: the named motions, their captions, early skips.

Readers (`layout.py`, `jsonl_source.py`) only list and parse; they never load motions. The
converter (`convert.py`) loads, validates and encodes one `MotionTask` at a time in a worker.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rehamot.data import schema
from rehamot.data.schema import SPLITS

# WebDataset splits member names at the first dot, and keys become file names inside tars.
# Matched with fullmatch: `$` would also match before a trailing newline.
KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]+")

# One list of reason codes, the shard contract's: manifest["skipped"] and the readers' counts.
SKIP_REASONS = schema.SKIP_REASONS
# "file": a corpus file that is neither a motion nor a caption (a split list, Mean/Std).
SKIP_LEVELS = ("motion", "caption", "file")

# Frame rates outside this range are input errors: resampling to or from them would make a
# motion thousands of times longer or collapse it to a single frame.
MIN_FPS, MAX_FPS = 1.0, 1000.0


class ShardingError(Exception):
    """A problem the user must fix before anything can be written (exit non-zero)."""


def is_valid_key(text: str) -> bool:
    return bool(KEY_PATTERN.fullmatch(text)) and len(text) <= 80


def is_valid_fps(value: object) -> bool:
    """A real number (not bool) in [MIN_FPS, MAX_FPS]; ints too large for a float are refused
    without converting them."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return MIN_FPS <= value <= MAX_FPS  # False for NaN


def inside_root(path: Path, root: Path) -> Path | None:
    """`path` with every symlink and '..' resolved, if that lies inside `root` (resolved too);
    None if it lies outside or cannot be resolved (a symlink loop, a NUL byte).

    Shards are handed to others: a link from the corpus to any other file would copy that
    file into them.
    """
    try:
        resolved = Path(path).resolve()
        return resolved if resolved.is_relative_to(Path(root).resolve()) else None
    except (OSError, RuntimeError, ValueError):
        return None


def caption_ref(motion_id: str, line: int) -> str:
    """Id of a caption in skip entries: source motion id and the caption's index in its source."""
    return f"{motion_id}:{line}"


def split_order(names: set[str] | list[str]) -> list[str]:
    """The standard splits first (train, val, test), then any others alphabetically."""
    names = set(names)
    return [s for s in SPLITS if s in names] + sorted(names - set(SPLITS))


@dataclass(frozen=True)
class Skip:
    id: str
    reason: str
    detail: str
    level: str  # one of SKIP_LEVELS

    def __post_init__(self) -> None:
        if self.reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {self.reason!r}")
        if self.level not in SKIP_LEVELS:
            raise ValueError(f"unknown skip level {self.level!r}")

    def as_json(self) -> dict[str, str]:
        return {"id": self.id, "reason": self.reason, "detail": self.detail, "level": self.level}


@dataclass(frozen=True)
class Caption:
    line: int  # index in the source's caption list: file line, or position in a JSONL record
    text: str
    start: float  # seconds in the parent motion; start == end == 0 means the whole clip
    end: float

    @property
    def is_subclip(self) -> bool:
        return not (self.start == 0.0 and self.end == 0.0)


@dataclass
class MotionTask:
    """One named source motion with its usable captions; becomes one or more samples."""

    id: str
    split: str
    path: Path  # the .npy to load
    file: str  # how the manifest names it (relative to the source root)
    fps: float  # the file's frame rate
    captions: list[Caption]
    named_captions: int  # every caption the source names for it, usable or not

    def whole_clip_captions(self) -> list[Caption]:
        return [c for c in self.captions if not c.is_subclip]

    def subclip_captions(self) -> list[Caption]:
        return [c for c in self.captions if c.is_subclip]

    def subclip_id(self, caption: Caption) -> str:
        return f"{self.id}_{caption.line}"

    def sample_ids(self) -> list[str]:
        """Keys of the samples this motion may produce (some may still be skipped)."""
        ids = [self.id] if self.whole_clip_captions() else []
        return ids + [self.subclip_id(c) for c in self.subclip_captions()]


@dataclass
class SourcePlan:
    corpus: str
    feature_dim: int
    fps: float  # output frame rate (motions at another rate are resampled)
    tasks: dict[str, list[MotionTask]]  # split -> tasks, ordered by first sample id
    skipped: list[Skip] = field(default_factory=list)
    named_motions: int = 0  # every id occurrence the split files / records name
    named_captions: int = 0
    mean_std: tuple[np.ndarray, np.ndarray] | None = None  # the corpus's own, if it has them
    hygiene: dict[str, Any] = field(default_factory=dict)

    def skipped_captions_at_listing(self) -> int:
        return sum(1 for s in self.skipped if s.level == "caption")


def order_tasks(tasks: list[MotionTask]) -> list[MotionTask]:
    """Order by each task's smallest sample id, so that samples can be written sorted by id."""
    return sorted(tasks, key=lambda t: min(t.sample_ids()))


def drop_colliding_subclips(tasks: list[MotionTask], skipped: list[Skip]) -> None:
    """A sub-clip key `<parent>_<k>` must not equal another sample key of the same split."""
    taken = {t.id for t in tasks if t.whole_clip_captions()}
    for task in sorted(tasks, key=lambda t: t.id):
        kept = []
        for caption in task.captions:
            key = task.subclip_id(caption) if caption.is_subclip else None
            if key is not None and key in taken:
                skipped.append(Skip(caption_ref(task.id, caption.line), "duplicate_id",
                                    f"sub-clip key {key} is already taken in split {task.split}",
                                    "caption"))
                continue
            if key is not None:
                taken.add(key)
            kept.append(caption)
        task.captions = kept


def parse_span(start_text: str, end_text: str) -> tuple[float, float]:
    """Seconds from caption-file fields; NaN means 0 (HumanML3D's loader does the same)."""
    start, end = float(start_text), float(end_text)
    start = 0.0 if np.isnan(start) else start
    end = 0.0 if np.isnan(end) else end
    check_span(start, end)
    return start, end


def check_span(start: float, end: float) -> None:
    if start == 0.0 and end == 0.0:
        return
    if not (np.isfinite(start) and np.isfinite(end)) or start < 0 or end <= start:
        raise ValueError(f"span [{start}, {end}] s is empty or negative")


def finalize_split(tasks: list[MotionTask], skipped: list[Skip]) -> list[MotionTask]:
    """Resolve key collisions, skip motions left without captions, order for writing."""
    drop_colliding_subclips(tasks, skipped)
    kept = []
    for task in tasks:
        if task.captions:
            kept.append(task)
        else:
            skipped.append(Skip(task.id, "no_captions",
                                f"none of its {task.named_captions} captions is usable", "motion"))
    return order_tasks(kept)
