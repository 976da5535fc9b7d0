"""Evaluation of a model on a split: encoding (shared across ranks), protocols, tables, figures.

Library code used by training (validation, the final test table), `evaluate.py`,
`search.py` and the generation evaluator. Each motion and each caption is encoded once (the
original encoded every motion once per caption), each rank encoding its share when launched
with several processes.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from rehamot import distributed as dist_utils
from rehamot.data import EvalSet
from rehamot.evaluation.retrieval_metrics import (
    CAPTIONS_RECALL_KS,
    NSIM_CORPORA,
    PROTOCOLS,
    TMR_BATCH_SIZE,
    TMR_RECALL_KS,
    caption_protocol_ranks,
    evaluate_protocols,
    nsim_ids,
)
from rehamot.progress import track

EXAMPLE_QUERIES = 6  # captions shown in the retrieval-examples figure
EXAMPLE_TOP_K = 5


# --------------------------------------------------------------------------- encoding


@torch.no_grad()
def encode_split(model, eval_set: EvalSet, device: torch.device, batch_size: int = 128) -> dict[str, Any]:
    """Unit embeddings of every motion and caption of the split (the same on every rank)."""
    was_training = model.training
    model.eval()
    dim = model.motion.cfg.embed_dim
    motion_emb = torch.zeros(eval_set.num_motions, dim, device=device)
    shown = eval_set.rank == 0
    split = eval_set.cfg.split
    motion_total = math.ceil(len(eval_set.motion_indices()) / batch_size)
    for batch in track(eval_set.motion_batches(batch_size), motion_total,
                       f"{split} split: encoding {eval_set.num_motions} motions", enabled=shown):
        emb = model.encode_motion(batch["motion"].to(device), batch["motion_mask"].to(device))
        motion_emb[batch["index"].to(device)] = emb.float()
    caption_emb = torch.zeros(eval_set.num_captions, dim, device=device)
    caption_total = math.ceil(len(eval_set.caption_indices()) / batch_size)
    for batch in track(eval_set.caption_batches(batch_size), caption_total,
                       f"{split} split: encoding {eval_set.num_captions} captions", enabled=shown):
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


def check_representation(manifest: Mapping[str, Any], info: Mapping[str, Any], where: str) -> None:
    """ValueError (one line) unless the shard set's motions are in the bundle's representation:
    the same feature width (hence layout) and frame rate. A model reads what it was trained on;
    other features would be normalised and encoded into numbers that look like a result."""
    have = (int(manifest["feature_dim"]), float(manifest["fps"]))
    want = (int(info["feature_dim"]), float(info["fps"]))
    if have != want:
        raise ValueError(f"{where}: motions of {have[0]} features at {have[1]:g} fps, the model reads "
                         f"{want[0]} features at {want[1]:g} fps: a shard set in the model's "
                         "representation is needed (shards/make_shards.py)")


def bundle_eval_set(cfg, info: Mapping[str, Any], split: str, tokenizer, rank: int = 0,
                    world_size: int = 1) -> EvalSet:
    """The split of `cfg.data.shards` as the bundle's model must see it: checked to be in its
    representation, normalised with the bundle's Mean/Std (those it was trained with), not the
    shard set's own, which differ for any other corpus."""
    from rehamot.data import data_config, schema
    from rehamot.data.reading import read_manifest

    location = str(cfg.data.shards)
    check_representation(read_manifest(location), info, location)
    # the bundle's Mean/Std, floored as when the shards are read
    return EvalSet(data_config(cfg, split), tokenizer, rank, world_size, mean_std=schema.mean_std(info))


