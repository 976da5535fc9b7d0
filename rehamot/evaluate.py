"""Evaluate an exported bundle (or a model in training) on a split, under named protocols.

    python rehamot/evaluate.py RUN_DIR [--split test] [--protocol captions|tmr-all|...|every]

Each motion and each caption is encoded once (the original encoded every motion once per
caption), each rank encoding its share when launched with several processes.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
from typing import Any, Sequence

import numpy as np
import torch
from rich.console import Console

from rehamot import distributed as dist_utils
from rehamot.data import EvalSet
from rehamot.metrics import PROTOCOLS, evaluate_protocols, format_table


@torch.no_grad()
def encode_split(model, eval_set: EvalSet, device: torch.device, batch_size: int = 128) -> dict[str, Any]:
    """Unit embeddings of every motion and caption of the split (the same on every rank)."""
    was_training = model.training
    model.eval()
    dim = model.motion.cfg.embed_dim
    motion_emb = torch.zeros(eval_set.num_motions, dim, device=device)
    for batch in eval_set.motion_batches(batch_size):
        emb = model.encode_motion(batch["motion"].to(device), batch["motion_mask"].to(device))
        motion_emb[batch["index"].to(device)] = emb.float()
    caption_emb = torch.zeros(eval_set.num_captions, dim, device=device)
    for batch in eval_set.caption_batches(batch_size):
        emb = model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        caption_emb[batch["index"].to(device)] = emb.float()
    # Each row was filled by exactly one rank and is zero elsewhere: a sum assembles them.
    motion_emb = dist_utils.all_reduce_sum(motion_emb)
    caption_emb = dist_utils.all_reduce_sum(caption_emb)
    model.train(was_training)
    return {
        "motion_emb": motion_emb.cpu().numpy(),
        "caption_emb": caption_emb.cpu().numpy(),
        "caption_motion": np.asarray([c.motion for c in eval_set.captions], dtype=np.int64),
        "motion_ids": list(eval_set.ids),
        "texts": [c.text for c in eval_set.captions],
        "caption_ids": [c.caption_id for c in eval_set.captions],
    }


def evaluate_model(model, eval_set: EvalSet, device, batch_size: int = 128,
                   protocols: Sequence[str] = ("captions",), **protocol_kwargs: Any) -> dict[str, dict[str, float]]:
    enc = encode_split(model, eval_set, device, batch_size)
    return evaluate_protocols(enc["motion_emb"], enc["caption_emb"], enc["caption_motion"], enc["motion_ids"],
                              protocols=tuple(protocols), **protocol_kwargs)


def print_results(results: dict[str, dict[str, float]], title: str = "", console: Console | None = None) -> None:
    (console or Console()).print(format_table(results, title=title))


def main(argv: Sequence[str] | None = None) -> int:
    from rehamot.config import DataSection  # noqa: F401  (schema of the bundle's config)
    from rehamot.export import find_bundle, load_bundle
    from rehamot.model_factory import build_tokenizer
    from rehamot.train import data_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--split", default="test")
    parser.add_argument("--protocol", default="captions", choices=(*PROTOCOLS, "every"))
    parser.add_argument("--shards", default=None, help="shard folder (default: the run's data.shards)")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)

    dist_utils.init_from_env()
    device = torch.device("cuda", dist_utils.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    bundle = find_bundle(args.run_dir)
    model, cfg, info = load_bundle(bundle, device)
    if args.shards:
        cfg.data.shards = args.shards
    protocols = PROTOCOLS if args.protocol == "every" else (args.protocol,)
    eval_set = EvalSet(data_config(cfg, args.split), build_tokenizer(cfg), dist_utils.rank(), dist_utils.world_size())
    results = evaluate_model(model, eval_set, device, args.batch_size, protocols)
    if dist_utils.rank() == 0:
        out = Path(args.run_dir) / f"eval-{args.split}.json"
        payload = {"split": args.split, "bundle": bundle.name, "step": info.get("step"), "protocols": results}
        out.write_text(json.dumps(payload, indent=1))
        print_results(results, title=f"{args.split} split, {bundle}")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
