"""Start-up: launch -> first training batch, ours against the original, over corpus sizes.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/startup.py --original ORIGINAL \\
        --sizes 10000 50000 100000 --original-sizes 10000 25000 50000

Corpora are demo corpora (`make_shards.py demo`, seed 0) under --data-root (default
data/bench in the repository), one folder per size (demo-SIZE), built when missing, largest
first: ours needs the shards of --sizes, the original the HumanML3D-layout source of
--original-sizes (~173 KB per motion, new_joints/ included; shards ~140 KB per motion). A
source folder is deleted once its size is measured, unless --keep-sources (a rerun rebuilds
it, byte-identical, with the same seed); shards are kept. Disk with the defaults: ~31 GB at
the peak (the 100k build, before its source goes), ~23 GB of shards kept.

- ours: `rehamot.train.main()` with the paper-size overrides (OURS_PAPER in common.py, as in
  vs_original.py), run by a thin wrapper (this file with --worker ours) that notes the time when
  `import rehamot.train` and `import rehamot.training.trainer` (the training stack, which main()
  would import after its config checks) are done and when `Trainer.__init__` returns, and
  replaces `Trainer.train_step` with one that notes the time the first batch reaches it, runs
  that step, notes the time again and ends the process. Nothing else differs from
  `python -m rehamot.train key=value ...` (the default config, then the overrides).
- original: the start of its train.py (imports of torch, hydra, omegaconf, numpy and its own
  modules; the config composed by hydra; seeding; `get_loaders`, which reads every train and
  val file into RAM; the first batch of its train loader), then its model built as train.py
  builds it and one training step on that batch. train.py also runs a full validation pass
  before its first training batch and imports tensorboardX and evaluation.py, which this
  harness leaves out: the original's figures here are lower bounds on its real start-up.
Times are wall clock from the parent's launch (just before the process is created) to the
moment the worker notes. Both implementations use --loader-workers loader processes (default
1) and --threads threads. Page cache: nothing is dropped; each (implementation, size) is
launched --runs times back to back and the first launch only warms the cache (the figure is
the median of the others). A corpus just written is in the page cache anyway, so both read
warm files. Ours with a frozen LM builds its text-feature cache (model.text_cache, beside the
shards) at its first launch on a corpus: that one-time cost, which grows with the number of
captions, shows in the column of first launches; model.text_cache=false (--ours-override)
measures ours without it. Where the original was not run at a size of --sizes (too much RAM,
or not asked), its start-up there is a least-squares line through its measured sizes ("fit").
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    OURS_PAPER,
    REPO,
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


def note(path: Path, **times: float) -> None:
    """Write the worker's timestamps (time.time(), comparable with the parent's launch time)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    path.write_text(json.dumps({**times, "max_rss_mb": usage.ru_maxrss / 1024}))


# -- the workers ---------------------------------------------------------------------------------
def ours_worker(args: argparse.Namespace) -> None:
    started = time.time()
    import rehamot.train as train
    from rehamot.training.trainer import Trainer

    imported = time.time()
    real_init, real_step = Trainer.__init__, Trainer.train_step
    built: list[float] = []

    def init(trainer: Any, *a: Any, **kw: Any) -> None:
        real_init(trainer, *a, **kw)
        built.append(time.time())

    def first_step(trainer: Any, batch: dict[str, Any]) -> None:
        first_batch = time.time()
        real_step(trainer, batch)
        note(Path(args.result), started=started, imported=imported, built=built[0], first_batch=first_batch,
             first_step=time.time())
        os._exit(0)  # the run's teardown (checkpoint, export, evaluation) is not start-up

    Trainer.__init__, Trainer.train_step = init, first_step
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [*OURS_PAPER, f"data.shards={args.shards}", f"run.dir={run_dir}",
                     f"train.batch_size={args.batch_size}", f"data.num_workers={args.loader_workers}",
                     *args.ours_override]
        code = train.main(overrides)
    raise SystemExit(f"rehamot.train.main returned {code} before its first training step")