def shard_set_name(location: str) -> str:
    """A shard folder's (or URL's) last name, safe in a file name: `eval-test-<name>.json`."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(location).rstrip("/").rsplit("/", 1)[-1]).strip("._-")
    return name or "shards"


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
    from rehamot.evaluation.figures import RetrievalExample, RetrievedMotion

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
                       split: str = "test", shard_set: str | None = None) -> list[Path]:
    """retrieval_examples-<split>.png and rank_histograms-<split>.png in the run dir (rank 0 only),
    -<split>-<shard_set>.png for another shard set than the run's.

    `enc` is `encode_split`'s output; `results` labels the histograms (its `captions` entry).
    """
    from rehamot.evaluation.figures import plot_rank_histograms, plot_retrieval_examples

    run_dir = Path(run_dir)
    tag = f"{split}-{shard_set}" if shard_set else split
    where = f"{split} split of {shard_set}" if shard_set else f"{split} split"
    examples_png = run_dir / f"retrieval_examples-{tag}.png"
    plot_retrieval_examples(retrieval_examples(enc), examples_png,
                            title=f"{where}: text→motion, top {EXAMPLE_TOP_K} (green = its own motion)")
    t2m, m2t = caption_protocol_ranks(enc["caption_emb"] @ enc["motion_emb"].T, enc["caption_motion"])
    captions = results.get("captions", {})
    title = f"{where}, captions protocol"
    if "t2m/R@1" in captions:
        title += f" (t2m R@1 {captions['t2m/R@1']:.1f}, m2t R@1 {captions['m2t/R@1']:.1f})"
    histograms_png = run_dir / f"rank_histograms-{tag}.png"
    plot_rank_histograms(t2m, m2t, histograms_png, title=title)
    return [examples_png, histograms_png]


# --------------------------------------------------------------------------- tables

_METRIC_ORDER = [f"R@{k}" for k in sorted(set(CAPTIONS_RECALL_KS) | set(TMR_RECALL_KS))] + ["MedR"]


def format_table(results: Mapping[str, Mapping[str, float]], title: str | None = None) -> Table:
    """One row per protocol and direction, one column per metric (2 decimals). The captions
    protocol alone fits 80 columns; TMR's extra recalls and long protocol names need ~95."""
    present = {key.split("/", 1)[1] for metrics in results.values() for key in metrics if "/" in key}
    columns = [m for m in _METRIC_ORDER if m in present]
    table = Table(title=title)
    table.add_column("protocol", no_wrap=True)
    table.add_column("direction", no_wrap=True)
    for column in columns:
        table.add_column(column, justify="right")
    table.add_column("rsum", justify="right")
    for protocol, metrics in results.items():
        for direction, label in (("t2m", "text→motion"), ("m2t", "motion→text")):
            cells = [f"{metrics[f'{direction}/{c}']:.2f}" if f"{direction}/{c}" in metrics else "-" for c in columns]
            rsum = f"{metrics['rsum']:.2f}" if "rsum" in metrics and direction == "t2m" else ""
            table.add_row(protocol if direction == "t2m" else "", label, *cells, rsum)
    return table


def print_results(results: dict[str, dict[str, float]], title: str = "", console: Console | None = None) -> None:
    print_table(format_table(results, title=title), console)


def print_table(table: Table, console: Console | None = None) -> None:
    console = console or Console()
    natural = console.measure(table, options=console.options.update_width(1000)).maximum
    if natural > console.width:
        # never truncate numbers ("R@…"): a log file or a narrow terminal gets the full table
        console = Console(file=console.file, width=natural)
    console.print(table)


def format_matrix_table(results: Mapping[str, Mapping[str, Mapping[str, float]]], title: str | None = None) -> Table:
    """Runs (rows) × test sets (columns) of captions-protocol metrics {run: {set: metrics}}:
    each cell holds t2m and m2t R@1 / R@10 and the rsum."""
    columns = list(dict.fromkeys(name for row in results.values() for name in row))
    table = Table(title=title, show_lines=True)
    table.add_column("run", no_wrap=True)
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    for run, row in results.items():
        cells = []
        for column in columns:
            m = row.get(column)
            cells.append("-" if m is None else
                         f"t2m R@1 {m['t2m/R@1']:.2f} R@10 {m['t2m/R@10']:.2f}\n"
                         f"m2t R@1 {m['m2t/R@1']:.2f} R@10 {m['m2t/R@10']:.2f}\n"
                         f"rsum {m['rsum']:.2f}")
        table.add_row(run, *cells)
    return table
