"""Training-step throughput: samples/s and where a step's time goes, at the paper's model size.

    # CPU: build the shards once (data/demo, the default --shards; `make demo` builds the same),
    # then the comparison (1 thread per process, 1 and 2 processes) and the baseline-comparable
    # runs (1 process, 2 threads), interleaved:
    python shards/make_shards.py demo --motions 2000 --out data/demo
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_step.py
    # GPU (a lent machine), one command:
    HF_HUB_OFFLINE=1 python benchmarks/train_step.py --device cuda --precision bf16 --shards data/demo
    # A/B of the motion hot path: a setting's 4th field holds extras, comma-separated: config
    # overrides, `plain-dropout` (the tower's layers as nn.TransformerEncoderLayer with
    # F.dropout, i.e. before the fast dropout masks of commit 402d417), or `pageable` (on a GPU:
    # the batches in pageable memory instead of pinned):
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_step.py --settings frozen:1:1:plain-dropout \
        frozen:1:1 frozen:1:1:data.length_buckets=8

Each measurement is a fresh launch (plain python for one process, torchrun for several) that
builds the real `Trainer` of rehamot/training/trainer.py: accelerate (DDP with gloo or NCCL, autocast),
rehamot.models.factory, TrainStream, GlobalBatchObjective, AdamW + LambdaLR. It then calls the
Trainer's own `train_step` in a loop, so it measures exactly what training does per step;
phases are timed by hooks and wrappers around that code, not by a copy of it:
data wait (next batch), motion forward, text forward (hooks on the two towers), loss (the
objective), backward (accelerator.backward, DDP's all-reduce included), optimizer (step,
scheduler, zero_grad); "other" is the rest of train_step (device copies, the per-step flag
all-reduce). On CUDA every timer boundary synchronises the device first.

The model is the paper's size (the config schema's defaults): motion transformer d_model
256, 3 layers, 4 heads, ff 1024, joint space 1024, dropout 0.1, and the packaged MiniLM with
all 6 layers. Motions are full (data.min_len unset: min(T, max_len=196) frames), as in the
original. samples/s = processes x batch / mean step time (data wait included). CPU ms/step
is rank 0's process CPU time (all its threads) per step, steadier than wall time on a shared
machine (baseline.md). Peak memory is max RSS per process on CPU and
torch.cuda.max_memory_allocated on GPU. FLOPs per sample: torch.utils.flop_counter over
--flop-steps further steps (the matrix products executed, padding included); TFLOP/s = that x
samples/s per process, MFU = TFLOP/s over the device's dense bf16 peak (--peak-tflops). The
table shows medians over the launches.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from common import DEMO_SHARDS, command_line, pinned_batches, plain_input_dropout, plain_layers, require_shards, run_worker

NOT_CONFIG = ("plain-dropout", "pageable")  # extras that are no config override
PHASES = ("data", "motion_fwd", "text_fwd", "loss", "backward", "optimizer", "other")
CPU_SETTINGS = ("frozen:1:1", "tuned:1:1", "frozen:2:1", "tuned:2:1", "frozen:1:2", "tuned:1:2")
GPU_SETTINGS = ("frozen:1:0", "tuned:1:0")


# -- the worker: one launch, one setting -------------------------------------------------------
class PhaseClock:
    """Accumulates wall time per phase; synchronises CUDA at every boundary when asked."""

    def __init__(self, cuda: bool) -> None:
        import torch

        self.sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.totals: dict[str, float] = defaultdict(float)
        self.started: dict[str, float] = {}

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def start(self, phase: str) -> None:
        self.started[phase] = self.now()

    def stop(self, phase: str) -> None:
        self.totals[phase] += self.now() - self.started.pop(phase)

    def timed(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.start(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stop(phase)
        return wrapper

    def hook_module(self, phase: str, module: Any) -> None:
        module.register_forward_pre_hook(lambda *_: self.start(phase))
        module.register_forward_hook(lambda *_: self.stop(phase))

    def take(self) -> dict[str, float]:
        out, self.totals = dict(self.totals), defaultdict(float)
        return out


def instrument(trainer: Any, clock: PhaseClock) -> None:
    """Time the phases of Trainer.train_step without changing what it runs."""
    model = trainer.acc.unwrap_model(trainer.model)
    clock.hook_module("motion_fwd", model.motion)
    clock.hook_module("text_fwd", model.text)
    trainer.objective = clock.timed("loss", trainer.objective)
    trainer.acc.backward = clock.timed("backward", trainer.acc.backward)
    trainer.optimizer.step = clock.timed("optimizer", trainer.optimizer.step)
    trainer.scheduler.step = clock.timed("optimizer", trainer.scheduler.step)
    trainer.optimizer.zero_grad = clock.timed("optimizer", trainer.optimizer.zero_grad)


def worker(args: argparse.Namespace) -> None:
    import torch

    from rehamot.config import load_config
    from rehamot.data.schema import load_manifest
    from rehamot.training.trainer import Trainer

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    with tempfile.TemporaryDirectory() as run_dir, contextlib.ExitStack() as patches:
        overrides = [
            f"data.shards={args.shards}", f"run.dir={run_dir}", f"train.batch_size={args.batch_size}",
            f"data.num_workers={args.workers}", f"model.finetune_lm={args.lm == 'tuned'}",
            "train.log_every=1000000", *args.override,
            *[e for e in args.extra if e not in NOT_CONFIG],
        ]
        cfg = load_config(None, overrides)
        trainer = Trainer(cfg, load_manifest(cfg.data.shards))
        if "plain-dropout" in args.extra:  # the motion tower before commit 402d417, same weights
            plain_layers(trainer.acc.unwrap_model(trainer.model).motion)
            patches.enter_context(plain_input_dropout())
        if "pageable" in args.extra:  # the host copies as before pinned batches
            patches.enter_context(pinned_batches(False))
        trainer.skipped_steps = 0
        clock = PhaseClock(cuda)
        instrument(trainer, clock)
        rows: list[dict[str, float]] = []
        frames, real, tokens = [], [], []
        it = iter(trainer.stream.loader(trainer.epoch))
        while len(rows) < args.warmup + args.steps:
            if len(rows) == args.warmup and cuda:
                torch.cuda.reset_peak_memory_stats()
            start, cpu_start = clock.now(), time.process_time()
            batch, it = next_batch(trainer, it)
            fetched = clock.now()
            trainer.train_step(batch)
            trainer.step += 1
            end = clock.now()
            rows.append({**clock.take(), "data": fetched - start, "step": end - start,
                         "cpu": time.process_time() - cpu_start})
            frames.append(batch["motion"].shape[1])
            real.append(float(batch["motion_mask"].sum(1).float().mean()))
            tokens.append(batch["input_ids"].shape[1] if "input_ids" in batch else 0)  # cached text features: none
        measured = rows[args.warmup:]
        result: dict[str, Any] = {"world": trainer.world, "batch": args.batch_size, "steps": len(measured)}
        result["flops_per_sample"] = counted_flops(trainer, it, args.flop_steps) / args.batch_size
        for phase in ("step", "cpu", *PHASES[:-1]):
            result[phase] = statistics.fmean(r.get(phase, 0.0) for r in measured)
        result["other"] = result["step"] - sum(result[p] for p in PHASES[:-1])
        result["samples_per_s"] = trainer.world * args.batch_size / result["step"]
        result["padded_frames"] = statistics.fmean(frames)
        result["real_frames"] = statistics.fmean(real)
        result["padded_tokens"] = statistics.fmean(tokens)
        result["threads"] = torch.get_num_threads()
        result["peak_mb"] = (torch.cuda.max_memory_allocated() if cuda
                             else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
        result["device"] = torch.cuda.get_device_name() if cuda else "cpu"
        result["precision"] = trainer.acc.mixed_precision
        if trainer.rank == 0:
            Path(args.result).write_text(json.dumps(result))


def next_batch(trainer: Any, it: Any) -> tuple[dict[str, Any], Any]:
    """The next batch and the iterator to go on with: at an epoch's end, the next epoch's
    loader (Trainer.run also pays for its start there)."""
    batch = next(it, None)
    if batch is None:
        trainer.epoch += 1
        it = iter(trainer.stream.loader(trainer.epoch))
        batch = next(it)
    return batch, it


def counted_flops(trainer: Any, it: Any, steps: int) -> float:
    """Mean FLOPs of a training step (forward, loss, backward; the optimizer's elementwise work
    is not counted), over `steps` further batches, as torch.utils.flop_counter counts the
    matrix products it executes: padded frames and tokens included. Counted after the timed
    steps, because counting slows the dispatch."""
    from torch.utils.flop_counter import FlopCounterMode

    if steps < 1:
        return 0.0
    total = 0
    for _ in range(steps):
        batch, it = next_batch(trainer, it)
        with FlopCounterMode(display=False) as counter:
            trainer.train_step(batch)
        total += counter.get_total_flops()
    return total / steps


def peak_tflops(device: str, given: float | None) -> float | None:
    """The chip's dense bf16 peak (vendor figures), for MFU; --peak-tflops overrides."""
    if given:
        return given
    for name, peak in (("H200", 989.4), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.1)):
        if name in device:
            return peak
    return None


