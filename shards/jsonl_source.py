"""Reader of a corpus of your own: one JSON record per line,

    {"id": "walk01", "motion": "motions/walk01.npy", "split": "train", "fps": 30,
     "captions": ["a person walks", {"text": "then turns", "start": 2.0, "end": 3.5}]}

`motion` is relative to the JSONL file's folder; caption start/end are seconds.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from shards.hygiene import hygiene_report
from shards.plan import (Caption, MotionTask, ShardingError, Skip, SourcePlan, caption_ref,
                         check_span, finalize_split, is_valid_key)

REQUIRED = ("id", "motion", "captions", "split", "fps")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
        if not (_number(start) and _number(end)):
            raise ValueError(f"start/end {start!r}/{end!r} are not numbers")
        check_span(float(start), float(end))
    except ValueError as err:
        return None, Skip(ref, "bad_caption_span", str(err), "caption")
    return Caption(index, item["text"].strip(), float(start), float(end)), None


def parse_record(number: int, raw: bytes) -> tuple[dict[str, Any] | None, Skip | None]:
    """A validated record, or a motion-level skip keyed `line:<n>` (or the id, if known)."""
    where = f"line:{number}"
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        return None, Skip(where, "bad_encoding", str(err), "motion")
    except json.JSONDecodeError as err:
        return None, Skip(where, "bad_record", f"not JSON: {err}", "motion")
    if not isinstance(record, dict) or any(k not in record for k in REQUIRED):
        return None, Skip(where, "bad_record", f"needs the keys {', '.join(REQUIRED)}", "motion")
    motion_id = record["id"]
    if not isinstance(motion_id, str) or not is_valid_key(motion_id):
        return None, Skip(str(motion_id)[:40] or where, "bad_id", f"{where}: id {motion_id!r}",
                          "motion")
    problems = []
    if not isinstance(record["motion"], str):
        problems.append("motion is not a path")
    if not isinstance(record["split"], str) or not is_valid_key(record["split"]):
        problems.append(f"split {record['split']!r} is not a name")
    if not _number(record["fps"]) or not record["fps"] > 0:
        problems.append(f"fps {record['fps']!r} is not a positive number")
    if not isinstance(record["captions"], list):
        problems.append("captions is not a list")
    if problems:
        return None, Skip(motion_id, "bad_record", f"{where}: {'; '.join(problems)}", "motion")
    return record, None


def infer_feature_dim(paths: list[Path]) -> int:
    """The most common F among the readable motion headers (ties: the smaller)."""
    dims: Counter[int] = Counter()
    for path in paths:
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError):
            continue
        if isinstance(array, np.ndarray) and array.ndim == 2:
            dims[array.shape[1]] += 1
    if not dims:
        raise ShardingError("no motion file could be read to learn the feature dimension; "
                            "check the paths in the JSONL or pass --feature-dim")
    return min(dims, key=lambda d: (-dims[d], d))


def read_jsonl(path: Path, *, corpus: str | None = None, fps: float | None = None,
               feature_dim: int | None = None, allow_val_equals_test: bool = False
               ) -> SourcePlan:
    path = Path(path)
    if not path.is_file():
        raise ShardingError(f"corpus file {path} does not exist: pass --file with a JSONL file, "
                            f"one record with the keys {', '.join(REQUIRED)} per line")
    skipped: list[Skip] = []
    named_motions = named_captions = 0
    seen: set[str] = set()
    ids_by_split: dict[str, list[str]] = {}
    tasks: list[MotionTask] = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        named_motions += 1
        record, problem = parse_record(number, raw)
        if problem is not None:
            skipped.append(problem)
            continue
        motion_id, split = record["id"], record["split"]
        ids_by_split.setdefault(split, []).append(motion_id)
        if motion_id in seen:
            skipped.append(Skip(motion_id, "duplicate_id", f"line:{number} repeats the id",
                                "motion"))
            continue
        seen.add(motion_id)
        named_captions += len(record["captions"])
        motion_path = path.parent / record["motion"]
        if not motion_path.is_file():
            skipped.append(Skip(motion_id, "missing_motion", f"no file {record['motion']}",
                                "motion"))
            continue
        captions = []
        for index, item in enumerate(record["captions"]):
            caption, bad = parse_caption(motion_id, index, item)
            if bad is not None:
                skipped.append(bad)
            else:
                captions.append(caption)
        tasks.append(MotionTask(motion_id, split, motion_path, record["motion"],
                                float(record["fps"]), captions, len(record["captions"])))

    if named_motions == 0:
        raise ShardingError(f"{path} holds no records: the corpus is empty; write one JSON "
                            f"record per line")
    rates = sorted({t.fps for t in tasks if t.captions})
    if fps is None and len(rates) > 1:
        raise ShardingError(f"the corpus mixes frame rates {rates}; pass --fps F to resample "
                            f"every motion to F frames per second")
    out_fps = fps if fps is not None else (rates[0] if rates else 20.0)
    val, test = set(ids_by_split.get("val", [])), set(ids_by_split.get("test", []))
    val_equals_test = bool(val) and val == test
    if val_equals_test and not allow_val_equals_test:
        raise ShardingError("the val split is identical to the test split; give them different "
                            "records, or pass --allow-val-equals-test")
    if feature_dim is None:
        feature_dim = infer_feature_dim([t.path for t in sorted(tasks, key=lambda t: t.id)])
    plan = SourcePlan(corpus=corpus or path.stem, feature_dim=feature_dim, fps=out_fps,
                      tasks={}, skipped=skipped, named_motions=named_motions,
                      named_captions=named_captions)
    by_split: dict[str, list[MotionTask]] = {}
    for task in tasks:
        by_split.setdefault(task.split, []).append(task)
    plan.tasks = {s: finalize_split(ts, plan.skipped) for s, ts in by_split.items()}
    plan.hygiene = hygiene_report(
        ids_by_split, {s: [c.text for t in ts for c in t.captions] for s, ts in plan.tasks.items()},
        val_equals_test)
    return plan
