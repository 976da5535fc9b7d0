"""Evaluate an exported bundle (or a run's best bundle) on a split, under named protocols.

    rehamot-eval RUN_DIR [--split test] [--protocol captions|tmr-all|...|LIST|every]
        [--sentence-model PATH] [--threshold 0.95] [--nsim humanml3d|kitml|FILE]
    python rehamot/evaluate.py RUN_DIR ...
    torchrun --nproc_per_node 2 rehamot/evaluate.py RUN_DIR ...   (same numbers, shared work)

Each motion and each caption is encoded once, each rank encoding its share when launched
with several processes. Rank 0 writes RUN_DIR/eval-<split>.json (nested by protocol), the
figures, and prints the table.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch.distributed as dist
from rich.console import Console

from rehamot.data import EvalSet
from rehamot.distributed import init_distributed, local_device
from rehamot.evaluation.retrieval_eval import (
    encode_sentences,
    encode_split,
    evaluate_encoded,
    plan_protocols,
    print_results,
    sentence_model_label,
    write_eval_figures,
)
from rehamot.evaluation.retrieval_metrics import NSIM_CORPORA, PROTOCOLS, TMR_THRESHOLD


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rehamot-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run dir (its best/ or final/ bundle) or a bundle folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--protocol", default="captions",
                        help=f"one of {', '.join(PROTOCOLS)}, a comma-separated list of them, or every")
    parser.add_argument("--shards", default=None, help="shard folder (default: the run's data.shards)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--sentence-model", default=None,
                        help="tmr-threshold's sentence embedder: a local sentence-transformers folder "
                             "(default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--threshold", type=float, default=TMR_THRESHOLD, help="tmr-threshold's threshold")
    parser.add_argument("--nsim", default=None,
                        help="tmr-nsim's id list: humanml3d, kitml or a file of ids (default: the corpus's)")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNGs")
    return parser


def run(args: argparse.Namespace) -> int:
    from rehamot.config import load_config
    from rehamot.data import data_config
    from rehamot.data.schema import load_manifest, shared_location
    from rehamot.models.bundle import CONFIG_FILE, find_bundle, load_bundle
    from rehamot.models.factory import build_tokenizer

    world = init_distributed()
    device = local_device()
    bundle = find_bundle(args.run_dir)
    cfg = load_config(bundle / CONFIG_FILE)
    if args.shards:
        cfg.data.shards = args.shards
    else:  # the bundle's config may come from anyone: its location must run nothing
        shared_location(cfg.data.shards, str(bundle / CONFIG_FILE))
    corpus = load_manifest(cfg.data.shards).get("corpus")
    nsim = args.nsim or (corpus if corpus in NSIM_CORPORA else None)
    eval_set = EvalSet(data_config(cfg, args.split), build_tokenizer(cfg), world.rank, world.world_size)
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
    run_dir = bundle.parent if bundle.name in ("best", "final") else bundle
    out = run_dir / f"eval-{args.split}.json"
    payload = {"split": args.split, "bundle": bundle.name, "step": info.get("step"),
               "motions": eval_set.num_motions, "captions": eval_set.num_captions,
               "protocols": results, "skipped": skipped}
    out.write_text(json.dumps(payload, indent=1))
    console = Console()
    print_results(results, title=f"{args.split} split, {bundle}", console=console)
    for protocol, reason in skipped.items():
        console.print(f"note: {protocol} skipped: {reason}")
    console.print(f"wrote {out}")
    if not args.no_figures:
        for path in write_eval_figures(run_dir, enc, results, args.split):
            console.print(f"wrote {path}")
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
