"""From a `SourcePlan` to `DIR/<split>-%06d.tar` + `DIR/manifest.json`, atomically.

Workers load and encode motions; this process writes every tar in a fixed order (samples
sorted by id within a split), so the bytes do not depend on the number of workers.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import rehamot
from rehamot.data import schema
from shards.convert import ConvertOptions, MotionResult, convert_in_worker, convert_motion, init_worker
from shards.files import make_dir_like_mkdir
from shards.leak_keys import KeyCollector
from shards.plan import MotionTask, ShardingError, Skip, SourcePlan, split_order
from shards.report import progress_bar
from shards.writer import RunningMoments, SplitWriter, write_manifest

CONVERTER_VERSION = "1.0"
MB = 1 << 20


@dataclass(frozen=True)
class BuildOptions:
    workers: int = 1
    shard_mb: float = 16.0
    min_frames: int = 40
    max_frames: int = 196
    dtype: str = "float32"


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Fail before any work when DIR would be refused anyway."""
    if out.exists() and not out.is_dir():
        raise ShardingError(f"{out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ShardingError(f"{out} already exists; pass --overwrite to replace it "
                            f"(atomically) or choose another --out")


@contextlib.contextmanager
def staging_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Build into a hidden sibling, then swap it in: readers never see a half-written DIR.

    On failure the sibling is removed and an existing DIR is left exactly as it was.
    """
    out = Path(out).absolute()
    check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building-"))
    make_dir_like_mkdir(stage)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _swap_in(stage, out)


def _swap_in(stage: Path, out: Path) -> None:
    """Two renames: DIR is briefly absent, never a mix of old and new shards."""
    if not out.exists():
        os.rename(stage, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.rename(out, old / out.name)
    try:
        os.rename(stage, out)
    except BaseException:
        os.rename(old / out.name, out)  # put the old DIR back
        shutil.rmtree(stage, ignore_errors=True)
        os.rmdir(old)
        raise
    shutil.rmtree(old)


def iter_results(tasks: list[MotionTask], options: ConvertOptions, workers: int
                 ) -> Iterator[MotionResult]:
    """Results in task order; a pool when workers > 1 (spawned: no state leaks from here)."""
    if workers <= 1:
        for task in tasks:
            yield convert_motion(task, options)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=init_worker, initargs=(options,)) as pool:
        yield from pool.imap(convert_in_worker, tasks, chunksize=16)


def write_shards(plan: SourcePlan, out: Path, options: BuildOptions,
                 converter: dict[str, Any], console=None, *,
                 representation: dict[str, Any] | None = None,
                 provenance: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Writes every split of `plan` into `out` (an empty staging folder); returns the manifest.

    `representation`: what the features are when the source was converted (recorded as is);
    `provenance`: motion id -> where it came from, recorded for the motions written."""
    if plan.named_motions == 0:
        raise ShardingError("the corpus is empty: the split files name no motion; "
                            "check --root / --split-dir / --file")
    splits = split_order(plan.tasks)
    stats_splits = () if plan.mean_std is not None else (
        ("train",) if plan.tasks.get("train") else tuple(splits))
    convert_options = ConvertOptions(plan.corpus, plan.feature_dim, plan.fps, options.min_frames,
                                     options.max_frames, options.dtype, stats_splits)
    ordered = [task for split in splits for task in plan.tasks[split]]
    writers = {s: SplitWriter(out, s, int(options.shard_mb * MB)) for s in splits}
    moments = RunningMoments(plan.feature_dim)
    skipped = list(plan.skipped)
    written_ids: set[tuple[str, str]] = set()
    pending: dict[str, dict[str, Any]] = {s: {} for s in splits}  # sample id -> sample | None
    expected = {s: sorted(i for t in plan.tasks[s] for i in t.sample_ids()) for s in splits}
    cursor = {s: 0 for s in splits}
    leak_keys, parents = KeyCollector(plan.feature_dim, plan.fps), {}  # keys in writing order

    def flush(split: str) -> None:
        """Write this split's samples that are next in id order and have arrived."""
        ids, waiting, writer = expected[split], pending[split], writers[split]
        while cursor[split] < len(ids) and ids[cursor[split]] in waiting:
            sample = waiting.pop(ids[cursor[split]])
            cursor[split] += 1
            if sample is not None:
                writer.write(sample)
                leak_keys.add(split, sample, parents.get(sample.id))
                if sample.moments is not None:
                    moments.add(*sample.moments)

    with progress_bar(console, len(ordered)) as advance:
        for result in iter_results(ordered, convert_options, options.workers):
            skipped.extend(result.skipped)
            produced = {s.id: s for s in result.samples}
            for sample_id in result.planned:
                pending[result.split][sample_id] = produced.get(sample_id)
                parents[sample_id] = result.task_id
            if produced:
                written_ids.add((result.split, result.task_id))
            flush(result.split)
            advance()

    split_entries = {}
    for split in splits:
        writer = writers[split]
        writer.close()
        split_entries[split] = writer.split_entry()
    if not any(e["motions"] for e in split_entries.values()):
        raise ShardingError(
            f"nothing was written: all {plan.named_motions} named motions were skipped "
            f"({_reason_counts(skipped)}); fix the input or the options (--feature-dim, "
            f"--min-frames)")

    mean, std, mean_std_source = _mean_std(plan, moments, stats_splits)
    skipped.sort(key=lambda s: (s.id, s.level, s.reason, s.detail))
    accounting = _accounting(plan, split_entries, skipped, len(written_ids))
    manifest = {
        "corpus": plan.corpus,
        "feature_dim": plan.feature_dim,
        "fps": float(plan.fps),
        "dtype": options.dtype,
        "converter": converter,
        "splits": split_entries,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "mean_std_source": mean_std_source,
        "accounting": accounting,
        "skipped": [s.as_json() for s in skipped],
        "hygiene": plan.hygiene,
        "leak_keys": leak_keys.write(out),
        **({"representation": representation} if representation is not None else {}),
        **({"provenance": _provenance(provenance, written_ids)} if provenance is not None else {}),
        "created_by": f"rehamot {rehamot.__version__} shards/make_shards.py "
                      f"(converter {CONVERTER_VERSION})",
    }
    return write_manifest(Path(out), manifest)


