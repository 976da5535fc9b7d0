"""Pinned batches on one GPU: a training batch's host-to-device copy from pinned vs pageable memory,
and the loader delivering pinned batches.

    # a GPU (benchmarks/gpu_device.sh runs it there):
    python benchmarks/pinned_batches.py --shards DIR --tokenizer DIR --batch-size 256
    # no GPU: checks the script (the copy part is skipped, the loader runs pageable only)
    .venv/bin/python benchmarks/pinned_batches.py --shards data/demo --batch-size 8 --batches 4 --rounds 1

Copy: a batch as the loader delivers it (motion B x max_len x F float32 and the small arrays of
the real stream's first batch), moved with the trainer's own `to_device` (non_blocking copies),
--copies times per arm. Per batch: the time the call holds the CPU (what the training loop waits
before it can queue the forward) and the time until the copy is done on the device, and the
motion's GB/s. From pageable memory CUDA stages the bytes through a pinned buffer of its own and
returns when they are copied; from pinned memory the call returns at once and the copy overlaps
whatever the CPU does next.

Loader: samples/s of the training stream (one rank, tokenised) with its batches pinned (what
training does when CUDA is there) and pageable (`pin_batches` forced off), alternating rounds;
the first batch of each measurement is left out. Pinning moves no extra byte: the copy out of the
ring (batch_ring.BatchRing.take) lands in pinned memory instead of pageable memory.

Multi-rank NCCL (the gather's reduce-scatter backward) cannot be measured on one GPU.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from common import command_line, minilm_tokenizer, pinned_batches, require_shards


def stream_of(args: argparse.Namespace, tokenizer: Any) -> Any:
    from rehamot.data.pipeline import DataConfig, TrainStream

    cfg = DataConfig(args.shards, batch_size=args.batch_size, num_workers=args.workers, max_text_len=64)
    return TrainStream(cfg, tokenizer, 0, 1)


def loader_rate(stream: Any, batches: int, epoch: int) -> tuple[float, bool]:
    """Samples/s over `batches` batches after the first (fewer when the epoch is shorter), and
    whether the batches came pinned."""
    count, first, was_pinned = 0, None, False
    for n, batch in enumerate(stream.loader(epoch)):
        if first is None:
            first, was_pinned = time.perf_counter(), batch["motion"].is_pinned()
            continue
        count += len(batch["ids"])
        if n >= batches:
            break
    return count / (time.perf_counter() - first), was_pinned


def copy_times(batch: dict[str, Any], copies: int) -> tuple[float, float]:
    """Median (CPU held, copy done) seconds of `to_device(batch, cuda)`."""
    import torch

    from rehamot.training.trainer import to_device

    device = torch.device("cuda")
    held, done = [], []
    for _ in range(copies):
        torch.cuda.synchronize()
        start = time.perf_counter()
        moved = to_device(batch, device)
        returned = time.perf_counter()
        torch.cuda.synchronize()
        held.append(returned - start)
        done.append(time.perf_counter() - start)
        del moved
    return statistics.median(held), statistics.median(done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--shards", required=True, help="shard folder (manifest.json)")
    parser.add_argument("--tokenizer", default="minilm", help="a tokenizer folder (default: the packaged MiniLM's)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="loader workers")
    parser.add_argument("--batches", type=int, default=40, help="batches per loader measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating loader rounds per arm")
    parser.add_argument("--copies", type=int, default=50, help="host-to-device copies per arm")
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer

    require_shards(args.shards)
    print(command_line())
    cuda = torch.cuda.is_available()
    tokenizer = minilm_tokenizer() if args.tokenizer == "minilm" else AutoTokenizer.from_pretrained(args.tokenizer)
    stream = stream_of(args, tokenizer)
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu (no CUDA: the copy part is skipped)'}, "
          f"batch {args.batch_size}, max_len {stream.cfg.max_len}, {stream.feature_dim} features, "
          f"{args.workers} loader workers\n")

    if cuda:
        with pinned_batches(False):
            batch = next(iter(stream.loader(0)))
        # the longest batch the ring holds: every batch's motion is at most this large
        batch["motion"] = torch.randn(args.batch_size, stream.cfg.max_len, stream.feature_dim)
        gb = batch["motion"].numel() * 4 / 1e9
        print("| host memory | CPU held per batch (ms) | copy done (ms) | motion GB/s |")
        print("|---|---:|---:|---:|")
        for name, host in (("pageable", batch), ("pinned", {k: v.pin_memory() if isinstance(v, torch.Tensor) else v
                                                             for k, v in batch.items()})):
            held, done = copy_times(host, args.copies)
            print(f"| {name} | {1000 * held:.2f} | {1000 * done:.2f} | {gb / done:.1f} |")
        print()

    arms = (True, False) if cuda else (False,)
    rates: dict[bool, list[float]] = {arm: [] for arm in arms}
    for epoch in range(args.rounds):
        for arm in arms:
            with pinned_batches(arm):
                rate, was_pinned = loader_rate(stream, args.batches, epoch)
            if was_pinned != arm:
                raise SystemExit(f"batches came {'pinned' if was_pinned else 'pageable'}, expected otherwise")
            rates[arm].append(rate)
    print("| loader batches | samples/s (each round) | median |")
    print("|---|---|---:|")
    for arm in arms:
        print(f"| {'pinned' if arm else 'pageable'} | {' / '.join(f'{r:,.0f}' for r in rates[arm])} "
              f"| {statistics.median(rates[arm]):,.0f} |")


if __name__ == "__main__":
    main()
