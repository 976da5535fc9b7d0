"""The procedural demo corpus: motion-caption pairs in the HumanML3D folder layout.

New users train on it before they have data, and `make_shards.py demo` shards it with the
humanml3d converter. `write_demo_source(root, num_motions, seed, workers)` writes

    new_joint_vecs/<id>.npy   float32 (T, 263), HumanML3D features at 20 fps (demo_features)
    new_joints/<id>.npy       float32 (T, 22, 3), the joints those features describe
    texts/<id>.txt            3 lines `caption#tokens#0.0#0.0` (tokens: lowercased words
                              tagged /OTHER); ~4% of motions get a 4th line with start/end in
                              seconds naming one of their chained actions (a sub-clip >= 2 s)
    train.txt val.txt test.txt   one id per line, 80/10/10
    Mean.npy Std.npy          (263,) over the train split; Std averaged within each feature
                              group, as HumanML3D's own Std.npy is

Ids are six digits ("000123"); `M<id>` is the left/right mirror of <id> (joints swapped
and x negated, "left"/"right" swapped in its captions, as HumanML3D does), always in its
parent's split, and counted in num_motions. 10% of ids are mirrors, made only of motions
with a left/right action: a symmetric motion's mirror would repeat all its captions.

Each motion is a chain of 1-4 parameterised actions (demo_actions) lasting 2-9.8 s, built
from a generator seeded by (seed, motion index) alone, so the bytes written do not depend on
`workers`. The train sums behind Mean/Std are reduced in fixed-size chunks in index order
for the same reason.

Two options make it look like another corpus. `style="kit"` draws a KIT-ML-like mix
(locomotion several times likelier, see STYLES) captioned tersely (a few neutral subjects, no
closing phrase). `joints=JointsFormat(skeleton, fps, up, unit)` also writes

    joints/<id>.npy           float32 (T', J, 3): the motion's joints in that skeleton
                              (smpl22 or kit21), rate, up axis and unit (demo_joints)
    corpus.jsonl              one record per motion for `make_shards.py joints`: id, joints,
                              skeleton, fps, up, unit, split, captions (sub-clips with start/end)

Standalone: `python shards/demo_corpus.py --out DIR --motions N [--seed S] [--workers W]
[--style humanml3d|kit] [--skeleton smpl22|kit21 [--fps F] [--up y|z] [--unit m|cm|mm]]`.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `shards` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
import multiprocessing
import time
from collections import Counter
from typing import Any, Callable

import numpy as np

from shards.demo_actions import ACTION_NAMES, FPS, MIN_SECONDS, Plan, action_weights, sample_plan, synthesize
from shards.demo_captions import caption_line, mirror_caption, motion_captions, subclip_span, unit_caption
from shards.demo_features import FEATURE_DIM, FEATURE_GROUPS, joints_to_features
from shards.demo_joints import SKELETON_CHOICES, JointsFormat, export_joints
from shards.demo_skeleton import forward_kinematics, mirror_joints

SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
MIRROR_FRACTION = 0.1  # of all ids; each mirror repeats its parent's captions without left/right
SUBCLIP_FRACTION = 0.05  # of motions with 2+ actions: one extra caption with start/end
CHUNK = 64  # motions per task; fixed so that the Mean/Std reduction order is too
BATCH = 16  # motions computed together (numpy is slow on many small arrays)
_MOTION_STREAM, _LAYOUT_STREAM = 0, 1
JSONL_NAME = "corpus.jsonl"
# Corpus styles: (action weight multipliers, terse captions). "kit" leans on locomotion and
# plain captions, as KIT-ML does next to HumanML3D.
STYLES: dict[str, tuple[dict[str, float], bool]] = {
    "humanml3d": ({}, False),
    "kit": ({"walk_forward": 3.0, "walk_backward": 2.0, "run_forward": 2.0, "side_step": 2.0,
             "turn": 2.0, "walk_circle": 2.0, "sit": 0.3, "jumping_jacks": 0.3, "bow": 0.3,
             "look_around": 0.3, "hop_one_leg": 0.5, "arm_circles": 0.5}, True),
}


def _motion_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_MOTION_STREAM, index)))


def motion_id(index: int) -> str:
    return f"{index:06d}"


def build_motion(plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """(features (T, 263) float32, joints (T, 22, 3) float32) of a plan."""
    feats, joints = joints_to_features(forward_kinematics(synthesize(plan)))
    return feats, joints[:-1].astype(np.float32)


def _pad(arrays: list[np.ndarray], length: int, edge: bool) -> np.ndarray:
    """Stack along a new first axis, padding each to `length` frames with its last frame
    (edge) or zeros (a pose track at rest)."""
    out = np.zeros((len(arrays), length) + arrays[0].shape[1:])
    for i, arr in enumerate(arrays):
        out[i, : len(arr)] = arr
        if edge:
            out[i, len(arr) :] = arr[-1]
    return out


def _in_batches(
    items: list[np.ndarray], fn: Callable[[np.ndarray], tuple[np.ndarray, ...]], edge: bool, trim: int
) -> list[tuple[np.ndarray, ...]]:
    """fn over padded batches of similar length; every output is cropped back to its item's
    own length less `trim` frames. Our kinematics and features work per frame (or replicate
    edges, like the padding), so batching never changes a motion's numbers, only the speed."""
    order = sorted(range(len(items)), key=lambda i: len(items[i]))
    out: list[tuple[np.ndarray, ...]] = [()] * len(items)
    for start in range(0, len(order), BATCH):
        group = order[start : start + BATCH]
        results = fn(_pad([items[i] for i in group], max(len(items[i]) for i in group), edge))
        for row, i in enumerate(group):
            out[i] = tuple(r[row, : len(items[i]) - trim] for r in results)
    return out


