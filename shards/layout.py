"""Reader of the HumanML3D folder layout (also KIT-ML's, which has the same shape).

    ROOT/new_joint_vecs/<id>.npy   (T, F) motion features
    ROOT/new_joints/<id>.npy       (T, J, 3) joint positions (read instead with motion_dir)
    ROOT/texts/<id>.txt            one caption per line: caption#tokens#start#end (seconds)
    ROOT/Mean.npy, ROOT/Std.npy    (F,) corpus statistics (optional)
    SPLIT_DIR/{train,val,test}.txt one entry per line: `id` (all captions of the motion) or
                                   `id:i,j,k` (only those caption lines, 0-based)

Nothing outside ROOT is read (SPLIT_DIR: outside SPLIT_DIR): every path is resolved, symlinks
and all, and one that lands outside is skipped as `outside_root` (motion-level for a motion
or caption file, file-level for a split list or Mean/Std).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rehamot.data.schema import SPLITS
from shards.hygiene import hygiene_report
from shards.npy_header import NpyHeaderError, load_checked
from shards.plan import (
    Caption,
    MotionTask,
    ShardingError,
    Skip,
    SourcePlan,
    caption_ref,
    finalize_split,
    inside_root,
    is_valid_key,
    parse_span,
)

MOTION_DIR = "new_joint_vecs"
JOINTS_DIR = "new_joints"  # (T, J, 3) joint positions, for `kitml --representation humanml3d`
TEXT_DIR = "texts"


@dataclass(frozen=True)
class SplitEntry:
    id: str
    indices: tuple[str, ...] | None  # raw caption-index tokens; None: every caption line


@dataclass(frozen=True)
class CaptionLine:
    line: int
    caption: Caption | None  # None when the line is unusable
    skip: Skip | None


def parse_split_file(path: Path) -> list[SplitEntry]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ShardingError(f"{path} is not UTF-8 text ({err}); re-save it as UTF-8") from err
    entries = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        motion_id, sep, rest = line.partition(":")
        indices = tuple(tok.strip() for tok in rest.split(",") if tok.strip()) if sep else None
        entries.append(SplitEntry(motion_id.strip(), indices))
    return entries


def read_split_files(split_dir: Path, skipped: list[Skip]) -> dict[str, list[SplitEntry]]:
    """The split lists in `split_dir`; one that resolves outside it is not read (recorded in
    `skipped`)."""
    if not split_dir.is_dir():
        raise ShardingError(f"split folder {split_dir} does not exist")
    found, outside = {}, []
    for split in SPLITS:
        path = split_dir / f"{split}.txt"
        if not path.is_file():
            continue
        resolved = inside_root(path, split_dir)
        if resolved is None:
            outside.append(Skip(path.name, "outside_root",
                                f"{path.name} resolves outside its folder; not read", "file"))
            continue
        found[split] = parse_split_file(resolved)
    skipped.extend(outside)
    if not found:
        also = (f" ({', '.join(s.id for s in outside)} resolve outside it and were not read)"
                if outside else "")
        raise ShardingError(
            f"no split files in {split_dir}{also}: write train.txt, val.txt and test.txt there "
            f"(one motion id per line, or `id:i,j,k` caption indices), or pass --split-dir")
    return found


def parse_caption_line(motion_id: str, line: int, raw: bytes) -> CaptionLine:
    ref = caption_ref(motion_id, line)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return CaptionLine(line, None, Skip(ref, "bad_encoding", str(err), "caption"))
    parts = text.split("#")
    caption = parts[0].strip()
    if not caption:
        return CaptionLine(line, None, Skip(ref, "empty_caption", "caption text is empty",
                                            "caption"))
    start = end = 0.0
    if len(parts) >= 4:
        try:
            start, end = parse_span(parts[2], parts[3])
        except ValueError as err:
            return CaptionLine(line, None, Skip(ref, "bad_caption_span", str(err), "caption"))
    return CaptionLine(line, Caption(line, caption, start, end), None)


def read_caption_file(motion_id: str, path: Path) -> list[CaptionLine]:
    """Every line is a caption; a bad line costs only itself. Trailing blank lines are not."""
    raw_lines = path.read_bytes().splitlines()
    while raw_lines and not raw_lines[-1].strip():
        raw_lines.pop()
    return [parse_caption_line(motion_id, i, raw) for i, raw in enumerate(raw_lines)]


def select_captions(motion_id: str, lines: list[CaptionLine], indices: tuple[str, ...] | None
                    ) -> tuple[list[CaptionLine], list[Skip]]:
    """The caption lines a split entry names; bad indices become caption-level skips."""
    if indices is None:
        return lines, []
    chosen, bad, used = [], [], set()
    for token in indices:
        # isdigit() alone accepts '²', which int() refuses
        index = int(token) if token.isascii() and token.isdigit() else -1
        if index in used:
            bad.append(Skip(f"{motion_id}:{token}", "duplicate_id",
                            "caption index named twice", "caption"))
        elif 0 <= index < len(lines):
            chosen.append(lines[index])
            used.add(index)
        else:
            bad.append(Skip(f"{motion_id}:{token}", "bad_caption_index",
                            f"index {token!r} not in its {len(lines)} caption lines", "caption"))
    return chosen, bad


def load_mean_std(root: Path, feature_dim: int, skipped: list[Skip]
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """The corpus's Mean/Std; None (computed later) when either is absent or resolves
    outside the root (that one is recorded in `skipped`)."""
    mean_path, std_path = root / "Mean.npy", root / "Std.npy"
    if not (mean_path.is_file() and std_path.is_file()):
        return None
    resolved = [inside_root(path, root) for path in (mean_path, std_path)]
    outside = [Skip(path.name, "outside_root", f"{path.name} resolves outside the corpus "
                    f"root; not read, Mean/Std are computed instead", "file")
               for path, inside in zip((mean_path, std_path), resolved) if inside is None]
    if outside:
        skipped.extend(outside)
        return None
    stats = []
    for path, inside in zip((mean_path, std_path), resolved):
        try:
            with open(inside, "rb") as f:
                array = load_checked(f, os.fstat(f.fileno()).st_size)
        except (NpyHeaderError, ValueError, OSError, EOFError) as err:
            raise ShardingError(f"cannot read {path} ({err}); fix or remove it") from err
        if array.shape != (feature_dim,):
            raise ShardingError(f"{path} has shape {array.shape}, expected ({feature_dim},); "
                                f"check --feature-dim or remove Mean.npy/Std.npy")
        stats.append(array.astype(np.float32))
    return stats[0], stats[1]


def read_layout(root: Path, *, corpus: str, feature_dim: int, fps: float,
                split_dir: Path | None = None, mirrors: str = "include",
                allow_val_equals_test: bool = False, motion_dir: str = MOTION_DIR,
                corpus_stats: bool = True) -> SourcePlan:
    """`motion_dir`: the folder of the motions under ROOT; `corpus_stats=False` ignores
    Mean.npy/Std.npy (motions turned into another representation have other statistics)."""
    root = Path(root)
    if not root.is_dir():
        raise ShardingError(f"corpus root {root} does not exist: pass --root with the folder "
                            f"that holds {MOTION_DIR}/ and {TEXT_DIR}/")
    for sub in (motion_dir, TEXT_DIR):
        if not (root / sub).is_dir():
            raise ShardingError(f"{root} has no {sub}/ folder: is --root the corpus folder?")
    skipped: list[Skip] = []
    entries_by_split = read_split_files(Path(split_dir) if split_dir else root, skipped)
    val, test = set(entries_by_split.get("val", [])), set(entries_by_split.get("test", []))
    val_equals_test = bool(val) and val == test
    if val_equals_test and not allow_val_equals_test:
        raise ShardingError("the val split is identical to the test split, so a checkpoint "
                            "chosen on val is chosen on test; write a separate val split, or "
                            "pass --allow-val-equals-test to shard it anyway")

    plan = SourcePlan(corpus=corpus, feature_dim=feature_dim, fps=fps, tasks={},
                      skipped=skipped,
                      mean_std=load_mean_std(root, feature_dim, skipped) if corpus_stats else None)
    caption_cache: dict[str, list[CaptionLine]] = {}
    captions_by_split: dict[str, list[str]] = {}
    for split, entries in entries_by_split.items():
        seen: set[str] = set()
        tasks = []
        for entry in entries:
            plan.named_motions += 1
            task = _entry_task(root, split, entry, seen, caption_cache, plan, motion_dir,
                               fps, mirrors)
            if task is not None:
                tasks.append(task)
                captions_by_split.setdefault(split, []).extend(c.text for c in task.captions)
        plan.tasks[split] = finalize_split(tasks, plan.skipped)
    plan.hygiene = hygiene_report({s: [e.id for e in es] for s, es in entries_by_split.items()},
                                  captions_by_split, val_equals_test)
    return plan


def _entry_task(root: Path, split: str, entry: SplitEntry, seen: set[str],
                caption_cache: dict[str, list[CaptionLine]], plan: SourcePlan,
                motion_dir: str, fps: float, mirrors: str) -> MotionTask | None:
    """One split entry -> a task, or a motion-level skip recorded in `plan`."""
    motion_id = entry.id

    def skip(reason: str, detail: str) -> None:
        plan.skipped.append(Skip(motion_id, reason, detail, "motion"))

    if not is_valid_key(motion_id):
        skip("bad_id", f"{motion_id!r} in {split}.txt")
        return None
    if motion_id in seen:
        # A repeated line names no new captions: they are the first occurrence's.
        skip("duplicate_id", f"named again in {split}.txt")
        return None
    seen.add(motion_id)
    text_name, motion_name = f"{TEXT_DIR}/{motion_id}.txt", f"{motion_dir}/{motion_id}.npy"
    # resolved (symlinks, '..') before anything is read; None when outside the root
    text_inside = inside_root(root / text_name, root)
    motion_inside = inside_root(root / motion_name, root)
    lines = caption_cache.get(motion_id)
    if lines is None and text_inside is not None and text_inside.is_file():
        lines = caption_cache[motion_id] = read_caption_file(motion_id, text_inside)
    chosen, bad_indices = select_captions(motion_id, lines or [], entry.indices)
    named = len(chosen) + len(bad_indices) if lines is not None or entry.indices else 0
    plan.named_captions += named
    outside = ("resolves outside the corpus root (a symlink or '..'); not read: copy the "
               "file into the root")
    if mirrors == "exclude" and motion_id.startswith("M"):
        skip("mirror_excluded", f"in {split}.txt")
    elif motion_inside is None:
        skip("outside_root", f"{motion_name} {outside}")
    elif not motion_inside.is_file():
        skip("missing_motion", f"{split}.txt names it; no {motion_name}")
    elif text_inside is None:
        skip("outside_root", f"{text_name} {outside}")
    elif lines is None:
        skip("missing_caption_file", f"no {text_name}")
    else:
        plan.skipped.extend(bad_indices)
        plan.skipped.extend(c.skip for c in chosen if c.skip is not None)
        captions = [c.caption for c in chosen if c.caption is not None]
        return MotionTask(motion_id, split, motion_inside, motion_name, fps, captions, named)
    return None
