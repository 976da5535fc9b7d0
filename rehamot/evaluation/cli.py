"""Evaluate an exported bundle (or a run's best bundle) on a split, under named protocols.

    rehamot-eval RUN_DIR [--split test] [--protocol captions|tmr-all|...|LIST|every]
        [--sentence-model PATH] [--threshold 0.95] [--nsim humanml3d|kitml|FILE]
    python rehamot/evaluate.py RUN_DIR ...
    torchrun --nproc_per_node 2 rehamot/evaluate.py RUN_DIR ...   (same numbers, shared work)

    rehamot-eval RUN_DIR --shards DIR          (train on A, test on B: RUN_DIR/eval-<split>-<DIR's name>.json)
    rehamot-eval --matrix RUN [RUN ...] --on DIR [DIR ...] [--out matrix/]

Each motion and each caption is encoded once, each rank encoding its share when launched
with several processes. Rank 0 writes RUN_DIR/eval-<split>.json (nested by protocol), the
figures, and prints the table. Motions are normalised with the bundle's Mean/Std, whatever
shard set they come from; a shard set in another representation is refused. `--matrix`
scores every run on every shard set (captions protocol) into OUT/matrix.json and
OUT/matrix-rsum.png and prints the runs x test sets table.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist
from rich.console import Console

from rehamot.distributed import init_distributed, local_device
from rehamot.evaluation.retrieval_eval import (
    bundle_eval_set,
    encode_sentences,
    encode_split,
    evaluate_encoded,
    format_matrix_table,
    plan_protocols,
    print_results,
    print_table,
    sentence_model_label,
    shard_set_name,
    write_eval_figures,
)
from rehamot.evaluation.retrieval_metrics import NSIM_CORPORA, PROTOCOLS, TMR_THRESHOLD


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rehamot-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", default=None,
                        help="a run dir (its best/ or final/ bundle) or a bundle folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--protocol", default="captions",
                        help=f"one of {', '.join(PROTOCOLS)}, a comma-separated list of them, or every")
    parser.add_argument("--shards", default=None, help="shard folder or URL prefix (default: the run's data.shards)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--sentence-model", default=None,
                        help="tmr-threshold's sentence embedder: a local sentence-transformers folder "
                             "(default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--threshold", type=float, default=TMR_THRESHOLD, help="tmr-threshold's threshold")
    parser.add_argument("--nsim", default=None,
                        help="tmr-nsim's id list: humanml3d, kitml or a file of ids (default: the corpus's)")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNGs")
    matrix = parser.add_argument_group("runs x test sets (captions protocol, --split)")
    matrix.add_argument("--matrix", nargs="+", default=None, metavar="RUN",
                        help="score each of these runs (or bundles) on each shard set of --on")
    matrix.add_argument("--on", nargs="+", default=None, metavar="DIR", help="the shard sets")
    matrix.add_argument("--out", default="matrix", help="folder for matrix.json and matrix-rsum.png "
                                                        "(default: ./matrix/)")
    return parser


def _checked_args(args: argparse.Namespace) -> None:
    """One line for a command that mixes the single-run and the matrix forms."""
    if args.matrix is None:
        if args.run_dir is None:
            raise ValueError("give a run dir, or --matrix RUN [RUN ...] --on DIR [DIR ...]")
        if args.on is not None:
            raise ValueError("--on goes with --matrix RUN [RUN ...]")
        return
    if args.run_dir is not None:
        raise ValueError(f"--matrix names its runs itself, {args.run_dir!r} is one too many: "
                         "rehamot-eval --matrix RUN [RUN ...] --on DIR [DIR ...]")
    if not args.on:
        raise ValueError("--matrix needs the test sets: --on DIR [DIR ...]")
    if args.shards or args.protocol != "captions":
        raise ValueError("--matrix scores the --on shard sets under the captions protocol: "
                         "drop --shards and --protocol")


def _bundle_config(bundle: Path):
    """The bundle's config and bundle.json (its Mean/Std, feature dim, fps), without the weights:
    a shard set in another representation is refused before the model is built."""
    from rehamot.config import load_config
    from rehamot.models.bundle import BUNDLE_FILE, CONFIG_FILE

    return load_config(bundle / CONFIG_FILE), json.loads((bundle / BUNDLE_FILE).read_text(encoding="utf-8"))


def _run_dir(bundle: Path) -> Path:
    return bundle.parent if bundle.name in ("best", "final") else bundle


def run(args: argparse.Namespace) -> int:
    _checked_args(args)
    if args.matrix is not None:
        return run_matrix(args)
    from rehamot.config import eval_shards
    from rehamot.data.schema import load_manifest, shared_location
    from rehamot.models.bundle import CONFIG_FILE, find_bundle, load_bundle
    from rehamot.models.factory import build_tokenizer

    world = init_distributed()
    device = local_device()
    bundle = find_bundle(args.run_dir)
    cfg, info = _bundle_config(bundle)
    if args.shards:
        cfg.data.shards = args.shards
    else:  # the bundle's config may come from anyone: its location must run nothing
        cfg.data.shards = shared_location(eval_shards(cfg.data), str(bundle / CONFIG_FILE))  # a mixture: its eval source
    corpus = load_manifest(cfg.data.shards).get("corpus")
    nsim = args.nsim or (corpus if corpus in NSIM_CORPORA else None)
    eval_set = bundle_eval_set(cfg, info, args.split, build_tokenizer(cfg), world.rank, world.world_size)
    # plan before building the model: an impossible request fails in seconds
    protocols, skipped = plan_protocols(args.protocol, eval_set.ids, nsim)
    model, _, info = load_bundle(bundle, device)
    enc = encode_split(model, eval_set, device, args.batch_size)
    sentence_emb = None
    if "tmr-threshold" in protocols:
        sentence_emb = encode_sentences(eval_set, device, args.sentence_model, args.batch_size)
    if world.rank != 0:
        return 0
    results = evaluate_encoded(enc, protocols, sentence_emb=sentence_emb,
                               sentence_model_name=sentence_model_label(args.sentence_model),
                               threshold=args.threshold, nsim_ids=nsim)
    run_dir = _run_dir(bundle)
    # another shard set's results sit beside the run's own instead of replacing them
    shard_set = shard_set_name(args.shards) if args.shards else None
    out = run_dir / (f"eval-{args.split}-{shard_set}.json" if shard_set else f"eval-{args.split}.json")
    payload = {"split": args.split, "bundle": bundle.name, "step": info.get("step"),
               "shards": str(cfg.data.shards), "motions": eval_set.num_motions,
               "captions": eval_set.num_captions, "protocols": results, "skipped": skipped}
    out.write_text(json.dumps(payload, indent=1))
    console = Console()
    on = f" of {cfg.data.shards}" if shard_set else ""
    print_results(results, title=f"{args.split} split{on}, {bundle}", console=console)
    for protocol, reason in skipped.items():
        console.print(f"note: {protocol} skipped: {reason}")
    console.print(f"wrote {out}")
    if not args.no_figures:
        for path in write_eval_figures(run_dir, enc, results, args.split, shard_set):
            console.print(f"wrote {path}")
    return 0


def _run_label(bundle: Path) -> str:
    """A run dir's name; `run/final` for a bundle named beside the run's best one."""
    bundle = bundle.resolve()
    return _run_dir(bundle).name if bundle.name != "final" else f"{bundle.parent.name}/final"


def _unique(labels: list[str]) -> list[str]:
    """Labels made distinct by a suffix (two runs both called `run`: run, run-2)."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
    return out


