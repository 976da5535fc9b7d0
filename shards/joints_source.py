"""Joint positions of any known skeleton, sharded in HumanML3D's representation.

    {"id": "walk01", "joints": "joints/walk01.npy", "skeleton": "smplh", "fps": 120,
     "up": "z", "unit": "m", "split": "train",
     "captions": ["a person walks", {"text": "then turns", "start": 2.0, "end": 3.5}],
     "source": {"file": "CMU/01/01_01_poses.npz", "start": 0.0, "end": 12.5}}

One JSON record per line, read by the manifest source's rules (`jsonl_source`): `joints` is
relative to the JSONL file's folder and must resolve inside the root, ids and splits are keys,
captions may be sub-clips. `up` ("y" or "z") and `unit` ("m", "cm", "mm") default to "y" and
"m"; `source` (optional: where the motion came from) is kept as provenance in the manifest.

Each (T, J, 3) .npy is loaded without unpickling, turned into HumanML3D's joints
(`to_humanml3d_joints`: 22 joints, Y up, metres, 20 fps) and into its (T-1, 263) features
(`joints_to_features`); the features then take the usual path (min frames, sub-clips, crop,
Mean/Std over train). A motion that cannot be converted is skipped with BadMotion's reason.
KIT-ML's `new_joints` take the same path (`make_shards.py kitml --representation humanml3d`).
"""
from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from rehamot.motion.features import joints_to_features
from rehamot.motion.skeletons import HUMANML3D_FPS, BadMotion, to_humanml3d_joints
from shards.jsonl_source import finite_number, list_records, plan_listing, val_equals_test
from shards.npy_header import PickledNpy, load_checked
from shards.plan import MotionTask, Skip, SourcePlan, check_span
from shards.report import progress_bar

REQUIRED = ("id", "joints", "skeleton", "captions", "split", "fps")
FEATURE_DIM = 263
NPY_MAGIC = b"\x93NUMPY"


@dataclass(frozen=True)
class JointsSpec:
    """How to read one joints file: its skeleton, up axis and unit (checked on conversion)."""

    skeleton: Any
    up: Any = "y"
    unit: Any = "m"


KIT_ML = JointsSpec("kit21", "y", "mm")  # KIT-ML's new_joints: 21 MMM joints in millimetres


@dataclass(frozen=True)
class JointsJob:
    task: MotionTask  # path: the joints .npy inside the root; fps: its frame rate
    spec: JointsSpec
    out: Path  # where its features are written


def parse_provenance(value: Any) -> dict[str, Any] | None:
    """`{"file", "start", "end"}` (start/end seconds, optional), or None if malformed."""
    if not isinstance(value, dict) or not isinstance(value.get("file"), str) or not value["file"]:
        return None
    start, end = value.get("start", 0.0), value.get("end", 0.0)
    if not (finite_number(start) and finite_number(end)):
        return None
    try:
        check_span(float(start), float(end))
    except ValueError:
        return None
    return {"file": value["file"], "start": float(start), "end": float(end)}


def read_joints_jsonl(path: Path, *, root: Path | None = None, corpus: str | None = None,
                      allow_val_equals_test: bool = False
                      ) -> tuple[SourcePlan, dict[str, JointsSpec], dict[str, dict[str, Any]]]:
    """The plan (tasks still name their joints files), each motion's JointsSpec and the
    provenance of the motions whose record names a `source`."""
    listing = list_records(path, root, REQUIRED, path_key="joints")
    specs, provenance, kept = {}, {}, []
    for task, record in listing.tasks:
        source = parse_provenance(record["source"]) if "source" in record else None
        if "source" in record and source is None:
            listing.skipped.append(Skip(task.id, "bad_record", f"source {record['source']!r:.60} "
                                        f"is not {{file, start, end}}", "motion"))
            continue
        if source is not None:
            provenance[task.id] = source
        specs[task.id] = JointsSpec(record["skeleton"], record.get("up", "y"),
                                    record.get("unit", "m"))
        kept.append((task, record))
    listing.tasks = kept
    same_val_test = val_equals_test(listing.ids_by_split, allow_val_equals_test)
    plan = plan_listing(listing, corpus=corpus or Path(path).stem, feature_dim=FEATURE_DIM,
                        fps=HUMANML3D_FPS, same_val_test=same_val_test)
    return plan, specs, provenance