def _caption_lines(plan: Plan, rng: np.random.Generator, subclip_fraction: float,
                   terse: bool = False) -> list[tuple[str, float, float]]:
    lines = [(text, 0.0, 0.0) for text in motion_captions(plan, rng, terse=terse)]
    long_units = [
        i for i, (first, last) in enumerate(plan.segments) if last - first >= MIN_SECONDS * FPS
    ]
    if len(plan.units) >= 2 and long_units and rng.random() < subclip_fraction:
        index = long_units[int(rng.integers(len(long_units)))]
        start, end = subclip_span(plan, index)
        lines.append((unit_caption(plan.units[index], rng, terse=terse), start, end))
    return lines


def _write_motion(root: Path, ident: str, feats: np.ndarray, joints: np.ndarray,
                  lines: list[tuple[str, float, float]]) -> None:
    np.save(root / "new_joint_vecs" / f"{ident}.npy", feats, allow_pickle=False)
    np.save(root / "new_joints" / f"{ident}.npy", joints, allow_pickle=False)
    text = "".join(caption_line(c, s, e) + "\n" for c, s, e in lines)
    (root / "texts" / f"{ident}.txt").write_text(text, encoding="utf-8")


def _has_side(plan: Plan) -> bool:
    params = [u.params for u in plan.units] + [u.overlay[1] for u in plan.units if u.overlay]
    return any(p.get("side") in ("left", "right") or p.get("variant") in ("left", "right") for p in params)


def _generate_chunk(task: dict[str, Any]) -> dict[str, Any]:
    """Generate and write one chunk of motions (and their mirrors); runs in a worker."""
    root = Path(task["root"])
    scale, terse = STYLES[task["style"]]
    weights = action_weights(scale) if scale else None
    names: list[tuple[str, str, list[str]]] = []  # (id, split, actions)
    versions: list[list[tuple[str, float, float]]] = []
    tracks: list[np.ndarray] = []
    for index, split, mirrored in task["motions"]:
        rng = _motion_rng(task["seed"], index)
        plan = sample_plan(rng, weights)
        while mirrored and not _has_side(plan):
            # Mirror only motions with a left/right action: a symmetric motion's mirror is a
            # near copy whose captions would all repeat its parent's.
            plan = sample_plan(rng, weights)
        tracks.append(synthesize(plan))
        lines = _caption_lines(plan, rng, task["subclip_fraction"], terse)
        actions = sorted({u.action for u in plan.units} | {u.overlay[0] for u in plan.units if u.overlay})
        names.append((motion_id(index), split, actions))
        versions.append(lines)
    joints = [j for (j,) in _in_batches(tracks, lambda t: (forward_kinematics(t),), edge=False, trim=0)]
    all_joints, records_in = [], []
    for (ident, split, actions), lines, motion_joints, (_, _, mirrored) in zip(
        names, versions, joints, task["motions"]
    ):
        all_joints.append(motion_joints)
        records_in.append((ident, split, actions, lines))
        if mirrored:
            all_joints.append(mirror_joints(motion_joints))
            records_in.append(("M" + ident, split, actions, [(mirror_caption(c), s, e) for c, s, e in lines]))
    results = _in_batches(all_joints, joints_to_features, edge=True, trim=1)
    if task["joints"] is not None:  # all T frames (the features have T-1): the source's input
        for (ident, *_), motion_joints in zip(records_in, all_joints):
            np.save(root / "joints" / f"{ident}.npy", export_joints(motion_joints, task["joints"]),
                    allow_pickle=False)

    records: list[dict[str, Any]] = []
    total, total_sq, frames = np.zeros(FEATURE_DIM), np.zeros(FEATURE_DIM), 0
    for (ident, split, actions, lines), (feats, norm_joints) in zip(records_in, results):
        _write_motion(root, ident, feats, norm_joints.astype(np.float32), lines)
        if split == "train":
            wide = feats.astype(np.float64)
            total += wide.sum(axis=0)
            total_sq += (wide * wide).sum(axis=0)
            frames += len(wide)
        records.append({
            "id": ident, "split": split, "frames": len(feats), "actions": actions,
            "captions": [c for c, s, e in lines if s == e == 0.0],
            "subclips": sum(1 for _, s, e in lines if (s, e) != (0.0, 0.0)),
            "lines": lines,
        })
    return {"records": records, "sum": total, "sum_sq": total_sq, "frames": frames}


