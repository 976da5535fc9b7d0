"""The leak check (rehamot.data.leaks): its time on many keys, its recall on planted duplicates.

    python benchmarks/leak_check.py synthetic [--motions 100000] [--planted 1000] [--seed 0]
    python benchmarks/leak_check.py demo DIR [--seed 0]

synthetic: N motions of random smooth movement (poses of the six key joints, a walked path,
turns), 80/10/10 train/val/test, made at 20 fps and keyed as the sharding script keys them; for
`--planted` val/test motions, the train split also holds an exact copy, a mirror and a crop of
at least half of it (starting at any 20 fps frame). Prints the check's time and its recall on
each kind; every other train motion it flags is a false drop.

demo: the real motions of a shard set (the demo corpus): each val/test motion's copy, its
mirror made as HumanML3D makes its M-mirrors (joints mirrored, then features computed again
from them) and crops of at least half go into a second set's train split; prints the recall by
kind, and how many of the set's own train motions are flagged against its val/test.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from rehamot.data import leaks, schema

FPS = 20.0


def _yaw(points: np.ndarray, angle: np.ndarray) -> np.ndarray:
    return leaks._yaw(points, angle)


def synthetic_motion(rng: np.random.Generator, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """World joints (T, 6, 3) in KEY_JOINTS order and the heading (T,) of a random smooth motion."""
    t = np.arange(frames) / FPS
    base = np.array([[0, 0.95, 0], [0, 1.65, 0.05], [0.25, 1.0, 0.1], [-0.25, 1.0, 0.1],
                     [0.1, 0.08, 0], [-0.1, 0.08, 0]])
    amp = rng.uniform(0.02, 0.3, (2, 6, 3))
    freq = rng.uniform(0.2, 2.0, (2, 6, 3))
    phase = rng.uniform(0, 2 * np.pi, (2, 6, 3))
    local = base + (amp[:, None] * np.sin(2 * np.pi * freq[:, None] * t[None, :, None, None] + phase[:, None])).sum(0)
    local[:, 0, [0, 2]] = 0.0  # the root is the origin of its own facing frame
    heading = rng.uniform(-np.pi, np.pi) + rng.uniform(-0.8, 0.8) * t + 0.3 * np.sin(rng.uniform(0.1, 1) * t)
    speed = rng.uniform(0, 1.5) * (1 + 0.3 * np.sin(rng.uniform(0.2, 1.0) * 2 * np.pi * t))
    step = np.stack([np.sin(heading), np.zeros(frames), np.cos(heading)], 1) * speed[:, None] / FPS
    root = np.cumsum(step, 0)
    world = _yaw(local, heading) + root[:, None] * np.array([1.0, 0.0, 1.0])
    return world, heading


def mirror(joints: np.ndarray, heading: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = joints[:, leaks.MIRROR].copy()
    out[..., 0] *= -1
    return out, -heading


def keyset(name: str, ids, splits, keys) -> leaks.KeySet:
    lengths = [len(k[0]) for k in keys]
    return leaks.KeySet(name, list(ids), list(splits), list(ids), np.concatenate([[0], np.cumsum(lengths)]),
                        np.concatenate([k[0] for k in keys]).astype(np.float32),
                        np.concatenate([k[1] for k in keys]), np.concatenate([k[2] for k in keys]))


def crop_span(rng: np.random.Generator, frames: int) -> tuple[int, int]:
    length = int(rng.integers((frames + 1) // 2, frames + 1))
    start = int(rng.integers(0, frames - length + 1))
    return start, start + length


def recall(report: dict, planted: dict[str, str]) -> dict[str, tuple[int, int]]:
    flagged = {i for ids in report["dropped"].values() for i in ids}
    out = {}
    for kind in sorted(set(planted.values())):
        ids = [i for i, k in planted.items() if k == kind]
        out[kind] = (sum(i in flagged for i in ids), len(ids))
    return out


def run_synthetic(motions: int, planted: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    ids, splits, keys, sources = [], [], [], {}
    originals = motions - 3 * planted
    for i in range(originals):
        split = "train" if i % 10 < 8 else ("val" if i % 10 == 8 else "test")
        frames = int(rng.integers(40, 197))
        joints, heading = synthetic_motion(rng, frames)
        if split != "train" and len(sources) < planted:
            sources[f"m{i:06d}"] = (joints, heading)
        ids.append(f"m{i:06d}")
        splits.append(split)
        keys.append(leaks.motion_key(joints, heading, FPS))
    kinds = {}
    for n, (parent, (joints, heading)) in enumerate(sources.items()):
        start, stop = crop_span(rng, len(joints))
        for kind, (j, h) in (("copy", (joints, heading)), ("mirror", mirror(joints, heading)),
                             ("crop", (joints[start:stop], heading[start:stop]))):
            ids.append(f"p{n:05d}_{kind}_of_{parent}")
            splits.append("train")
            keys.append(leaks.motion_key(j, h, FPS))
            kinds[ids[-1]] = kind
    made = time.perf_counter() - started
    keyed = keyset("synthetic", ids, splits, keys)
    frames = int(keyed.offsets[-1])
    print(f"{len(ids)} motions ({sum(s == 'train' for s in splits)} train), {frames} key frames "
          f"({keyed.pose.nbytes // 2 + keyed.root.nbytes + keyed.heading.nbytes} bytes as stored), "
          f"made in {made:.1f} s")
    started = time.perf_counter()
    report = leaks.find_leaks([keyed])
    seconds = time.perf_counter() - started
    flagged = set(report["dropped"]["synthetic"])
    print(f"check: {seconds:.1f} s")
    for kind, (found, total) in recall(report, kinds).items():
        print(f"recall {kind}: {found}/{total}")
    print(f"false drops: {len(flagged - set(kinds))} of {originals} original motions")


def run_demo(location: str, seed: int) -> None:
    from rehamot.data.reading import read_raw_motions
    from rehamot.motion.features import joints_to_features
    from rehamot.motion.kinematics import features_to_joints
    from shards.demo_skeleton import mirror_joints
    from shards.leak_keys import features_key

    manifest = schema.load_manifest(location)
    own = leaks.load_keys(location, manifest, "demo")
    report = leaks.find_leaks([own])
    train = sum(s == "train" for s in own.splits)
    print(f"{location}: {len(own)} samples, {train} train; own train flagged against its val/test: "
          f"{len(report['dropped']['demo'])} ({report['seconds']:.1f} s)")
    for bound in (0.01, 0.02, 0.03):
        print(f"  within {100 * bound:.0f} cm: {len(leaks.find_leaks([own], max_error=bound)['dropped']['demo'])}")
    rng = np.random.default_rng(seed)
    motions = {}
    for split in ("val", "test"):
        motions.update(read_raw_motions(location, split))
    ids, splits, keys, kinds = [], [], [], {}
    for n, (sample_id, features) in enumerate(sorted(motions.items())):
        start, stop = crop_span(rng, len(features))
        mirrored = joints_to_features(mirror_joints(features_to_joints(features)))
        for kind, feats in (("copy", features), ("mirror", mirrored), ("crop", features[start:stop]),
                            ("mirror_crop", mirrored[start:stop])):
            ids.append(f"p{n:04d}_{kind}_of_{sample_id}")
            splits.append("train")
            keys.append(features_key(feats, "humanml3d", FPS))
            kinds[ids[-1]] = kind
    planted = keyset("planted", ids, splits, keys)
    report = leaks.find_leaks([own, planted])
    flagged = set(report["dropped"]["planted"])
    for kind in sorted(set(kinds.values())):
        group = [i for i, k in kinds.items() if k == kind]
        print(f"recall {kind}: {sum(i in flagged for i in group)}/{len(group)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("synthetic")
    sub.add_argument("--motions", type=int, default=100_000)
    sub.add_argument("--planted", type=int, default=1000)
    sub.add_argument("--seed", type=int, default=0)
    sub = commands.add_parser("demo")
    sub.add_argument("dir")
    sub.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "synthetic":
        run_synthetic(args.motions, args.planted, args.seed)
    else:
        run_demo(args.dir, args.seed)


if __name__ == "__main__":
    main()
