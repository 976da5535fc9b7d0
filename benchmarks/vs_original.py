"""Training step, ours against the original implementation, side by side.

    # once: the demo corpus (HumanML3D-layout source in DIR/source, our shards in DIR);
    # data/demo is the default --corpus (`make demo` builds the same)
    python shards/make_shards.py demo --motions 2000 --out data/demo
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/vs_original.py --original ORIGINAL \\
        --corpus data/demo --repeats 5 [--ours-override data.length_buckets=8 ...]

The original is eanson023/rehamot at its MMAsia state, laid out under --original (its `model/`
and `configs/` folders) with its own virtual environment (--original-python, default
ORIGINAL/.venv/bin/python). It runs in its own process under that interpreter: neither
implementation imports the other. This file's top level imports only the standard library
(and common.py, which does the same), so both interpreters can run it.

What each launch measures, one process, batch 32, full motions (no shorter crops), the
paper's model (motion transformer 256-d, 3 layers, 4 heads, ff 1024, joint space 1024,
dropout 0.1; MiniLM + linear head on the text side), DropTriple with the MMAsia thresholds
0.7/0.9 (per direction), margin 0.2, cosine, Adam(W without decay) at lr 2e-4, the language
model frozen or fine-tuned at 10x the lr:
- original: the loop body of its train.py, `model.train_start(); model.train_emb(**batch)`,
  on batches from its own DataLoader (`get_loader_single`: HumanML3D dataset read from the
  source folder, shuffled, `collate_datastruct_and_text_v2` padding to the batch's longest
  motion), with its config composed by hydra from its configs/ and these overrides only:
  the text model path (the packaged all-MiniLM-L6-v2 replaces DistilBERT, which cannot be
  downloaded here), device cpu, the data folders, loader workers 0, `model.finetune`. Hard
  negative mining is switched on first (`model.hard_negative_mining()`, what train.py does
  after its warm-up epochs), so the loss is DropTriple. `init=False`: the similarity plots it
  draws at each epoch's first step are not timed.
- ours: `rehamot.training.trainer.Trainer.train_step` on batches from our real loader (TrainStream over
  the shards), as benchmarks/train_step.py does, plus any --ours-override (speed options
  such as data.length_buckets=8, model.text_cache=true, model.compile=true).
A step is "fetch the next batch + the training step": both loaders run in the training
process (0 workers), so their work is in the CPU time too. User CPU time is getrusage's
ru_utime of the process (all threads) per step: steadier than wall time on a shared machine
(../shared/docs/baseline.md). Each launch runs --warmup steps, then --steps measured steps;
its figure is the median over its measured steps; the table gives the median over the
--repeats launches (and the min-max of samples/s). Settings and implementations are
interleaved (original, ours, original, ours, ...) so that machine drift hits both alike.
Both inherit this process's environment (same allocator: LD_PRELOAD, if any, applies to
both) and get the same OMP/MKL thread count.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from common import (
    DEMO_SHARDS,
    OURS_PAPER,
    build_original,
    command_line,
    comparison_parser,
    instantiate_original,
    minilm_dir,
    original_python,
    original_splits,
    run_worker,
    worker_env,
)

SETTINGS = ("frozen:2", "tuned:2", "frozen:1", "tuned:1")  # LM:threads, one process each


# -- the workers: one launch, one setting --------------------------------------------------------
def measure(steps: int, warmup: int, step: Callable[[], tuple[int, float]],
            profile: str | None = None) -> list[dict[str, float]]:
    """Run warmup + steps calls of `step` (returns padded and mean real frames); time each.
    With `profile` (a file path), the measured steps also run under torch.profiler and its
    operator table (self CPU time, per step) goes to that file: the profiler's overhead is in
    those steps' times, so a profiled launch is for where time goes, not for samples/s."""
    import contextlib

    rows = []
    profiler: Any = contextlib.nullcontext()
    for i in range(warmup + steps):
        if i == warmup and profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            profiler = torch_profile(activities=[ProfilerActivity.CPU])
            profiler.__enter__()
        wall, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        padded, real = step()
        after = resource.getrusage(resource.RUSAGE_SELF)
        if i >= warmup:
            rows.append({"wall": time.perf_counter() - wall, "user": after.ru_utime - usage.ru_utime,
                         "sys": after.ru_stime - usage.ru_stime, "padded": padded, "real": real})
    if profile:
        profiler.__exit__(None, None, None)
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60)
        Path(profile).write_text(f"{steps} measured steps (totals over them)\n{table}")
    return rows


