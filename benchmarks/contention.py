"""Training throughput on shared cores: idle vs busy neighbours, thread counts side by side.

    python benchmarks/contention.py --shards data/demo [--steps 30] [--busy 0 1 2] [--threads 2 0]

For each number of busy neighbours (`python3 -c "while True: pass"` processes on the same
cores) and each `train.threads` (0 = auto: usable cores minus loader workers; 2 = torch's
default on a 2-core machine, the behaviour before auto), one demo training run of --steps
steps; the result is the samples/s of its last logged window (warm-up included, as a user
sees it). OMP_NUM_THREADS is removed from the runs' environment so that auto decides.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def one_run(shards: str, steps: int, threads: int, busy: int) -> float:
    neighbours = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
            subprocess.run([sys.executable, "rehamot/train.py", "configs/demo.yaml", f"data.shards={shards}",
                            f"run.dir={tmp}/run", f"train.max_steps={steps}", "train.log_every=10",
                            "train.val_every=100000", "train.save_every=100000", f"train.threads={threads}"],
                           cwd=REPO, env=env, check=True, capture_output=True, text=True)
            records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
            return [r for r in records if "samples_per_s" in r][-1]["samples_per_s"]
    finally:
        for process in neighbours:
            process.kill()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="data/demo")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 0])
    args = parser.parse_args()
    print("| busy neighbours | " + " | ".join(f"train.threads={t} samples/s" for t in args.threads) + " |")
    print("|---:|" + "---:|" * len(args.threads))
    for busy in args.busy:
        rates = [one_run(args.shards, args.steps, threads, busy) for threads in args.threads]
        print(f"| {busy} | " + " | ".join(f"{rate:.0f}" for rate in rates) + " |", flush=True)


if __name__ == "__main__":
    main()
