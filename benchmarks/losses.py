"""The paper's comparison on the demo corpus: SH vs MH vs DropTriple (and InfoNCE).

Every run is the real entry point (`python -m rehamot.train configs/demo.yaml ...`, validation
picks the best epoch, the test split is scored from that bundle) followed by
`python -m rehamot.evaluate RUN --protocol captions,tmr-all,tmr-batch32`, so the numbers are
what a user would get. Grids:

  main        sh, mh, droptriple, infonce x seeds, frozen LM
  tuned       mh, droptriple x seeds, fine-tuned LM (train.lm_lr)
  threshold   droptriple with theta_m = theta_t in --thresholds, first seed
  global      mh, droptriple at batch B*W for W in --worlds, first seed: by the exactness of the
              global-batch objective (tests/multiprocess/test_objective_mp.py) one process with
              batch W*B trains the same as W ranks x B; same epochs, so fewer steps
  steps       the global sweep at equal steps: batch W*B for W*epochs (W > 1; W = 1 is the main
              grid's run) with the SH warm-up at W epochs, so every G gets the same number of
              steps, the same warm-up steps and the same learning-rate schedule
  long        --long-losses for --long-factor x the epochs (first seed): do the single-negative
              losses catch up with SH / InfoNCE given more steps?

    python shards/make_shards.py demo --motions 2000 --out data/demo     # what `make demo` builds
    HF_HUB_OFFLINE=1 python benchmarks/losses.py --shards data/demo --out runs/losses
    python benchmarks/losses.py --out runs/losses --report      # the markdown tables again

--shards and --out default to data/demo and runs/losses in the repository; relative paths
are taken from the current directory.

Results are appended to OUT/results.jsonl as each run ends; a re-launch skips finished runs.
`--jobs 2` runs two trainings at once with one thread each (faster on 2 cores than one run
with 2 threads, because the demo model is too small to use two threads well).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTOCOLS = ("captions", "tmr-all", "tmr-batch32")
KEYS = ("t2m/R@1", "t2m/R@5", "t2m/R@10", "t2m/MedR", "m2t/R@1", "m2t/R@5", "m2t/R@10", "m2t/MedR")


@dataclass(frozen=True)
class Run:
    grid: str
    label: str
    seed: int
    overrides: tuple[str, ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        return f"{self.grid}-{self.label}-s{self.seed}".replace("=", "").replace(".", "p")


def plan(args: argparse.Namespace) -> list[Run]:
    runs: list[Run] = []
    seeds = args.seeds
    for loss in ("sh", "mh", "droptriple", "infonce"):
        # demo.yaml warms up with SH for the first epoch (the paper's schedule for its triplet
        # losses); InfoNCE is its own objective from the first step.
        warmup = ("loss.warmup_epochs=0",) if loss == "infonce" else ()
        for seed in seeds:
            runs.append(Run("main", loss, seed, (f"loss.name={loss}", *warmup)))
    for loss in ("mh", "droptriple"):
        for seed in seeds[: args.tuned_seeds]:
            runs.append(Run("tuned", loss, seed, (f"loss.name={loss}", "model.finetune_lm=true")))
    for theta in args.thresholds:
        runs.append(Run("threshold", f"theta{theta}", seeds[0], (
            "loss.name=droptriple", f"loss.threshold_motion={theta}", f"loss.threshold_text={theta}")))
    for world in args.worlds:
        for loss in ("mh", "droptriple"):
            runs.append(Run("global", f"{loss}-G{world * args.batch}", seeds[0], (
                f"loss.name={loss}", f"train.batch_size={world * args.batch}")))
    for world in args.worlds:
        if world == 1:
            continue
        for loss in ("mh", "droptriple"):
            runs.append(Run("steps", f"{loss}-G{world * args.batch}", seeds[0], (
                f"loss.name={loss}", f"train.batch_size={world * args.batch}",
                f"train.epochs={world * args.epochs}", f"loss.warmup_epochs={world}")))
    for loss in args.long_losses:
        warmup = ("loss.warmup_epochs=0",) if loss == "infonce" else ()
        runs.append(Run("long", f"{loss}-x{args.long_factor}", seeds[0], (
            f"loss.name={loss}", f"train.epochs={args.long_factor * args.epochs}", *warmup)))
    # longest first, so the last job is a short one and both slots finish together
    return sorted(runs, key=lambda r: -_cost(r, args))


def _cost(run: Run, args: argparse.Namespace) -> float:
    """Samples seen, relative to a main-grid run (the step time grows with the batch)."""
    epochs = next((float(o.split("=")[1]) for o in run.overrides if o.startswith("train.epochs=")), args.epochs)
    return epochs / args.epochs * (2.0 if "model.finetune_lm=true" in run.overrides else 1.0)


def execute(run: Run, args: argparse.Namespace, threads: int) -> dict:
    run_dir = Path(args.out) / run.name
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    train = [sys.executable, "-m", "rehamot.train", str(REPO / "configs/demo.yaml"),
             f"data.shards={args.shards}", f"run.dir={run_dir}", f"seed={run.seed}",
             f"train.epochs={args.epochs}", *run.overrides, *args.override]
    started = time.perf_counter()
    log = run_dir.with_suffix(".log")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        subprocess.run(train, env=env, stdout=out, stderr=subprocess.STDOUT, check=True, cwd=REPO)
        subprocess.run([sys.executable, "-m", "rehamot.evaluate", str(run_dir), "--split", "test",
                        "--protocol", ",".join(PROTOCOLS), "--no-figures"],
                       env=env, stdout=out, stderr=subprocess.STDOUT, check=True, cwd=REPO)
    seconds = time.perf_counter() - started
    evaluation = json.loads((run_dir / "eval-test.json").read_text())
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last_step = max((r.get("step", 0) for r in steps), default=0)
    dropped = [r["drop_rate"] for r in steps if r.get("loss_name") in ("droptriple",) and "drop_rate" in r]
    return {"name": run.name, "grid": run.grid, "label": run.label, "seed": run.seed,
            "overrides": list(run.overrides) + list(args.override), "seconds": round(seconds, 1),
            "steps": last_step, "best_step": evaluation.get("step"),
            "drop_rate_mean": statistics.fmean(dropped) if dropped else None,
            "protocols": {p: evaluation["protocols"][p] for p in PROTOCOLS if p in evaluation["protocols"]}}


def load_results(out: Path) -> dict[str, dict]:
    path = out / "results.jsonl"
    if not path.exists():
        return {}
    return {r["name"]: r for r in map(json.loads, path.read_text().splitlines()) if r}


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}"


def report(results: dict[str, dict]) -> str:
    """One markdown table per grid: mean ± sample std over seeds, per protocol."""
    lines = []
    grids: dict[str, dict[str, list[dict]]] = {}
    for r in results.values():
        grids.setdefault(r["grid"], {}).setdefault(r["label"], []).append(r)
    for grid, labels in grids.items():
        for protocol in PROTOCOLS:
            lines += [f"\n**{grid}**, protocol `{protocol}` (mean ± std over seeds; R@K in %)\n",
                      "| run | seeds | steps | " + " | ".join(KEYS) + " | rsum |",
                      "|---|---|---|" + "---|" * (len(KEYS) + 1)]
            for label, runs in labels.items():
                rows = [r["protocols"][protocol] for r in runs if protocol in r["protocols"]]
                if not rows:
                    continue
                cells = [spread([row[k] for row in rows]) for k in KEYS]
                rsum = [sum(row[k] for k in KEYS if "R@" in k) for row in rows]
                lines.append(f"| {label} | {len(rows)} | {runs[0]['steps']} | " + " | ".join(cells)
                             + f" | {spread(rsum)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, default=REPO / "data" / "demo", help="default: data/demo")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "losses", help="default: runs/losses")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--tuned-seeds", type=int, default=1, help="how many of --seeds the tuned grid uses")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=64, help="B per rank of the global-batch sweep")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--long-factor", type=int, default=3, help="epochs multiplier of the long grid")
    parser.add_argument("--long-losses", nargs="+", default=["sh", "mh", "droptriple"])
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once (threads = 2 // jobs, at least 1)")
    parser.add_argument("--grids", nargs="+", default=["main", "tuned", "threshold", "global", "steps", "long"])
    parser.add_argument("--override", action="append", default=[], help="extra key=value for every run")
    parser.add_argument("--report", action="store_true", help="print the tables of OUT/results.jsonl and exit")
    args = parser.parse_args()
    # absolute: the trainings run in the repository root, this driver wherever it was started
    args.shards, args.out = args.shards.resolve(), args.out.resolve()
    out = args.out
    if args.report:
        print(report(load_results(out)))
        return 0
    if not (Path(args.shards) / "manifest.json").exists():
        parser.error(f"no manifest.json in {args.shards}: python shards/make_shards.py demo --motions 2000 --out {args.shards}")
    done = load_results(out)
    todo = [r for r in plan(args) if r.grid in args.grids and r.name not in done]
    print(f"{len(todo)} runs to do ({len(done)} already in {out / 'results.jsonl'})", flush=True)
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def one(run: Run) -> None:
        try:
            result = execute(run, args, threads)
        except subprocess.CalledProcessError as err:  # keep the others going; a re-launch retries it
            print(f"{run.name} failed ({err}); see {Path(args.out) / run.name}.log", flush=True)
            return
        with (out / "results.jsonl").open("a") as handle:
            handle.write(json.dumps(result) + "\n")
        cap = result["protocols"]["captions"]
        print(f"[{time.perf_counter() - started:7.0f} s] {run.name}: {result['seconds']:.0f} s, "
              f"t2m R@1/5/10 {cap['t2m/R@1']:.1f}/{cap['t2m/R@5']:.1f}/{cap['t2m/R@10']:.1f}", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        for future in [pool.submit(one, run) for run in todo]:
            future.result()
    print(report(load_results(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