def original_worker(args: argparse.Namespace) -> None:
    started = time.time()
    sys.path.insert(0, str(args.original))  # the original's own code, passed as --original
    import numpy  # noqa: F401, I001  (train.py's imports, in its order, less tensorboardX and evaluation.py)
    import torch  # noqa: F401
    import hydra  # noqa: F401
    from omegaconf import DictConfig  # noqa: F401

    import model.launch.prepare  # noqa: F401
    from model.data.utils import get_loaders

    imported = time.time()
    args.lm = "frozen"
    cfg = build_original(args, progress_bar=True)  # compose + seed, as train.py before its loaders
    opt = cfg.machine
    train_loader, _val_loader = get_loaders(dataname=opt.dataname, batch_size=args.batch_size,
                                            workers=opt.num_workers, cfg=cfg.data)
    loaded = time.time()
    batch = next(iter(train_loader))
    first_batch = time.time()
    model = instantiate_original(cfg, train_loader.dataset.nfeats)
    built = time.time()
    model.train_start()
    model.train_emb(**batch, val_step=opt.val_step, init=False)
    note(Path(args.result), started=started, imported=imported, loaded=loaded, first_batch=first_batch,
         built=built, first_step=time.time(), train_items=len(train_loader.dataset))


# -- corpora -------------------------------------------------------------------------------------
def corpus_dir(args: argparse.Namespace, size: int) -> Path:
    return args.data_root / f"demo-{size}"


