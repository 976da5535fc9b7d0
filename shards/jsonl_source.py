"""Reader of a corpus of your own: one JSON record per line,

    {"id": "walk01", "motion": "motions/walk01.npy", "split": "train", "fps": 30,
     "captions": ["a person walks", {"text": "then turns", "start": 2.0, "end": 3.5}]}

`motion` is relative to the JSONL file's folder; caption start/end are seconds.

Nothing outside the corpus root (the JSONL file's folder, or `root`) is read: a `motion` that
resolves outside it (an absolute path, '..', a symlink out) is skipped as `outside_root`.
`id` and `split` must match the key pattern exactly; an `fps` that is not a number in
[MIN_FPS, MAX_FPS] (Infinity and NaN included) is skipped as `bad_fps`; a line the JSON parser
cannot hold (huge numbers, deep nesting) is a `bad_record`.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shards.hygiene import hygiene_report
from shards.npy_header import NpyHeaderError, check_npy_header
from shards.plan import (
    MAX_FPS,
    MIN_FPS,
    Caption,
    MotionTask,
    ShardingError,
    Skip,
    SourcePlan,
    caption_ref,
    check_span,
    finalize_split,
    inside_root,
    is_valid_fps,
    is_valid_key,
)

REQUIRED = ("id", "motion", "captions", "split", "fps")


class JsonConstant:
    """What `Infinity`, `-Infinity` and `NaN` (not JSON, but Python's parser takes them) parse
    to: not a number, so every numeric field refuses them by name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def finite_number(value: Any) -> bool:
    """A finite real number (not bool); ints beyond float's range are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def parse_caption(motion_id: str, index: int, item: Any) -> tuple[Caption | None, Skip | None]:
    ref = caption_ref(motion_id, index)
    if isinstance(item, str):
        item = {"text": item}
    if not isinstance(item, dict) or not isinstance(item.get("text"), str):
        return None, Skip(ref, "bad_record", f"caption {item!r:.60} is neither a string nor "
                                             f"{{text, start, end}}", "caption")
    try:
        item["text"].encode("utf-8")
    except UnicodeEncodeError as err:  # JSON "\ud800" escapes decode to lone surrogates
        return None, Skip(ref, "bad_encoding", str(err), "caption")
    if not item["text"].strip():
        return None, Skip(ref, "empty_caption", "caption text is empty", "caption")
    start, end = item.get("start", 0.0), item.get("end", 0.0)
    try:
        if not (finite_number(start) and finite_number(end)):
            raise ValueError(f"start/end {start!r:.40}/{end!r:.40} are not finite numbers")
        check_span(float(start), float(end))
    except ValueError as err:
        return None, Skip(ref, "bad_caption_span", str(err), "caption")
    return Caption(index, item["text"].strip(), float(start), float(end)), None


def parse_record(number: int, raw: bytes, required: tuple[str, ...] = REQUIRED,
                 path_key: str = "motion") -> tuple[dict[str, Any] | None, Skip | None]:
    """A validated record, or a motion-level skip keyed `line:<n>` (or the id, if known).
    `path_key`: the field naming the record's .npy (the joints source names it `joints`)."""
    where = f"line:{number}"
    try:
        record = json.loads(raw.decode("utf-8"), parse_constant=JsonConstant)
    except UnicodeDecodeError as err:
        return None, Skip(where, "bad_encoding", str(err), "motion")
    except json.JSONDecodeError as err:
        return None, Skip(where, "bad_record", f"not JSON: {err}", "motion")
    except (ValueError, RecursionError) as err:  # over 4300 digits; nesting deeper than the stack
        return None, Skip(where, "bad_record", f"JSON this parser cannot hold: "
                                               f"{type(err).__name__}: {str(err):.80}", "motion")
    if not isinstance(record, dict) or any(k not in record for k in required):
        return None, Skip(where, "bad_record", f"needs the keys {', '.join(required)}", "motion")
    motion_id = record["id"]
    if not isinstance(motion_id, str) or not is_valid_key(motion_id):
        return None, Skip(str(motion_id)[:40] or where, "bad_id", f"{where}: id {motion_id!r:.60}",
                          "motion")
    problems = []
    file = record[path_key]
    if not isinstance(file, str) or not file or "\0" in file:
        problems.append(f"{path_key} is not a path")
    if not isinstance(record["split"], str) or not is_valid_key(record["split"]):
        problems.append(f"split {record['split']!r:.40} is not a name")
    if not isinstance(record["captions"], list):
        problems.append("captions is not a list")
    if problems:
        return None, Skip(motion_id, "bad_record", f"{where}: {'; '.join(problems)}", "motion")
    if not is_valid_fps(record["fps"]):
        return None, Skip(motion_id, "bad_fps", f"{where}: fps {record['fps']!r:.40} is not a "
                                                f"number in [{MIN_FPS:g}, {MAX_FPS:g}]", "motion")
    return record, None


def infer_feature_dim(paths: list[Path]) -> int:
    """The most common F among the motion headers that agree with their file's size
    (ties: the smaller)."""
    dims: Counter[int] = Counter()
    for path in paths:
        try:
            with open(path, "rb") as f:
                shape, _ = check_npy_header(f, os.fstat(f.fileno()).st_size)
        except (NpyHeaderError, OSError):
            continue
        if len(shape) == 2:
            dims[shape[1]] += 1
    if not dims:
        raise ShardingError("no motion file could be read to learn the feature dimension; "
                            "check the paths in the JSONL or pass --feature-dim")
    return min(dims, key=lambda d: (-dims[d], d))


@dataclass
class Listing:
    """What the lines of a JSONL corpus name, before any motion is loaded."""

    skipped: list[Skip] = field(default_factory=list)
    named_motions: int = 0
    named_captions: int = 0
    ids_by_split: dict[str, list[str]] = field(default_factory=dict)
    # each usable record's task (path resolved inside the root) and the record itself
    tasks: list[tuple[MotionTask, dict[str, Any]]] = field(default_factory=list)


def list_records(path: Path, root: Path | None, required: tuple[str, ...] = REQUIRED,
                 path_key: str = "motion") -> Listing:
    """Parse every line of `path` into tasks or skips; `root`: the folder no motion may
    resolve outside of (default: the file's folder). Reads no motion."""
    path = Path(path)
    if not path.is_file():
        raise ShardingError(f"corpus file {path} does not exist: pass --file with a JSONL file, "
                            f"one record with the keys {', '.join(required)} per line")
    root = Path(root) if root is not None else path.parent
    if not root.is_dir():
        raise ShardingError(f"corpus root {root} is not a folder: pass --root with the folder "
                            f"that holds every motion file")
    listing = Listing()
    seen: set[str] = set()
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        listing.named_motions += 1
        record, problem = parse_record(number, raw, required, path_key)
        if problem is not None:
            listing.skipped.append(problem)
            continue
        motion_id, split = record["id"], record["split"]
        listing.ids_by_split.setdefault(split, []).append(motion_id)
        if motion_id in seen:
            listing.skipped.append(Skip(motion_id, "duplicate_id", f"line:{number} repeats the id",
                                        "motion"))
            continue
        seen.add(motion_id)
        listing.named_captions += len(record["captions"])
        task = _record_task(path, root, record, path_key, listing.skipped)
        if task is not None:
            listing.tasks.append((task, record))
    if listing.named_motions == 0:
        raise ShardingError(f"{path} holds no records: the corpus is empty; write one JSON "
                            f"record per line")
    return listing


def _record_task(path: Path, root: Path, record: dict[str, Any], path_key: str,
                 skipped: list[Skip]) -> MotionTask | None:
    """The record's task with its usable captions, or None with the motion-level skip."""
    motion_id, file = record["id"], record[path_key]
    # checked before the file is even looked at: whether a file outside the root exists
    # is not the manifest's business either
    motion_path = inside_root(path.parent / file, root)
    if motion_path is None:
        shown = "an absolute path" if Path(file).is_absolute() else file
        skipped.append(Skip(motion_id, "outside_root",
                            f"{path_key} {shown} resolves outside the corpus root (an absolute "
                            f"path, '..' or a symlink); not read: move it inside the root "
                            f"or pass --root", "motion"))
        return None
    if not motion_path.is_file():
        skipped.append(Skip(motion_id, "missing_motion", f"no file {file}", "motion"))
        return None
    captions = []
    for index, item in enumerate(record["captions"]):
        caption, bad = parse_caption(motion_id, index, item)
        if bad is not None:
            skipped.append(bad)
        else:
            captions.append(caption)
    return MotionTask(motion_id, split=record["split"], path=motion_path, file=file,
                      fps=float(record["fps"]), captions=captions,
                      named_captions=len(record["captions"]))


def val_equals_test(ids_by_split: dict[str, list[str]], allow: bool) -> bool:
    """Whether val names exactly test's ids; refused unless `allow`."""
    val, test = set(ids_by_split.get("val", [])), set(ids_by_split.get("test", []))
    same = bool(val) and val == test
    if same and not allow:
        raise ShardingError("the val split is identical to the test split; give them different "
                            "records, or pass --allow-val-equals-test")
    return same


def plan_listing(listing: Listing, *, corpus: str, feature_dim: int, fps: float,
                 same_val_test: bool) -> SourcePlan:
    """The plan of a listing: splits finalised (key collisions, motions left without
    captions), the hygiene report."""
    plan = SourcePlan(corpus=corpus, feature_dim=feature_dim, fps=fps, tasks={},
                      skipped=listing.skipped, named_motions=listing.named_motions,
                      named_captions=listing.named_captions)
    by_split: dict[str, list[MotionTask]] = {}
    for task, _ in listing.tasks:
        by_split.setdefault(task.split, []).append(task)
    plan.tasks = {s: finalize_split(ts, plan.skipped) for s, ts in by_split.items()}
    plan.hygiene = hygiene_report(
        listing.ids_by_split,
        {s: [c.text for t in ts for c in t.captions] for s, ts in plan.tasks.items()},
        same_val_test)
    return plan


def read_jsonl(path: Path, *, root: Path | None = None, corpus: str | None = None,
               fps: float | None = None, feature_dim: int | None = None,
               allow_val_equals_test: bool = False) -> SourcePlan:
    """`root`: the folder no motion may resolve outside of (default: the file's folder)."""
    listing = list_records(path, root)
    tasks = [task for task, _ in listing.tasks]
    rates = sorted({t.fps for t in tasks if t.captions})
    if fps is None and len(rates) > 1:
        raise ShardingError(f"the corpus mixes frame rates {rates}; pass --fps F to resample "
                            f"every motion to F frames per second")
    out_fps = fps if fps is not None else (rates[0] if rates else 20.0)
    same_val_test = val_equals_test(listing.ids_by_split, allow_val_equals_test)
    if feature_dim is None:
        feature_dim = infer_feature_dim([t.path for t in sorted(tasks, key=lambda t: t.id)])
    return plan_listing(listing, corpus=corpus or Path(path).stem, feature_dim=feature_dim,
                        fps=out_fps, same_val_test=same_val_test)