def run_matrix(args: argparse.Namespace) -> int:
    """Every run on every shard set of --on: captions protocol, the --split of each."""
    import numpy as np

    from rehamot.data.reading import read_manifest
    from rehamot.evaluation.figures import plot_score_matrix
    from rehamot.evaluation.retrieval_eval import check_representation
    from rehamot.models.bundle import find_bundle, load_bundle
    from rehamot.models.factory import build_tokenizer

    world = init_distributed()
    device = local_device()
    bundles = [find_bundle(run) for run in args.matrix]
    configs = [_bundle_config(bundle) for bundle in bundles]
    # every pair checked before any model is built: a wrong shard set fails in seconds
    manifests = [read_manifest(location) for location in args.on]
    for (_, info), bundle in zip(configs, bundles):
        for manifest, location in zip(manifests, args.on):
            check_representation(manifest, info, f"{location} for {bundle}")
    run_names = _unique([_run_label(bundle) for bundle in bundles])
    set_names = _unique([shard_set_name(location) for location in args.on])
    results: dict[str, dict[str, dict[str, float]]] = {}
    for bundle, (cfg, info), run_name in zip(bundles, configs, run_names):
        model, _, _ = load_bundle(bundle, device)
        tokenizer = build_tokenizer(cfg)
        results[run_name] = {}
        for location, set_name in zip(args.on, set_names):
            cfg.data.shards = location
            eval_set = bundle_eval_set(cfg, info, args.split, tokenizer, world.rank, world.world_size)
            enc = encode_split(model, eval_set, device, args.batch_size)
            if world.rank == 0:
                results[run_name][set_name] = evaluate_encoded(enc, ["captions"])["captions"]
    if world.rank != 0:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"split": args.split, "protocol": "captions",
               "runs": [{"name": n, "bundle": str(b)} for n, b in zip(run_names, bundles)],
               "test_sets": [{"name": n, "shards": str(loc)} for n, loc in zip(set_names, args.on)],
               "results": results}
    (out / "matrix.json").write_text(json.dumps(payload, indent=1))
    rsum = np.array([[results[r][s]["rsum"] for s in set_names] for r in run_names])
    plot_score_matrix(rsum, run_names, set_names, out / "matrix-rsum.png",
                      title=f"rsum, captions protocol, {args.split} split")
    console = Console()
    print_table(format_matrix_table(results, title=f"runs x test sets: captions protocol, {args.split} split"),
                console)
    console.print(f"wrote {out / 'matrix.json'} and {out / 'matrix-rsum.png'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        # a user's mistake (no bundle, bad split, impossible protocol): one line, not a traceback
        print(f"evaluate: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
