"""Several corpora in one model, on the demo: two demo corpora that differ as two real corpora
do, sharded through the joints source, three trainings and the runs x test sets matrix.

    A  seed 0, HumanML3D-like action mix and captions, joints as smpl22, 20 fps, Y up, metres
    B  seed 1, KIT-ML-like (more locomotion, terse captions), joints as kit21 (KIT-ML's 21 MMM
       joints), 12.5 fps, Z up, millimetres

Both become HumanML3D's 263 features at 20 fps (`make_shards.py joints`); then `train.py`
trains on A, on B and on A+B (`data.sources`; weight 0.5 each, so that the mixture takes as
many steps as each corpus alone), and `rehamot-eval --matrix` prints the captions protocol's test results
of each run on each corpus. `make demo-mix` runs it:

    python shards/demo_mix.py [--motions N] [--data DIR] [--runs DIR] [key=value ...]

key=value overrides go to all three trainings (e.g. train.epochs=2). It starts over each time:
the corpora under --data and the runs under --runs are written anew (`run.overwrite`).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `shards` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import shutil
import subprocess
import time
from dataclasses import dataclass

from shards.demo_corpus import JSONL_NAME, write_demo_source
from shards.demo_joints import JointsFormat

REPO = Path(__file__).resolve().parent.parent
CONFIG = "configs/demo_mix.yaml"


@dataclass(frozen=True)
class Corpus:
    name: str
    seed: int
    style: str
    joints: JointsFormat


CORPORA = (
    Corpus("A", 0, "humanml3d", JointsFormat("smpl22", 20.0, "y", "m")),
    Corpus("B", 1, "kit", JointsFormat("kit21", 12.5, "z", "mm")),
)
# run name -> {corpus: weight}. The mixture takes half of each corpus per epoch, so all three
# runs take the same steps: what A+B gains is the data's variety, not more training.
TRAININGS = {"A": {"A": 1.0}, "B": {"B": 1.0}, "A+B": {"A": 0.5, "B": 0.5}}


def _run(script: str, *args: str) -> None:
    print(f"$ python {script} {' '.join(args)}", flush=True)
    done = subprocess.run([sys.executable, script, *args], cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"demo-mix: {script} exited {done.returncode}")


def _from_repo(path: Path) -> Path:
    """The path as the commands (run in the repository) see it: relative when inside it."""
    path = path.resolve()
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def build_corpus(corpus: Corpus, data: Path, motions: int, workers: int) -> Path:
    """Write the corpus's joints and JSONL, shard them; return the shard folder."""
    source = data / f"source-{corpus.name}"
    shutil.rmtree(REPO / source, ignore_errors=True)  # our own output of an earlier run
    stats = write_demo_source(REPO / source, motions, seed=corpus.seed, workers=workers,
                              style=corpus.style, joints=corpus.joints)
    fmt = corpus.joints
    print(f"corpus {corpus.name}: {stats['motions']} motions, {stats['captions']} captions, seed "
          f"{corpus.seed}, {corpus.style} style; joints as {fmt.skeleton}, {fmt.fps:g} fps, "
          f"{fmt.up} up, {fmt.unit} ({stats['seconds']:.1f} s)", flush=True)
    shards = data / corpus.name
    _run("shards/make_shards.py", "joints", "--file", str(source / JSONL_NAME), "--corpus",
         f"demo-{corpus.name}", "--out", str(shards), "--workers", str(workers), "--overwrite")
    return shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--motions", type=int, default=1500, help="motions per corpus (default 1500)")
    parser.add_argument("--data", type=Path, default=Path("data/demo-mix"),
                        help="folder of the corpora and their shards (default data/demo-mix)")
    parser.add_argument("--runs", type=Path, default=Path("runs/demo-mix"),
                        help="folder of the three runs and the matrix (default runs/demo-mix)")
    parser.add_argument("--workers", type=int, default=1, help="processes generating and sharding")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="passed to every training")
    args = parser.parse_args(argv)
    data, runs = _from_repo(args.data), _from_repo(args.runs)
    started = time.perf_counter()

    shards = {c.name: build_corpus(c, data, args.motions, args.workers) for c in CORPORA}
    run_dirs = []
    for run_name, sources in TRAININGS.items():
        run_dir = runs / f"train-{run_name}"
        listed = ", ".join(f"{{shards: {shards[s]}, weight: {w:g}}}" for s, w in sources.items())
        print(f"\n== training on {run_name} ==", flush=True)
        _run("rehamot/train.py", CONFIG, f"run.dir={run_dir}", "run.overwrite=true",
             f"data.sources=[{listed}]", *args.overrides)
        run_dirs.append(run_dir)
    print("\n== each run on each corpus's test split ==", flush=True)
    _run("rehamot/evaluate.py", "--matrix", *map(str, run_dirs), "--on",
         *(str(shards[c.name]) for c in CORPORA), "--out", str(runs / "matrix"))
    print(f"demo-mix: {time.perf_counter() - started:.0f} s; runs in {runs}, "
          f"matrix in {runs / 'matrix'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
