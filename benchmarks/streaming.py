"""Streaming throughput: samples/s from tar shards to collated training batches, per loader worker.

    .venv/bin/python benchmarks/streaming.py --shards data/demo --baseline 26891ea

Each measurement is a fresh process (this script with --measure) that builds the training
stream of one rank and reads whole epochs: the time to the first batch, the steady rate after
it (median over --epochs epochs), samples/s per loader worker, samples per second of CPU the
workers used (whole epochs: what a worker delivers when it has a core to itself, whatever else
shares the machine), and the time to the first batch when resuming at mid-epoch. Batches are
tokenised with the packaged MiniLM tokenizer (the fine-tuned-LM path); `--text cached` measures
the frozen-LM path, whose batches carry no tokens (the trainer looks the captions up in the
text cache).

`--baseline REV` measures a git revision of this repository side by side, in alternating
rounds: its tree is extracted to a temporary folder (git archive) and put first on PYTHONPATH,
so `import rehamot` is that revision's. Without --shards each arm reads a synthetic
HumanML3D-shaped shard set (263 features, 40-200 frames, 1-4 captions) written by its own
revision's writer (its benchmarks/common.py write_synthetic_shards, same seed: the same samples
in each revision's shard format); --shards is read by every arm, so it suits only revisions of
one shard format. `--serve` reads the synthetic sets over http:// from Debian's nginx on
127.0.0.1 (Range requests, as from object storage) instead of the folder.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, command_line, minilm_tokenizer, nginx_serving, require_shards, run_worker, worker_env


def measure(shards: str, workers: int, batch_size: int, epochs: int, tokenizer: str | None) -> dict[str, Any]:
    """One arm, in this process: the rehamot on sys.path is the one measured. `tokenizer`: a
    tokenizer folder, "minilm" for the packaged one, None for untokenised batches."""
    from transformers import AutoTokenizer

    from rehamot.data.pipeline import DataConfig, TrainStream

    cfg = DataConfig(shards, batch_size=batch_size, num_workers=workers, max_text_len=64)
    tok = None if tokenizer is None else minilm_tokenizer() if tokenizer == "minilm" \
        else AutoTokenizer.from_pretrained(tokenizer)
    stream = TrainStream(cfg, tok, 0, 1)
    rates, firsts = [], []
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the loader workers, once joined
    for epoch in range(epochs):
        start = time.perf_counter()
        first, count = None, 0
        for batch in stream.loader(epoch):
            if first is None:
                first = time.perf_counter()
            count += len(batch["ids"])
        rates.append((count - batch_size) / (time.perf_counter() - first))
        firsts.append(first - start)
    done = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker_cpu = done.ru_utime + done.ru_stime - children.ru_utime - children.ru_stime
    start = time.perf_counter()
    next(iter(stream.loader(epochs, start_step=stream.steps_per_epoch // 2)))
    resume = time.perf_counter() - start
    steady = statistics.median(rates)
    # what one worker delivers per second of CPU it gets (whole epochs, first batches included)
    per_cpu = count * epochs / worker_cpu if workers and worker_cpu else None
    return {"samples": count, "steady": steady, "per_worker": steady / max(workers, 1),
            "per_worker_cpu_s": per_cpu, "first_s": statistics.median(firsts), "resume_s": resume}


WRITE_SHARDS = """import sys
sys.path.insert(0, sys.argv[1] + "/benchmarks")
from pathlib import Path
from common import write_synthetic_shards
write_synthetic_shards(Path(sys.argv[2]), {"train": [int(n) for n in sys.argv[3:]]}, feature_dim=263, frames=(40, 200))
"""


def write_arm_shards(root: str, out: Path, sizes: list[int]) -> str:
    """The synthetic shard set written by the revision at `root` (its own writer and format)."""
    out.mkdir()
    subprocess.run([sys.executable, "-c", WRITE_SHARDS, root, str(out), *map(str, sizes)],
                   env={**worker_env(1), "PYTHONPATH": root}, cwd=root, check=True)
    return str(out)


def extract(revision: str, into: Path) -> Path:
    """The tree of `revision` of this repository, as files under `into`."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--shards", help="an existing shard directory (default: synthetic)")
    parser.add_argument("--baseline", help="a git revision to measure side by side")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of every arm")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per measurement (median rate)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--text", choices=("tokenised", "cached"), default="tokenised")
    parser.add_argument("--tokenizer", default="minilm",
                        help="a tokenizer folder (default: the packaged MiniLM's)")
    parser.add_argument("--motions", type=int, default=2048, help="synthetic shard set size")
    parser.add_argument("--shard-count", type=int, default=8, help="synthetic shard count")
    parser.add_argument("--serve", action="store_true",
                        help="read the synthetic shards from a local nginx over http:// instead of the folder")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.measure:
        result = measure(args.shards, args.workers[0], args.batch_size, args.epochs,
                         args.tokenizer if args.text == "tokenised" else None)
        Path(args.result).write_text(json.dumps(result))
        return

    print(command_line())
    if args.serve and args.shards:
        parser.error("--serve serves the synthetic shards: leave out --shards")
    with tempfile.TemporaryDirectory() as tmp, \
            (nginx_serving(Path(tmp)) if args.serve else contextlib.nullcontext()) as served:
        arms = {"ours": str(REPO)}
        if args.baseline:
            baseline = Path(tmp, "baseline")
            baseline.mkdir()
            arms = {f"baseline {args.baseline}": str(extract(args.baseline, baseline)), **arms}
        if args.shards is None:
            per = args.motions // args.shard_count
            sizes = [per + (i < args.motions % args.shard_count) for i in range(args.shard_count)]
            arm_shards = {arm: write_arm_shards(root, Path(tmp, f"shards-{n}"), sizes)
                          for n, (arm, root) in enumerate(arms.items())}
            shards = "synthetic (each arm's own writer)"
            if served:
                arm_shards = {arm: f"{served}/{Path(folder).name}" for arm, folder in arm_shards.items()}
                shards += f", served by nginx at {served}"
            print(f"synthetic shards: {args.motions} motions in {args.shard_count} shards")
        else:
            require_shards(args.shards)
            shards, arm_shards = args.shards, dict.fromkeys(arms, args.shards)
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        load = [os.getloadavg()[0]]
        for _ in range(args.rounds):
            for workers in args.workers:
                for arm, root in arms.items():
                    env = {**worker_env(1), "PYTHONPATH": root}
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", "--shards", arm_shards[arm],
                           "--workers", str(workers), "--batch-size", str(args.batch_size),
                           "--epochs", str(args.epochs), "--text", args.text, "--tokenizer", args.tokenizer]
                    result, _ = run_worker(cmd, env, f"{arm}, {workers} workers")
                    runs.setdefault((arm, workers), []).append(result)
            load.append(os.getloadavg()[0])
        print(f"shards {shards}, batch {args.batch_size}, text {args.text}, {args.rounds} rounds x "
              f"{args.epochs} epochs, load average {min(load):.1f}-{max(load):.1f}\n")
        print("| loader workers | arm | samples/s per worker (each round) | median | samples per "
              "worker CPU-second | first batch (s) | resume to mid-epoch (s) |")
        print("|---:|---|---|---:|---:|---:|---:|")
        for workers in args.workers:
            for arm in arms:
                rs = runs[arm, workers]
                per = [r["per_worker"] for r in rs]
                cpu = [r["per_worker_cpu_s"] for r in rs if r["per_worker_cpu_s"]]
                print(f"| {workers} | {arm} | {' / '.join(f'{p:,.0f}' for p in per)} "
                      f"| {statistics.median(per):,.0f} | {f'{statistics.median(cpu):,.0f}' if cpu else '–'} "
                      f"| {statistics.median(r['first_s'] for r in rs):.3f} "
                      f"| {statistics.median(r['resume_s'] for r in rs):.2f} |")
        if args.baseline:
            print()
            for workers in args.workers:
                ours = statistics.median(r["per_worker"] for r in runs["ours", workers])
                base = statistics.median(r["per_worker"] for r in runs[f"baseline {args.baseline}", workers])
                print(f"{workers} workers: ours / baseline = {ours / base:.2f}x")


if __name__ == "__main__":
    main()
