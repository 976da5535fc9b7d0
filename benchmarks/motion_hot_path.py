"""The motion tower's hot path: padding, dropout, attention, compile.

    python shards/make_shards.py demo --motions 2000 --out data/demo   # the default --shards
    .venv/bin/python benchmarks/motion_hot_path.py
    .venv/bin/python benchmarks/motion_hot_path.py --compile  # +7 min

1. Padding: padded frames / real frames of the real training stream (TrainStream, batch 32,
   full motions: data.min_len unset) over a few epochs, per `length_buckets`.
2. Motion-tower training step (forward + backward, paper size, batch 32), variants run
   interleaved step by step in one process on the same stream batches, so that the shared
   machine's drift hits them alike:
   - plain:  nn.TransformerEncoderLayer + F.dropout (the tower before its fast dropout masks,
             commit 402d417);
   - fast:   EncoderLayer + fast_dropout (what it is now);
   - plain+buckets / fast+buckets: the same on length-bucketed batches;
   - fast+chunks: fast on the unbucketed batches, each run as length-sorted row groups
     (model.length_chunks).
   Reported: median process CPU ms per step (steadier than wall time here) and wall ms.
3. Profile of one plain and one fast step: the top ops and which attention op runs.
4. --compile: `nn.Module.compile()` on the fast tower, its compile time (first two shapes:
   dynamo recompiles with dynamic shapes at the second length; a fresh inductor cache unless
   TORCHINDUCTOR_CACHE_DIR is set) and its steady state against eager, interleaved. Wall
   time counts inductor's compile workers; CPU time is this process's only.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from common import DEMO_SHARDS, command_line, plain_input_dropout, plain_layers, require_shards

from rehamot.data.pipeline import DataConfig, TrainStream
from rehamot.models.motion_encoder import MotionEncoder, MotionEncoderConfig


def stream_batches(shards: str, buckets: int, epochs: int, batch_size: int = 32) -> Iterator[dict]:
    stream = TrainStream(DataConfig(shards, batch_size=batch_size, num_workers=0,
                                    length_buckets=buckets), None)
    for epoch in range(epochs):
        yield from stream.loader(epoch)


def padding_table(shards: str, buckets: list[int], epochs: int) -> None:
    print(f"## Padding (train split, batch 32, full motions, {epochs} epochs)\n")
    print("| length_buckets | mean padded length | mean real length | padded / real frames |")
    print("|---:|---:|---:|---:|")
    for n in buckets:
        padded = real = batches = 0
        for batch in stream_batches(shards, n, epochs):
            padded += batch["motion"].shape[0] * batch["motion"].shape[1]
            real += int(batch["lengths"].sum())
            batches += 1
        print(f"| {n} | {padded / batches / 32:.1f} | {real / batches / 32:.1f} | {padded / real:.3f} |")
    print()


def chunk_padding_table(shards: str, chunks: list[int], epochs: int) -> None:
    """Frames the tower runs when each (unbucketed) batch is split into length-sorted groups."""
    lengths = [sorted(b["lengths"].tolist()) for b in stream_batches(shards, 0, epochs)]
    real = sum(map(sum, lengths))
    print(f"## Padding with model.length_chunks (the same unbucketed batches, {epochs} epochs)\n")
    print("| length_chunks | frames run / real frames |")
    print("|---:|---:|")
    for k in chunks:
        run = 0
        for rows in lengths:
            groups = torch.tensor(rows).tensor_split(k)
            run += sum(len(g) * int(g.max()) for g in groups)
        print(f"| {k} | {run / real:.3f} |")
    print()


def plain_copy(model: MotionEncoder) -> MotionEncoder:
    """The same weights on nn.TransformerEncoderLayer's own training path."""
    return plain_layers(copy.deepcopy(model))


def cpu_time() -> float:
    return time.process_time()


def train_step(model: MotionEncoder, batch: dict, plain: bool) -> tuple[float, float]:
    """Forward + backward of the tower on one batch; (CPU seconds, wall seconds)."""
    cpu, wall = cpu_time(), time.perf_counter()
    with plain_input_dropout() if plain else contextlib.nullcontext():
        emb = model(batch["motion"], batch["motion_mask"])
    (emb * batch["target"]).sum().backward()
    model.zero_grad(set_to_none=True)
    return cpu_time() - cpu, time.perf_counter() - wall


def with_targets(batches: list[dict]) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    for batch in batches:
        batch["target"] = F.normalize(torch.randn(batch["motion"].shape[0], 1024, generator=gen), dim=-1)
    return batches