def original_worker(args: argparse.Namespace) -> dict[str, Any]:
    cfg = build_original(args, progress_bar=False)
    import torch
    import transformers
    from model.data.utils import get_loader_single

    opt = cfg.machine
    loader = get_loader_single(cfg.data.dataname, "train", args.batch_size, opt.num_workers, shuffle=True,
                               drop_last=False, data_cfg=cfg.data)
    model = instantiate_original(cfg, loader.dataset.nfeats)
    model.hard_negative_mining()  # train.py does this after its SH warm-up epochs: DropTriple from here
    batches = iter(loader)

    def step() -> tuple[int, float]:
        batch = next(batches)  # an epoch holds far more batches than a launch uses
        model.train_start()  # train.py's loop body
        model.train_emb(**batch, val_step=opt.val_step, init=False)
        return batch["motion"].shape[1], sum(batch["length"]) / len(batch["length"])

    rows = measure(args.steps, args.warmup, step, args.profile_file)
    return {"rows": rows, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "text_trainable": sum(p.numel() for p in model.textencoder.parameters() if p.requires_grad)}


def ours_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    from rehamot.config import load_config
    from rehamot.data.schema import load_manifest
    from rehamot.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [*OURS_PAPER, f"data.shards={args.shards}", f"run.dir={run_dir}",
                     f"train.batch_size={args.batch_size}", f"data.num_workers={args.loader_workers}",
                     f"model.finetune_lm={args.lm == 'tuned'}", "train.log_every=1000000", *args.ours_override]
        cfg = load_config(None, overrides)
        trainer = Trainer(cfg, load_manifest(cfg.data.shards))
        trainer.skipped_steps = 0  # set by Trainer.run(), which this loop stands in for
        state = {"it": iter(trainer.stream.loader(trainer.epoch))}

        def step() -> tuple[int, float]:
            batch = next(state["it"], None)
            if batch is None:  # a new epoch: Trainer.run pays for the loader's start here too
                trainer.epoch += 1
                state["it"] = iter(trainer.stream.loader(trainer.epoch))
                batch = next(state["it"])
            trainer.train_step(batch)
            trainer.step += 1
            return batch["motion"].shape[1], float(batch["motion_mask"].sum(1).float().mean())

        rows = measure(args.steps, args.warmup, step, args.profile_file)
        model = trainer.acc.unwrap_model(trainer.model)
        text_trainable = sum(p.numel() for p in model.text.parameters() if p.requires_grad)
        speed = {f"{section}.{key}": getattr(getattr(cfg, section), key, None)  # None: not in our schema (yet)
                 for section, key in (("data", "length_buckets"), ("model", "text_cache"), ("model", "compile"))}
        return {"rows": rows, "threads": torch.get_num_threads(), "torch": torch.__version__,
                "transformers": transformers.__version__, "text_trainable": text_trainable, "overrides": overrides,
                "speed": speed}


# -- the driver ----------------------------------------------------------------------------------
def launch(impl: str, lm: str, threads: int, args: argparse.Namespace, python: str) -> dict[str, Any]:
    cmd = [python if impl == "original" else sys.executable, str(Path(__file__).resolve()),
           "--worker", impl, "--lm", lm, "--original", str(args.original),
           "--corpus", str(args.corpus), "--source", str(args.source), "--splits", str(args.splits),
           "--shards", str(args.shards), "--text-model", args.text_model, "--batch-size", str(args.batch_size),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--loader-workers", str(args.loader_workers),
           *[f"--ours-override={o}" for o in args.ours_override],
           *(["--profile-file", str(args.profile / f"{impl}-{lm}-{threads}.txt")] if args.profile else [])]
    out, _ = run_worker(cmd, worker_env(threads), f"{impl} {lm}:{threads}")
    rows = out.pop("rows")
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {**out, **med, "samples_per_s": args.batch_size / med["wall"], "steps": len(rows), "all_rows": rows}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("wall", "user", "sys", "padded", "real", "samples_per_s")
    row = {k: statistics.median(r[k] for r in runs) for k in keys}
    row["range"] = (min(r["samples_per_s"] for r in runs), max(r["samples_per_s"] for r in runs))
    return row