def _layout(num_motions: int, seed: int, mirror_fraction: float) -> list[tuple[int, str, bool]]:
    """(base index, split, has a mirror) per base motion; mirrors share their parent's split."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_LAYOUT_STREAM,)))
    mirrors = int(round(num_motions * mirror_fraction))
    bases = num_motions - mirrors
    mirrored = np.zeros(bases, dtype=bool)
    mirrored[rng.choice(bases, size=mirrors, replace=False)] = True
    targets = {name: int(round(num_motions * SPLIT_FRACTIONS[name])) for name in ("val", "test")}
    filled = {"val": 0, "test": 0}
    split_of = ["train"] * bases
    for index in rng.permutation(bases):  # greedy fill keeps the 80/10/10 sizes exact
        size = 2 if mirrored[index] else 1
        for name in ("test", "val"):
            if filled[name] + size <= targets[name]:
                split_of[index] = name
                filled[name] += size
                break
    return [(i, split_of[i], bool(mirrored[i])) for i in range(bases)]


def _group_std(total: np.ndarray, total_sq: np.ndarray, frames: int) -> tuple[np.ndarray, np.ndarray]:
    mean = total / frames
    std = np.sqrt(np.maximum(total_sq / frames - mean * mean, 0.0))
    for first, last in FEATURE_GROUPS.values():  # HumanML3D: one std per feature group
        std[first:last] = std[first:last].mean()
    return mean.astype(np.float32), std.astype(np.float32)


def _frame_summary(frames: list[int]) -> dict[str, Any]:
    lengths = np.asarray(frames)
    edges = np.arange(2, 11) * FPS  # whole seconds 2..10
    counts, _ = np.histogram(lengths, bins=edges)
    return {
        "min": int(lengths.min()), "max": int(lengths.max()), "mean": round(float(lengths.mean()), 2),
        "median": float(np.median(lengths)), "total": int(lengths.sum()),
        "histogram_seconds": {f"{int(a / FPS)}-{int(b / FPS)}": int(c) for a, b, c in zip(edges[:-1], edges[1:], counts)},
    }


def _duplicate_rates(records: list[dict[str, Any]]) -> dict[str, float]:
    """Share of captions repeating an earlier caption's exact text, over all captions, and the
    share of test captions whose exact text also appears in train."""
    everything = [c for r in records for c in r["captions"]]
    train = {c for r in records if r["split"] == "train" for c in r["captions"]}
    test = [c for r in records if r["split"] == "test" for c in r["captions"]]
    return {
        "duplicate_caption_rate": round(1.0 - len(set(everything)) / max(len(everything), 1), 5),
        "train_test_duplicate_caption_rate": round(sum(c in train for c in test) / max(len(test), 1), 5),
    }


def write_demo_source(
    root: Path, num_motions: int, seed: int = 0, workers: int = 1, *,
    mirror_fraction: float = MIRROR_FRACTION, subclip_fraction: float = SUBCLIP_FRACTION,
    style: str = "humanml3d", joints: JointsFormat | None = None,
) -> dict[str, Any]:
    """Write the demo corpus in the HumanML3D layout under `root` (and, given `joints`, its
    joints in that format with a JSONL for the joints source); return its statistics."""
    started = time.perf_counter()
    root = Path(root)
    if num_motions < 10:
        raise ValueError(f"num_motions must be at least 10 (80/10/10 split), got {num_motions}")
    if style not in STYLES:
        raise ValueError(f"style {style!r}: expected one of {', '.join(STYLES)}")
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty: the demo corpus is written into a new folder")
    for sub in ("new_joint_vecs", "new_joints", "texts") + (("joints",) if joints else ()):
        (root / sub).mkdir(parents=True, exist_ok=True)

    layout = _layout(num_motions, seed, mirror_fraction)
    tasks = [
        {"root": str(root), "seed": seed, "subclip_fraction": subclip_fraction,
         "style": style, "joints": joints, "motions": layout[i : i + CHUNK]}
        for i in range(0, len(layout), CHUNK)
    ]
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = list(pool.imap(_generate_chunk, tasks))
    else:
        results = [_generate_chunk(task) for task in tasks]

    records = [r for result in results for r in result["records"]]
    total, total_sq, frames = np.zeros(FEATURE_DIM), np.zeros(FEATURE_DIM), 0
    for result in results:  # task order, whatever the worker count
        total += result["sum"]
        total_sq += result["sum_sq"]
        frames += result["frames"]
    mean, std = _group_std(total, total_sq, frames)
    np.save(root / "Mean.npy", mean, allow_pickle=False)
    np.save(root / "Std.npy", std, allow_pickle=False)
    splits: dict[str, list[str]] = {name: [] for name in SPLIT_FRACTIONS}
    for record in records:
        splits[record["split"]].append(record["id"])
    for name, ids in splits.items():
        (root / f"{name}.txt").write_text("".join(f"{i}\n" for i in sorted(ids)), encoding="utf-8")

    if joints is not None:
        _write_jsonl(root / JSONL_NAME, records, joints)

    action_counts = Counter(a for r in records for a in r["actions"])
    return {
        "root": str(root),
        "seed": seed,
        "style": style,
        **({"joints": joints.record()} if joints else {}),
        "fps": FPS,
        "feature_dim": FEATURE_DIM,
        "motions": len(records),
        "mirrored": sum(r["id"].startswith("M") for r in records),
        "captions": sum(len(r["captions"]) + r["subclips"] for r in records),
        "subclip_captions": sum(r["subclips"] for r in records),
        "splits": {name: len(ids) for name, ids in splits.items()},
        "frames": _frame_summary([r["frames"] for r in records]),
        "actions": {name: action_counts.get(name, 0) for name in ACTION_NAMES},
        **_duplicate_rates(records),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _write_jsonl(path: Path, records: list[dict[str, Any]], fmt: JointsFormat) -> None:
    """One joints-source record per motion, in id order (sub-clip captions with start/end)."""
    with open(path, "w", encoding="utf-8") as f:
        for record in sorted(records, key=lambda r: r["id"]):
            captions = [c if (s, e) == (0.0, 0.0) else {"text": c, "start": s, "end": e}
                        for c, s, e in record["lines"]]
            f.write(json.dumps({"id": record["id"], "joints": f"joints/{record['id']}.npy",
                                **fmt.record(), "split": record["split"], "captions": captions}) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="new folder to write the corpus into")
    parser.add_argument("--motions", type=int, default=2000, help="motion count, mirrors included")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--style", choices=tuple(STYLES), default="humanml3d",
                        help="action mix and caption style (kit: more locomotion, terse captions)")
    joints = parser.add_argument_group("joints", f"also write joints/ and {JSONL_NAME} for "
                                       "`make_shards.py joints` (given --skeleton)")
    joints.add_argument("--skeleton", choices=SKELETON_CHOICES, default=None)
    joints.add_argument("--fps", type=float, default=None, help="frame rate (default 20)")
    joints.add_argument("--up", choices=("y", "z"), default=None, help="up axis (default y)")
    joints.add_argument("--unit", choices=("m", "cm", "mm"), default=None, help="default m")
    args = parser.parse_args(argv)
    given = {k: v for k, v in (("fps", args.fps), ("up", args.up), ("unit", args.unit)) if v is not None}
    if given and args.skeleton is None:
        parser.error(f"--{next(iter(given))} describes the joints: give --skeleton too")
    try:
        fmt = JointsFormat(args.skeleton, **given) if args.skeleton else None
    except ValueError as err:
        parser.error(str(err))
    stats = write_demo_source(args.out, args.motions, seed=args.seed, workers=args.workers,
                              style=args.style, joints=fmt)
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