# -- the driver: interleaved launches, medians, one table --------------------------------------
def parse_setting(setting: str) -> tuple[str, str, str, list[str]]:
    """LM:PROCESSES:THREADS[:EXTRA,EXTRA...] -> (lm, procs, threads, extras)."""
    lm, procs, threads, *rest = setting.split(":", 3)
    return lm, procs, threads, [e for e in ",".join(rest).split(",") if e]


def launch_command(setting: str, args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    lm, procs, threads, extras = parse_setting(setting)
    inner = [str(Path(__file__).resolve()), "--worker", "--lm", lm,
             "--shards", args.shards, "--batch-size", str(args.batch_size), "--workers", str(args.workers),
             "--warmup", str(args.warmup), "--steps", str(args.steps), "--device", args.device,
             "--flop-steps", str(args.flop_steps),
             *[f"--override={o}" for o in args.override], *[f"--extra={e}" for e in extras]]
    if int(procs) > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *inner]
    else:
        cmd = [sys.executable, *inner]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "ACCELERATE_MIXED_PRECISION": args.precision}
    if int(threads) > 0:
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return cmd, env


def run_setting(setting: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd, env = launch_command(setting, args)
    return run_worker(cmd, env, setting)[0]


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    row = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}
    row["samples_range"] = (min(r["samples_per_s"] for r in runs), max(r["samples_per_s"] for r in runs))
    return {**runs[0], **row}


