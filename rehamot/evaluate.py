"""Evaluate an exported bundle (or a model in training) on a split, under named protocols.

    python rehamot/evaluate.py RUN_DIR [--split test] [--protocol captions|tmr-all|...|LIST|every]
        [--sentence-model PATH] [--threshold 0.95] [--nsim humanml3d|kitml|FILE]
    torchrun --nproc_per_node 2 rehamot/evaluate.py RUN_DIR ...   (same numbers, shared work)

Each motion and each caption is encoded once (the original encoded every motion once per
caption), each rank encoding its share when launched with several processes. Rank 0 writes
RUN_DIR/eval-<split>.json (nested by protocol), the figures, and prints the table.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console

from rehamot import distributed as dist_utils
from rehamot.data import EvalSet
from rehamot.metrics import (
    NSIM_CORPORA,
    PROTOCOLS,
    TMR_BATCH_SIZE,
    TMR_THRESHOLD,
    caption_protocol_ranks,
    evaluate_protocols,
    format_table,
    nsim_ids,
)

EXAMPLE_QUERIES = 6  # captions shown in the retrieval-examples figure
EXAMPLE_TOP_K = 5


# --------------------------------------------------------------------------- processes


def init_distributed() -> dist_utils.WorldInfo:
    """Join the process group that torchrun / accelerate launch describe in the environment.

    Plain `python` (no WORLD_SIZE, or 1) stays a single process without a group.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist_utils.world_info()


def local_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


# --------------------------------------------------------------------------- encoding


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


def sentence_model_label(model: str | None) -> str:
    """The name written into the protocol, e.g. `tmr-threshold(MiniLM)`."""
    from rehamot.models import embedded_model_dir
    from rehamot.models.text_encoder import EMBEDDED_MODEL_NAMES

    if model in EMBEDDED_MODEL_NAMES or Path(model).resolve() == embedded_model_dir().resolve():
        return "MiniLM"
    return Path(str(model).rstrip("/")).name or str(model)


# sentence-transformers modules that `TextEncoder.features` + L2 normalisation reproduce;
# anything else (a Dense layer, say) would silently give other embeddings than the model's.
_SUPPORTED_ST_MODULES = ("Transformer", "Pooling", "Normalize")


def _check_sentence_modules(folder: Path) -> None:
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return
    for module in json.loads(modules_file.read_text(encoding="utf-8")):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in _SUPPORTED_ST_MODULES:
            raise ValueError(f"sentence model {folder}: module {kind!r} is not supported "
                             f"(only {', '.join(_SUPPORTED_ST_MODULES)})")


def _sentence_max_length(folder: Path, default: int = 128) -> int:
    config = folder / "sentence_bert_config.json"
    if config.is_file():
        return int(json.loads(config.read_text(encoding="utf-8")).get("max_seq_length", default))
    return default


@torch.no_grad()
def encode_sentences(eval_set: EvalSet, device: torch.device, model: str | None = None,
                     batch_size: int = 128) -> np.ndarray:
    """Unit sentence embeddings (C, H) of every caption, for TMR's threshold protocol.

    `model` is a local sentence-transformers folder; None is the packaged all-MiniLM-L6-v2
    with mean pooling. Its own pooling (modules.json) is used, then L2 normalisation.
    Each rank encodes its share of the captions; every rank returns the whole matrix.
    """
    from rehamot.data import tokenize
    from rehamot.models import TextEncoder, TextEncoderConfig, load_tokenizer, resolve_text_model

    folder = Path(resolve_text_model(model))
    if not folder.is_dir():
        raise FileNotFoundError(f"sentence model {model!r} is not a local folder")
    _check_sentence_modules(folder)
    # embed_dim=1: the projection head is not used, only the pooled features
    cfg = TextEncoderConfig(model=str(folder), pooling="auto", embed_dim=1,
                            max_length=_sentence_max_length(folder))
    encoder = TextEncoder(cfg).to(device).eval()
    tokenizer = load_tokenizer(cfg)
    indices = eval_set.caption_indices()
    out = torch.zeros(eval_set.num_captions, encoder.hidden_size, device=device)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        tokens = tokenize(tokenizer, [eval_set.captions[i].text for i in chunk], cfg.max_length)
        features = encoder.features(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        out[torch.tensor(chunk, device=device)] = torch.nn.functional.normalize(features.float(), dim=-1)
    return dist_utils.all_reduce_sum(out).cpu().numpy()


# --------------------------------------------------------------------------- protocols


def evaluate_encoded(enc: Mapping[str, Any], protocols: Sequence[str] = ("captions",),
                     **protocol_kwargs: Any) -> dict[str, dict[str, float]]:
    """Metrics of each protocol on `encode_split`'s output (see metrics.evaluate_protocols)."""
    return evaluate_protocols(enc["motion_emb"], enc["caption_emb"], enc["caption_motion"], enc["motion_ids"],
                              protocols=tuple(protocols), **protocol_kwargs)


def evaluate_model(model, eval_set: EvalSet, device, batch_size: int = 128,
                   protocols: Sequence[str] = ("captions",), **protocol_kwargs: Any) -> dict[str, dict[str, float]]:
    return evaluate_encoded(encode_split(model, eval_set, device, batch_size), protocols, **protocol_kwargs)


def plan_protocols(requested: str, motion_ids: Sequence[str], nsim: str | None) -> tuple[list[str], dict[str, str]]:
    """The protocols to run and, for `every`, those skipped with the reason.

    A protocol asked for by name that cannot run on this split raises ValueError instead:
    silently reporting nothing would look like a result.
    """
    wanted = list(PROTOCOLS) if requested == "every" else requested.split(",")
    unknown = [p for p in wanted if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol(s) {', '.join(unknown)}: expected {', '.join(PROTOCOLS)}, "
                         "a comma-separated list of them, or every")
    reasons: dict[str, str] = {}
    if "tmr-nsim" in wanted:
        if nsim is None:
            reasons["tmr-nsim"] = (f"this corpus has no nsim id list (packaged: {', '.join(NSIM_CORPORA)}); "
                                   "pass --nsim FILE")
        else:
            present = set(motion_ids)
            missing = [i for i in nsim_ids(nsim) if i not in present]
            if missing:
                reasons["tmr-nsim"] = (f"{len(missing)} ids of the {nsim} nsim list are not in this split, "
                                       f"e.g. {missing[:3]}")
    if "tmr-batch32" in wanted and len(motion_ids) < TMR_BATCH_SIZE:
        reasons["tmr-batch32"] = f"needs at least {TMR_BATCH_SIZE} motions, this split has {len(motion_ids)}"
    if requested != "every":
        for protocol in wanted:
            if protocol in reasons:
                raise ValueError(f"protocol {protocol}: {reasons[protocol]}")
    return [p for p in wanted if p not in reasons], reasons


# --------------------------------------------------------------------------- figures


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, kind="stable")[:k]  # ties -> lower index, deterministic


