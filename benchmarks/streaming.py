"""Streaming throughput: samples/s from tar shards to collated, tokenised training batches.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/streaming.py [--shards DIR] [--workers 0 1 2]

Without --shards it writes a synthetic HumanML3D-shaped shard set (263 features, 40-200
frames at 20 fps, the demo corpus's range; 1-4 captions per motion; common.py's
write_synthetic_shards) to a temporary folder.
Prints a markdown table: per worker count, the time to the first batch, the steady rate
(after the first batch), samples/s per worker, and the time to the first batch when resuming
at mid-epoch (which reads and decodes, but does not crop or tokenise, the skipped half).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import minilm_tokenizer, write_synthetic_shards

from rehamot.data.pipeline import DataConfig, TrainStream


def measure(cfg: DataConfig, tokenizer, epoch: int) -> dict[str, float]:
    stream = TrainStream(cfg, tokenizer, 0, 1)
    start = time.perf_counter()
    first = None
    count = 0
    for batch in stream.loader(epoch):
        if first is None:
            first = time.perf_counter()
        count += len(batch["ids"])
    end = time.perf_counter()
    resume_start = time.perf_counter()
    next(iter(stream.loader(epoch, start_step=stream.steps_per_epoch // 2)))
    resume = time.perf_counter() - resume_start
    steady = (count - cfg.batch_size) / (end - first)
    return {"samples": count, "first_s": first - start, "steady": steady,
            "per_worker": steady / max(cfg.num_workers, 1), "resume_s": resume}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", help="an existing shard directory (default: synthetic)")
    parser.add_argument("--motions", type=int, default=2048)
    parser.add_argument("--shard-count", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-text-len", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = minilm_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            per = args.motions // args.shard_count
            sizes = [per + (i < args.motions % args.shard_count) for i in range(args.shard_count)]
            written = time.perf_counter()
            write_synthetic_shards(Path(tmp), {"train": sizes}, feature_dim=263, frames=(40, 200))
            print(f"wrote {args.motions} synthetic motions in {args.shard_count} shards "
                  f"({time.perf_counter() - written:.1f} s)\n")
            shards = tmp
        print("| workers | samples | first batch (s) | samples/s | samples/s per worker "
              "| resume to mid-epoch (s) |")
        print("|---:|---:|---:|---:|---:|---:|")
        for epoch, workers in enumerate(args.workers):
            cfg = DataConfig(shards, batch_size=args.batch_size, num_workers=workers,
                             max_text_len=args.max_text_len)
            r = measure(cfg, tokenizer, epoch)
            print(f"| {workers} | {r['samples']} | {r['first_s']:.2f} | {r['steady']:.0f} "
                  f"| {r['per_worker']:.0f} | {r['resume_s']:.2f} |")


if __name__ == "__main__":
    main()