def _mean_std(plan: SourcePlan, moments: RunningMoments, stats_splits: tuple[str, ...]
              ) -> tuple[np.ndarray, np.ndarray, str]:
    """The corpus's own Mean/Std when it has them, else the moments of `stats_splits`."""
    if plan.mean_std is not None:
        mean, std = plan.mean_std
        return mean, np.maximum(std, schema.STD_FLOOR), "corpus"
    mean, std = moments.mean_std()
    return mean, std, "computed:" + "+".join(stats_splits)


def _accounting(plan: SourcePlan, split_entries: dict[str, Any], skipped: list[Skip],
                written_motions: int) -> dict[str, Any]:
    """written + skipped = named, for the ids the source names and for their captions."""
    motion_skips = sum(1 for s in skipped if s.level == "motion")
    if plan.named_motions != written_motions + motion_skips:
        raise RuntimeError(f"bug: {plan.named_motions} motions named, {written_motions} "
                           f"written, {motion_skips} skipped")
    written_captions = sum(e["captions"] for e in split_entries.values())
    return {
        "motions": {"named": plan.named_motions, "written": written_motions,
                    "skipped": motion_skips},
        "captions": {"named": plan.named_captions, "written": written_captions,
                     "skipped": plan.named_captions - written_captions,
                     "skipped_individually": sum(1 for s in skipped if s.level == "caption")},
        "samples": sum(e["motions"] for e in split_entries.values()),
    }


def _provenance(provenance: dict[str, dict[str, Any]], written: set[tuple[str, str]]
                ) -> dict[str, dict[str, Any]]:
    """By motion id, sorted: only motions in the shards, so a later check sees what was kept."""
    ids = {motion_id for _, motion_id in written}
    return {motion_id: provenance[motion_id] for motion_id in sorted(ids & set(provenance))}


def _reason_counts(skipped: list[Skip]) -> str:
    counts: dict[str, int] = {}
    for s in skipped:
        if s.level == "motion":
            counts[s.reason] = counts.get(s.reason, 0) + 1
    return ", ".join(f"{n} {r}" for r, n in sorted(counts.items())) or "none recorded"