def print_table(settings: list[str], rows: dict[str, dict[str, Any]], peak: float | None) -> None:
    ms = lambda s: f"{1000 * s:.0f}" if s >= 0.0095 else f"{1000 * s:.1f}"  # noqa: E731
    print("| LM | procs × threads | extras | samples/s (median; min–max) | step ms | CPU ms/step | data ms "
          "| motion fwd ms | text fwd ms | loss ms | backward ms | optimizer ms | other ms | peak MB/proc "
          "| GFLOP/sample | TFLOP/s per process | MFU |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for setting in settings:
        lm, procs, threads, extras = parse_setting(setting)
        r = rows[setting]
        lo, hi = r["samples_range"]
        print(f"| {'fine-tuned' if lm == 'tuned' else 'frozen'} | {procs} × {threads if threads != '0' else r['threads']} "
              f"| {', '.join(extras) or '–'} | {r['samples_per_s']:.1f} ({lo:.1f}–{hi:.1f}) | {ms(r['step'])} | {ms(r['cpu'])} | "
              + " | ".join(ms(r[p]) for p in PHASES) + f" | {r['peak_mb']:.0f} | " + flops_cells(r, peak) + " |")


def flops_cells(row: dict[str, Any], peak: float | None) -> str:
    """GFLOP per sample, achieved TFLOP/s per process and its share of the chip's peak."""
    per_sample = row.get("flops_per_sample") or 0.0
    if not per_sample:
        return "– | – | –"
    achieved = per_sample * row["samples_per_s"] / row["world"] / 1e12
    share = f"{100 * achieved / peak:.1f} %" if peak else "–"
    return f"{per_sample / 1e9:.2f} | {achieved:.2f} | {share}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--shards", default=str(DEMO_SHARDS), help="shard folder (manifest.json; default: data/demo)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no",
                        help="accelerate mixed precision (GPU: bf16; CPU: no, bf16 is ~4x slower here)")
    parser.add_argument("--settings", nargs="+", default=None,
                        help="LM:PROCESSES:THREADS[:EXTRAS], LM frozen|tuned, THREADS 0 = leave the default, "
                             "EXTRAS comma-separated config key=value, plain-dropout or pageable "
                             f"(default CPU {' '.join(CPU_SETTINGS)}; cuda {' '.join(GPU_SETTINGS)})")
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--workers", type=int, default=None, help="loader workers per process (default: cpu 0, cuda 4)")
    parser.add_argument("--warmup", type=int, default=None, help="default: cpu 2, cuda 10")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per launch (default: cpu 6, cuda 50)")
    parser.add_argument("--repeats", type=int, default=3, help="launches per setting, interleaved")
    parser.add_argument("--override", action="append", default=[], help="extra config key=value (repeatable)")
    parser.add_argument("--json", help="also write every launch's figures here")
    parser.add_argument("--flop-steps", type=int, default=2,
                        help="steps counted with torch.utils.flop_counter after the timed ones (0: none)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s for MFU (default: known GPUs' dense bf16)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--lm", choices=("frozen", "tuned"), default="frozen", help=argparse.SUPPRESS)
    parser.add_argument("--extra", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    if args.workers is None:
        args.workers = 4 if gpu else 0  # CPU: no loader process competing for the cores
    if args.warmup is None:
        args.warmup = 10 if gpu else 2
    if args.steps is None:
        args.steps = 50 if gpu else 6
    if args.worker:
        worker(args)
        return
    from rehamot.data.schema import load_manifest

    require_shards(args.shards)  # fail early, with the command that builds the shards
    load_manifest(args.shards)
    settings = args.settings or list(GPU_SETTINGS if args.device == "cuda" else CPU_SETTINGS)
    print(command_line())
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for repeat in range(args.repeats):
        for setting in settings:  # interleaved: machine drift hits every setting alike
            r = run_setting(setting, args)
            runs[setting].append(r)
            print(f"  repeat {repeat + 1}/{args.repeats} {setting}: {r['samples_per_s']:.1f} samples/s "
                  f"(step {1000 * r['step']:.0f} ms)", file=sys.stderr, flush=True)
    rows = {s: median_row(runs[s]) for s in settings}
    first = rows[settings[0]]
    print(f"device {first['device']}, precision {first['precision']}, batch {args.batch_size} per process, "
          f"{args.steps} measured steps after {args.warmup} warm-up, medians of {args.repeats} launches; "
          f"mean padded length {first['padded_frames']:.0f} frames (real {first['real_frames']:.0f}), "
          f"captions padded to {first['padded_tokens']:.0f} tokens; "
          f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n")
    peak = peak_tflops(first["device"], args.peak_tflops)
    if peak:
        print(f"MFU against {peak:.1f} TFLOP/s dense bf16 per device\n")
    print_table(settings, rows, peak)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": sys.argv, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