def retrieval_examples(enc: Mapping[str, Any], num_queries: int = EXAMPLE_QUERIES, k: int = EXAMPLE_TOP_K):
    """A few test captions as queries (the first caption of evenly spaced motions), each with
    its top-k motions, one caption of each, right (its own motion) or wrong."""
    from rehamot.plots import RetrievalExample, RetrievedMotion

    owners = np.asarray(enc["caption_motion"])
    ids, texts = enc["motion_ids"], enc["texts"]
    first = {int(m): i for i, m in reversed(list(enumerate(owners)))}  # motion -> its first caption
    motions = np.unique(np.linspace(0, len(ids) - 1, min(num_queries, len(ids))).round().astype(int))
    examples = []
    for motion in motions:
        query = first[int(motion)]
        scores = enc["motion_emb"] @ enc["caption_emb"][query]
        hits = [RetrievedMotion(ids[j], float(scores[j]), texts[first[int(j)]], bool(j == motion))
                for j in _top(scores, k)]
        examples.append(RetrievalExample(texts[query], ids[motion], hits))
    return examples


def write_eval_figures(run_dir: str | Path, enc: Mapping[str, Any], results: Mapping[str, Mapping[str, float]],
                       split: str = "test") -> list[Path]:
    """retrieval_examples-<split>.png and rank_histograms-<split>.png in the run dir (rank 0 only).

    `enc` is `encode_split`'s output; `results` labels the histograms (its `captions` entry).
    """
    from rehamot.plots import plot_rank_histograms, plot_retrieval_examples

    run_dir = Path(run_dir)
    examples_png = run_dir / f"retrieval_examples-{split}.png"
    plot_retrieval_examples(retrieval_examples(enc), examples_png,
                            title=f"{split} split: text→motion, top {EXAMPLE_TOP_K} (green = its own motion)")
    t2m, m2t = caption_protocol_ranks(enc["caption_emb"] @ enc["motion_emb"].T, enc["caption_motion"])
    captions = results.get("captions", {})
    title = f"{split} split, captions protocol"
    if "t2m/R@1" in captions:
        title += f" (t2m R@1 {captions['t2m/R@1']:.1f}, m2t R@1 {captions['m2t/R@1']:.1f})"
    histograms_png = run_dir / f"rank_histograms-{split}.png"
    plot_rank_histograms(t2m, m2t, histograms_png, title=title)
    return [examples_png, histograms_png]


# --------------------------------------------------------------------------- CLI


def print_results(results: dict[str, dict[str, float]], title: str = "", console: Console | None = None) -> None:
    console = console or Console()
    table = format_table(results, title=title)
    natural = console.measure(table, options=console.options.update_width(1000)).maximum
    if natural > console.width:
        # never truncate numbers ("R@…"): a log file or a narrow terminal gets the full table
        console = Console(file=console.file, width=natural)
    console.print(table)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    from rehamot.data.schema import load_manifest
    from rehamot.export import CONFIG_FILE, find_bundle, load_bundle
    from rehamot.model_factory import build_tokenizer
    from rehamot.train import data_config

    world = init_distributed()
    device = local_device()
    bundle = find_bundle(args.run_dir)
    cfg = load_config(bundle / CONFIG_FILE)
    if args.shards:
        cfg.data.shards = args.shards
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


if __name__ == "__main__":
    sys.exit(main())
