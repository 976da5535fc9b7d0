"""Folders of stand-in "generated" motions for trying rehamot-eval-generation on a real split.

    python benchmarks/generation_examples.py RUN_DIR --out outputs/gen-examples [--split test]
        [--noise 0.5 2.0] [--mm-prompts 32] [--mm-generations 12] [--seed 0]

writes, one <motion_id>.npy per motion of the split (raw features, the corpus's layout):
    OUT/real/       the real motions themselves (must reproduce the real row, FID 0)
    OUT/noised-S/   real + S * Std * N(0, 1) per feature for each --noise S (Std of the corpus,
                    from the bundle), with OUT/noised-S/repeats/<id>/<r>.npy: --mm-generations
                    independent draws for the first --mm-prompts motions (multimodality)
    OUT/shuffled/   each id holds the real motion of the id half the split away: right motions,
                    wrong prompts (R-precision drops, FID cannot tell)
The real motions and ids come from the run's shards (or --shards).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from rehamot.config import load_config
from rehamot.evaluation.generation_eval import read_split
from rehamot.models.bundle import BUNDLE_FILE, CONFIG_FILE, find_bundle


def save(folder: Path, motions: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for motion_id, motion in motions.items():
        np.save(folder / f"{motion_id}.npy", motion, allow_pickle=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--shards", default=None)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.5, 2.0],
                        help="noise scales, in units of the corpus Std (one folder each)")
    parser.add_argument("--mm-prompts", type=int, default=32)
    parser.add_argument("--mm-generations", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    bundle = find_bundle(args.run_dir)
    std = np.asarray(json.loads((bundle / BUNDLE_FILE).read_text())["std"], dtype=np.float32)
    ids, _, real = read_split(args.shards or load_config(bundle / CONFIG_FILE).data.shards, args.split)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    rng = np.random.default_rng(args.seed)

    def noised(motion: np.ndarray, scale: float) -> np.ndarray:
        return (motion + scale * std * rng.standard_normal(motion.shape, dtype=np.float32)).astype(motion.dtype)

    save(out / "real", real)
    for scale in args.noise:
        folder = out / f"noised-{scale:g}"
        save(folder, {i: noised(real[i], scale) for i in ids})
        for motion_id in ids[:args.mm_prompts]:
            save(folder / "repeats" / motion_id,
                 {str(r): noised(real[motion_id], scale) for r in range(args.mm_generations)})
    half = len(ids) // 2
    save(out / "shuffled", {ids[k]: real[ids[(k + half) % len(ids)]] for k in range(len(ids))})
    noised_names = ", ".join(f"noised-{scale:g}" for scale in args.noise)
    print(f"wrote {out}: real, {noised_names} (+ repeats of {min(args.mm_prompts, len(ids))} prompts), shuffled; "
          f"{len(ids)} {args.split} motions each")


if __name__ == "__main__":
    main()