class _Unreadable(Exception):
    """A joints file that is not a plain numeric .npy: (skip reason, detail)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def load_joints(path: Path, file: str) -> np.ndarray:
    """The array of a joints .npy, header checked first and never unpickled, as the other
    sources load their motions; `file` is how the corpus names it."""
    try:
        with open(path, "rb") as f:
            if f.read(len(NPY_MAGIC)) != NPY_MAGIC:  # np.load would take it for a pickle
                raise _Unreadable("unreadable_motion", f"{file}: not an .npy file")
            f.seek(0)
            array = load_checked(f, os.fstat(f.fileno()).st_size)
    except PickledNpy:
        raise _Unreadable("pickled_motion", f"{file}: object array; refusing to unpickle") from None
    except (ValueError, OSError, EOFError) as err:
        raise _Unreadable("unreadable_motion", f"{file}: {type(err).__name__}: {err}") from None
    if array.dtype.kind not in "fiu":
        raise _Unreadable("unreadable_motion", f"{file}: dtype {array.dtype} is not numeric")
    return array


def convert_job(job: JointsJob) -> tuple[str, str] | None:
    """Write the job's features; (reason, detail) when the motion cannot be converted."""
    task, spec = job.task, job.spec
    try:
        joints = load_joints(task.path, task.file)
        positions = to_humanml3d_joints(joints, spec.skeleton, task.fps, up=spec.up,
                                        unit=spec.unit)
        features = joints_to_features(positions)
    except _Unreadable as err:
        return err.reason, err.detail
    except BadMotion as err:
        return err.reason, f"{task.file}: {err.detail}"
    with open(job.out, "wb") as f:
        np.save(f, features.astype(np.float32), allow_pickle=False)
    return None


def _results(jobs: list[JointsJob], workers: int):
    """Results in job order (a spawned pool when workers > 1: no state leaks from here)."""
    if workers <= 1:
        yield from map(convert_job, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(convert_job, jobs, chunksize=8)


def features_from_joints(plan: SourcePlan, specs: dict[str, JointsSpec], scratch: Path,
                         workers: int = 1, console=None) -> list[str]:
    """Turn every task's joints into HumanML3D features at 20 fps in `scratch` (a new folder)
    and point the task there (its manifest name stays the joints file); a motion that cannot
    be converted leaves the plan, skipped with its reason. Returns the skeletons converted."""
    scratch.mkdir(parents=True)
    jobs = [JointsJob(task, specs[task.id], scratch / f"{number:08d}.npy")
            for number, task in enumerate(t for ts in plan.tasks.values() for t in ts)]
    kept: dict[str, list[MotionTask]] = {split: [] for split in plan.tasks}
    skeletons = set()
    with progress_bar(console, len(jobs)) as advance:
        for job, problem in zip(jobs, _results(jobs, workers)):
            advance()
            task = job.task
            if problem is not None:
                plan.skipped.append(Skip(task.id, problem[0], problem[1], "motion"))
                continue
            kept[task.split].append(replace(task, path=job.out, fps=HUMANML3D_FPS))
            skeletons.add(str(job.spec.skeleton))
    plan.tasks = kept
    plan.feature_dim, plan.fps = FEATURE_DIM, HUMANML3D_FPS
    return sorted(skeletons)


def representation(skeletons: list[str]) -> dict[str, Any]:
    """The manifest's record of what the features are and what they were computed from."""
    return {"layout": "humanml3d", "feature_dim": FEATURE_DIM, "fps": HUMANML3D_FPS,
            "computed_from": "joints", "skeletons": skeletons}