def run_logged(cmd: list[str], what: str) -> None:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{' '.join(cmd)}\n{proc.stderr[-3000:]}")
    print(f"  {what}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


def ensure_corpus(args: argparse.Namespace, size: int, shards: bool, source: bool) -> Path:
    """Shards (make_shards demo, which writes source/ too) and/or the source alone."""
    out = corpus_dir(args, size)
    has_shards, has_source = (out / "manifest.json").is_file(), (out / "source" / "train.txt").is_file()
    workers = ["--workers", str(args.build_workers)]
    if shards and not has_shards:
        run_logged([sys.executable, "shards/make_shards.py", "demo", "--motions", str(size), "--out", str(out),
                    *workers, *(["--overwrite"] if out.exists() else [])], f"demo corpus + shards, {size} motions")
    elif source and not has_source:
        shutil.rmtree(out / "source", ignore_errors=True)
        run_logged([sys.executable, "shards/demo_corpus.py", "--out", str(out / "source"), "--motions", str(size),
                    *workers], f"demo source, {size} motions")
    return out


def drop_source(out: Path) -> None:
    for sub in ("source", "original-splits"):
        shutil.rmtree(out / sub, ignore_errors=True)


def original_bytes(source: Path) -> int:
    """Bytes of the motion files the original loads (train + val, mirrors skipped as it does)."""
    total = 0
    for split in ("train", "val"):
        for keyid in (source / f"{split}.txt").read_text(encoding="utf-8").split():
            if not keyid.startswith("M"):
                total += (source / "new_joint_vecs" / f"{keyid}.npy").stat().st_size
    return total


def mem_available() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


# -- the driver ----------------------------------------------------------------------------------
def launch(impl: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    python = args.python if impl == "original" else sys.executable
    cmd = [python, str(Path(__file__).resolve()), "--worker", impl,
           "--original", str(args.original), "--shards", str(out), "--source", str(out / "source"),
           "--splits", str(out / "original-splits"), "--text-model", args.text_model,
           "--batch-size", str(args.batch_size), "--loader-workers", str(args.loader_workers),
           *[f"--ours-override={o}" for o in args.ours_override]]
    times, launched = run_worker(cmd, worker_env(args.threads), f"{impl} at {out}")
    return {k: (v - launched if k not in ("max_rss_mb", "train_items") else v) for k, v in times.items()}


def measure(impl: str, args: argparse.Namespace, out: Path, size: int) -> dict[str, float]:
    runs = [launch(impl, args, out) for _ in range(args.runs)]
    for i, r in enumerate(runs):
        print(f"  {impl:8} {size:>7} motions, launch {i + 1}/{args.runs}{' (warms the cache)' if i == 0 else ''}: "
              f"first batch {r['first_batch']:.1f} s, first step {r['first_step']:.1f} s, "
              f"max RSS {r['max_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    kept = runs[1:] or runs
    return {**{k: statistics.median(r[k] for r in kept) for k in kept[0]}, "cold_first_batch": runs[0]["first_batch"]}


def fit_line(points: dict[int, float]) -> tuple[float, float]:
    """Least squares t = a + b * motions."""
    xs, ys = list(points), list(points.values())
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def print_table(sizes: list[int], ours: dict[int, dict[str, float]], orig: dict[int, dict[str, float]]) -> None:
    line = None
    if len(orig) >= 2:
        a, b = fit_line({n: r["first_batch"] for n, r in orig.items()})
        line = (a, b)
        print(f"original launch -> first batch fitted over {sorted(orig)} motions: "
              f"{a:.2f} s + {1000 * b:.3f} s per 1,000 motions\n")
    print("| motions | ours: launch → first batch s (imports / Trainer built / loader) | ours: → first step done s "
          "| ours, first of the launches: → first batch s (builds the text cache if the corpus has none) "
          "| original: launch → first batch s (imports / config + every file read / loader) "
          "| original: → first step done s (model built, no validation pass) "
          "| original max RSS MB | first batch original/ours |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in sorted(set(sizes) | set(orig)):
        u, o = ours.get(n), orig.get(n)
        ours_cells = (f"{u['first_batch']:.2f} ({u['imported']:.1f} / {u['built'] - u['imported']:.1f} / "
                      f"{u['first_batch'] - u['built']:.1f}) | {u['first_step']:.2f} | {u['cold_first_batch']:.1f}"
                      if u else "– | – | –")
        if o:
            orig_cells = (f"{o['first_batch']:.2f} ({o['imported']:.1f} / {o['loaded'] - o['imported']:.1f} / "
                          f"{o['first_batch'] - o['loaded']:.1f}) | {o['first_step']:.2f} | {o['max_rss_mb']:.0f}")
            t_orig = o["first_batch"]
        elif line:
            t_orig = line[0] + line[1] * n
            orig_cells = f"{t_orig:.1f} (fit) | – | –"
        else:
            t_orig, orig_cells = None, "– | – | –"
        ratio = f"**{t_orig / u['first_batch']:.1f}×**" if u and t_orig else "–"
        print(f"| {n:,} | {ours_cells} | {orig_cells} | {ratio} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = comparison_parser(__doc__)
    parser.add_argument("--data-root", type=Path, default=REPO / "data" / "bench",
                        help="where corpora are built (default: data/bench in the repository)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000], help="corpus sizes for ours")
    parser.add_argument("--original-sizes", type=int, nargs="*", default=[10_000, 25_000, 50_000],
                        help="corpus sizes for the original (it holds the corpus in RAM; a size that would not "
                             "fit in the available memory is skipped and fitted)")
    parser.add_argument("--runs", type=int, default=2, help="launches per implementation and size; the first warms")
    parser.add_argument("--threads", type=int, default=2, help="OMP/MKL threads, both")
    parser.add_argument("--loader-workers", type=int, default=1, help="loader processes, both")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--build-workers", type=int, default=2, help="processes that build a missing corpus")
    parser.add_argument("--keep-sources", action="store_true", help="keep source folders after measuring")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.worker:
        (original_worker if args.worker == "original" else ours_worker)(args)
        return
    args.original = args.original.resolve()
    args.python, args.text_model = original_python(args.original, args.original_python), minilm_dir()
    args.data_root.mkdir(parents=True, exist_ok=True)
    print(command_line())
    load_before = os.getloadavg()[0]
    ours: dict[int, dict[str, float]] = {}
    orig: dict[int, dict[str, float]] = {}
    for size in sorted(set(args.sizes) | set(args.original_sizes), reverse=True):  # largest first: disk peak
        out = ensure_corpus(args, size, shards=size in args.sizes, source=size in args.original_sizes)
        if size not in args.original_sizes and not args.keep_sources:
            drop_source(out)
        if size in args.sizes:
            ours[size] = measure("ours", args, out, size)
        if size in args.original_sizes:
            original_splits(out / "source")
            need, free = 2 * original_bytes(out / "source"), mem_available()
            if need > free:
                print(f"  original at {size}: skipped, ~{need / 2**30:.1f} GiB needed (2x its motion files), "
                      f"{free / 2**30:.1f} GiB available", file=sys.stderr)
            else:
                orig[size] = measure("original", args, out, size)
            if not args.keep_sources:
                drop_source(out)
    print(f"threads {args.threads}, loader workers {args.loader_workers}, batch {args.batch_size}; medians of "
          f"{max(args.runs - 1, 1)} warm launch(es) after one that warms the page cache (nothing dropped); "
          f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n")
    print_table(args.sizes, ours, orig)
    if args.json:
        args.json.write_text(json.dumps({"command": sys.argv, "ours": ours, "original": orig}, indent=1))


if __name__ == "__main__":
    main()