def print_table(rows: dict[tuple[str, str, int], dict[str, Any]]) -> None:
    print("| LM | threads | original samples/s (min–max) | ours samples/s (min–max) | samples/s ours/original "
          "| original user CPU ms/step | ours user CPU ms/step | user CPU ours/original "
          "| original / ours step ms | padded frames original / ours (real) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for lm, threads in sorted({(k[1], k[2]) for k in rows}, key=lambda s: (-s[1], s[0] == "tuned")):
        o, u = rows[("original", lm, threads)], rows[("ours", lm, threads)]
        print(f"| {'fine-tuned (10x lr)' if lm == 'tuned' else 'frozen'} | {threads} "
              f"| {o['samples_per_s']:.1f} ({o['range'][0]:.1f}–{o['range'][1]:.1f}) "
              f"| {u['samples_per_s']:.1f} ({u['range'][0]:.1f}–{u['range'][1]:.1f}) "
              f"| **{u['samples_per_s'] / o['samples_per_s']:.2f}×** "
              f"| {1000 * o['user']:.0f} | {1000 * u['user']:.0f} | {u['user'] / o['user']:.2f} "
              f"| {1000 * o['wall']:.0f} / {1000 * u['wall']:.0f} "
              f"| {o['padded']:.0f} ({o['real']:.0f}) / {u['padded']:.0f} ({u['real']:.0f}) |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = comparison_parser(__doc__, hidden=("--profile-file",))
    parser.add_argument("--corpus", type=Path, default=DEMO_SHARDS,
                        help="a `make_shards.py demo` output: shards + manifest.json, source/ in the HumanML3D layout "
                             "(default: data/demo)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS),
                        help=f"LM:THREADS, LM frozen|tuned (default {' '.join(SETTINGS)})")
    parser.add_argument("--repeats", type=int, default=3, help="launches per setting and implementation, interleaved")
    parser.add_argument("--warmup", type=int, default=2, help="steps before measuring, per launch")
    parser.add_argument("--steps", type=int, default=6, help="measured steps per launch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--loader-workers", type=int, default=0,
                        help="loader processes, both implementations (default 0: the loader runs in the "
                             "training process and is timed and counted in its CPU time)")
    parser.add_argument("--profile", type=Path, help="write each setting's torch.profiler operator table (last "
                        "launch) to PROFILE/IMPL-LM-THREADS.txt; profiled launches run slower, so their "
                        "samples/s are not the comparison")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.worker:
        out = (original_worker if args.worker == "original" else ours_worker)(args)
        Path(args.result).write_text(json.dumps(out))
        return
    python = original_python(args.original.resolve(), args.original_python)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    args.shards, args.source = args.corpus.resolve(), args.corpus.resolve() / "source"
    if not (args.shards / "manifest.json").is_file() or not (args.source / "train.txt").is_file():
        raise SystemExit(f"--corpus {args.corpus}: expected manifest.json and source/; build it with\n"
                         f"  python shards/make_shards.py demo --motions 2000 --out {args.corpus}")
    args.splits, args.text_model = original_splits(args.source), minilm_dir()
    settings = [(lm, int(threads)) for lm, threads in (s.split(":") for s in args.settings)]
    print(command_line())
    load_before = os.getloadavg()[0]
    runs: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for repeat in range(args.repeats):
        for lm, threads in settings:
            for impl in ("original", "ours"):  # interleaved: drift hits both alike
                r = launch(impl, lm, threads, args, python)
                runs.setdefault((impl, lm, threads), []).append(r)
                print(f"  repeat {repeat + 1}/{args.repeats} {impl:8} {lm}:{threads}: {r['samples_per_s']:.1f} "
                      f"samples/s, user CPU {1000 * r['user']:.0f} ms/step", file=sys.stderr, flush=True)
    rows = {k: summarize(v) for k, v in runs.items()}
    first_o = next(v[0] for k, v in runs.items() if k[0] == "original")
    first_u = next(v[0] for k, v in runs.items() if k[0] == "ours")
    print(f"batch {args.batch_size}, 1 process, {args.steps} measured steps after {args.warmup} per launch, "
          f"medians of {args.repeats} launches; loader workers {args.loader_workers}; allocator: "
          f"{os.environ.get('LD_PRELOAD') or 'glibc malloc'}; original torch {first_o['torch']}, transformers "
          f"{first_o['transformers']}; ours torch {first_u['torch']}, transformers {first_u['transformers']}; "
          f"ours overrides beyond the paper size: {args.ours_override or 'none'}; ours speed options in effect: "
          f"{', '.join(f'{k}={v}' for k, v in first_u.get('speed', {}).items())}; "
          f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n")
    print_table(rows)
    if args.json:
        flat = {f"{impl}:{lm}:{threads}": v for (impl, lm, threads), v in runs.items()}
        args.json.write_text(json.dumps({"command": sys.argv, "runs": flat}, indent=1))


if __name__ == "__main__":
    main()
