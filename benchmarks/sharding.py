"""Sharding throughput vs. the original's file-by-file start-up, on one corpus, in one run.

    python benchmarks/sharding.py [--motions 2000] [--root HUMANML3D_LAYOUT] [--workers 1,2]

Measures (wall clock, after imports are warm):
  1. sharding (make_shards.py humanml3d) with each --workers value: source motions/s;
  2. one plain WebDataset pass over every shard (decode motion.npy + json): samples/s;
  3. loading the same corpus file by file, as the original does at start-up (np.load of
     every new_joint_vecs/<id>.npy and reading every texts/<id>.txt): motions/s.
Prints a markdown table. The corpus is the procedural demo when shards/demo_corpus.py is
importable, else random (T, 263) motions of 40-200 frames with three captions each.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from rehamot.data import schema
from shards.make_shards import main as make_shards


def random_source(root: Path, motions: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    (root / "new_joint_vecs").mkdir(parents=True)
    (root / "texts").mkdir()
    ids = [f"{i:06d}" for i in range(motions)]
    for motion_id in ids:
        frames = int(rng.integers(40, 201))
        np.save(root / "new_joint_vecs" / f"{motion_id}.npy",
                rng.normal(size=(frames, 263)).astype(np.float32))
        (root / "texts" / f"{motion_id}.txt").write_text(
            "".join(f"a person does motion {motion_id} way {k}#a/DET#0.0#0.0\n" for k in range(3)))
    cut = [0, int(0.8 * motions), int(0.9 * motions), motions]
    for split, lo, hi in zip(schema.SPLITS, cut, cut[1:]):
        (root / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids[lo:hi]))
    return "random"


def demo_or_random_source(root: Path, motions: int, seed: int) -> str:
    try:
        from shards.demo_corpus import write_demo_source
    except ImportError:
        return random_source(root, motions, seed)
    write_demo_source(root, motions, seed=seed, workers=2)
    return "demo"


def file_by_file(root: Path) -> tuple[int, float]:
    """The original's start-up: every motion and caption file read into memory."""
    start = time.perf_counter()
    data = {}
    for split in schema.SPLITS:
        for motion_id in (root / f"{split}.txt").read_text().split():
            motion = np.load(root / "new_joint_vecs" / f"{motion_id}.npy", allow_pickle=False)
            texts = (root / "texts" / f"{motion_id}.txt").read_text(encoding="utf-8").splitlines()
            data[motion_id] = (motion, [line.split("#")[0] for line in texts])
    return len(data), time.perf_counter() - start


def webdataset_pass(out: Path) -> tuple[int, float]:
    import webdataset as wds

    manifest = schema.load_manifest(out)
    urls = [str(out / s["path"]) for e in manifest["splits"].values() for s in e["shards"]]
    start = time.perf_counter()
    count = 0
    for sample in wds.WebDataset(urls, shardshuffle=False):
        schema.decode_motion(sample[schema.MOTION_MEMBER])
        schema.decode_meta(sample[schema.META_MEMBER])
        count += 1
    return count, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--motions", type=int, default=2000)
    parser.add_argument("--root", type=Path, default=None, help="an existing HumanML3D layout")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="rehamot-bench-") as tmp:
        work = Path(tmp)
        root, kind = args.root, "given"
        if root is None:
            root = work / "source"
            kind = demo_or_random_source(root, args.motions, args.seed)
        named = sum(len((root / f"{s}.txt").read_text().split()) for s in schema.SPLITS)
        import webdataset  # noqa: F401  (warm the import so that it is not timed)

        rows = []
        for workers in (int(w) for w in args.workers.split(",")):
            out = work / f"shards-{workers}"
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # its summary tables
                code = make_shards(["humanml3d", "--root", str(root), "--out", str(out),
                                    "--workers", str(workers)])
            seconds = time.perf_counter() - start
            if code != 0:
                raise SystemExit(f"sharding failed with --workers {workers}")
            rows.append((f"shard (make_shards.py, --workers {workers})", named, "motions",
                         seconds))
        samples, seconds = webdataset_pass(out)
        rows.append(("read back: one WebDataset pass", samples, "samples", seconds))
        count, seconds = file_by_file(root)
        rows.append(("load file by file (original start-up)", count, "motions", seconds))
        size = sum(p.stat().st_size for p in out.glob("*.tar")) / 1e6

    print(f"\ncorpus: {kind}, {named} motions, {size:.0f} MB of shards; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}\n")
    print("| step | items | seconds | items/s |")
    print("| --- | ---: | ---: | ---: |")
    for step, items, unit, seconds in rows:
        print(f"| {step} | {items} {unit} | {seconds:.2f} | {items / seconds:,.0f} |")


if __name__ == "__main__":
    main()