def interleaved(variants: dict[str, tuple[Callable[[dict], tuple[float, float]], list[dict]]],
                warmup: int, steps: int) -> dict[str, dict[str, float]]:
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for i in range(warmup + steps):
        for name, (step, batches) in variants.items():
            result = step(batches[i])
            if i >= warmup:
                times[name].append(result)
    return {name: {"cpu": statistics.median(c for c, _ in t), "wall": statistics.median(w for _, w in t),
                   "frames": statistics.fmean(b["motion"].shape[1] for b in variants[name][1][warmup:warmup + steps])}
            for name, t in times.items()}


def print_steps(title: str, rows: dict[str, dict[str, float]], base: str) -> None:
    print(f"## {title}\n")
    print(f"| variant | mean padded length | CPU ms/step (median) | wall ms/step (median) | CPU time vs {base} |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['frames']:.0f} | {1000 * r['cpu']:.0f} | {1000 * r['wall']:.0f} "
              f"| {r['cpu'] / rows[base]['cpu']:.2f} |")
    print()


def profile_table(model: MotionEncoder, batch: dict, plain: bool, label: str) -> None:
    from torch.profiler import profile

    train_step(model, batch, plain)
    with profile() as prof:
        train_step(model, batch, plain)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
    attention = sorted({e.key for e in events if "attention" in e.key})
    print(f"- {label}: " + ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f} %" for e in top)
          + f"; attention ops: {', '.join(attention) or 'none (matmul + softmax, see EncoderLayer)'}")


def compile_section(model: MotionEncoder, batches: list[dict], warmup: int, steps: int) -> None:
    compiled = copy.deepcopy(model)
    compiled.compile()
    print("## torch.compile (nn.Module.compile() on the fast tower, CPU inductor)\n")
    shapes = []
    for batch in batches[:2]:
        cpu, wall = train_step(compiled, batch, False)
        shapes.append(f"T={batch['motion'].shape[1]}: {wall:.0f} s wall, {cpu:.0f} s CPU")
    print("compile (first two shapes): " + "; ".join(shapes) + "\n")
    rows = interleaved({"eager fast": (lambda b: train_step(model, b, False), batches[2:]),
                        "compiled fast": (lambda b: train_step(compiled, b, False), batches[2:])},
                       warmup, steps)
    print_steps("Compiled against eager (same batches, interleaved)", rows, "eager fast")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--shards", default=str(DEMO_SHARDS), help="shard folder (manifest.json; default: data/demo)")
    parser.add_argument("--buckets", type=int, default=8, help="length_buckets of the bucketed variants")
    parser.add_argument("--padding-buckets", type=int, nargs="+", default=[0, 2, 4, 8, 16])
    parser.add_argument("--padding-epochs", type=int, default=3)
    parser.add_argument("--chunks", type=int, default=4, help="length_chunks of the chunked variant")
    parser.add_argument("--padding-chunks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow)")
    args = parser.parse_args()
    require_shards(args.shards)
    if args.compile and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        # A cold compile: inductor would otherwise reuse kernels from an earlier run.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    torch.set_num_threads(args.threads)
    print(command_line())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n")
    padding_table(args.shards, args.padding_buckets, args.padding_epochs)
    chunk_padding_table(args.shards, args.padding_chunks, args.padding_epochs)

    torch.manual_seed(0)
    fast = MotionEncoder(MotionEncoderConfig()).train()  # the paper's size, dropout 0.1
    plain = plain_copy(fast)
    chunked = copy.deepcopy(fast)
    chunked.cfg.length_chunks = args.chunks
    count = args.warmup + args.steps
    unbucketed = with_targets(list(stream_batches(args.shards, 0, 2))[:count + 2])
    bucketed = with_targets(list(stream_batches(args.shards, args.buckets, 2))[:count])
    rows = interleaved({
        "plain": (lambda b: train_step(plain, b, True), unbucketed),
        "fast": (lambda b: train_step(fast, b, False), unbucketed),
        f"plain + buckets {args.buckets}": (lambda b: train_step(plain, b, True), bucketed),
        f"fast + buckets {args.buckets}": (lambda b: train_step(fast, b, False), bucketed),
        f"fast + chunks {args.chunks}": (lambda b: train_step(chunked, b, False), unbucketed),
    }, args.warmup, args.steps)
    print_steps("Motion tower training step (forward + backward), batch 32, paper size", rows, "plain")

    print("## Profile (one step, unbucketed batch; share of self CPU time)\n")
    profile_table(plain, unbucketed[0], True, "plain")
    profile_table(fast, unbucketed[0], False, "fast")
    print()
    if args.compile:
        compile_section(fast, unbucketed, args.warmup, args.steps)


if __name__ == "__main__":
    main()
