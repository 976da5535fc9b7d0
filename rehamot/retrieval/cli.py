"""Search a trained model from the command line, or serve a local search page.

    rehamot-search index RUN_DIR [--shards DIR] [--split test]
    rehamot-search query RUN_DIR "a person jumps twice" [--top-k 5] [--json]
    rehamot-search query RUN_DIR --motion ID [--top-k 5] [--json]
    rehamot-search query RUN_DIR --motion-file MOTION.npy [--top-k 5] [--json]
    rehamot-search serve RUN_DIR [--host 127.0.0.1] [--port 8000]

(or `python rehamot/search.py ...`). A text finds motions; a motion (an id of the index, or a
.npy file of raw features in the model's layout) finds captions and the motions most like it.
The index and its Python API live in `rehamot.retrieval.index`, the page in `rehamot.retrieval.server`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from rehamot.retrieval.index import (
    META_FILE,
    CaptionHit,
    MotionHit,
    SearchError,
    SearchIndex,
    build_index,
    checked_k,
    checked_text,
    motion_query_json,
    text_query_json,
)


def _print_motion_hits(title: str, hits: list[MotionHit]) -> None:
    table = Table(title=title)
    table.add_column("rank", justify="right")
    table.add_column("motion id", no_wrap=True)
    table.add_column("score", justify="right")
    table.add_column("its captions")
    for hit in hits:
        table.add_row(str(hit.rank), hit.motion_id, f"{hit.score:.3f}", "\n".join(hit.captions))
    Console().print(table)


def _print_caption_hits(title: str, hits: list[CaptionHit]) -> None:
    table = Table(title=title)
    table.add_column("rank", justify="right")
    table.add_column("own", justify="center")
    table.add_column("caption id", no_wrap=True)
    table.add_column("score", justify="right")
    table.add_column("caption")
    for hit in hits:
        table.add_row(str(hit.rank), "✓" if hit.own else "", hit.caption_id, f"{hit.score:.3f}", hit.text)
    Console().print(table)


def _print_json(payload: dict[str, Any]) -> None:
    print(json.dumps(payload, ensure_ascii=False, indent=1))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rehamot-search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="encode a split into RUN_DIR/index/")
    index.add_argument("run_dir")
    index.add_argument("--shards", default=None, help="shard folder (default: the run's data.shards)")
    index.add_argument("--split", default="test")
    index.add_argument("--batch-size", type=int, default=128)
    query = commands.add_parser("query", help="top motions for a text; top captions and motions for a motion")
    query.add_argument("run_dir")
    query.add_argument("text", nargs="?", default=None)
    query.add_argument("--motion", default=None, metavar="ID",
                       help="search the other way: captions and similar motions for this motion id")
    query.add_argument("--motion-file", default=None, metavar="MOTION.npy",
                       help="the same for raw (un-normalised) features (frames, D) in the model's layout")
    query.add_argument("--top-k", type=int, default=5)
    query.add_argument("--json", action="store_true", help="print the results as JSON")
    serve = commands.add_parser("serve", help="a local search page with animated stick figures")
    serve.add_argument("run_dir")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default: this machine only; the page has no authentication)")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return parser


def _query(args: argparse.Namespace) -> None:
    given = [name for name in ("text", "motion", "motion_file") if getattr(args, name) is not None]
    if len(given) != 1:
        raise SearchError("give one query: a text, --motion ID or --motion-file MOTION.npy")
    if args.text is not None:
        checked_text(args.text)  # fail before loading anything
    checked_k(args.top_k)
    index = SearchIndex.load(args.run_dir)
    if args.text is not None:
        hits = index.query_text(args.text, args.top_k)
        if args.json:
            _print_json(text_query_json(args.text, hits))
        else:
            _print_motion_hits(f"text → motion: “{args.text}”", hits)
        return
    if args.motion is not None:
        query: dict[str, Any] = {"motion_id": args.motion}
        result = index.query_motion_id(args.motion, args.top_k)
    else:
        features = index.read_motion_file(args.motion_file)
        query = {"motion_file": args.motion_file, "frames": int(features.shape[0])}
        result = index.query_motion_features(features, args.top_k)
    if args.json:
        _print_json(motion_query_json(query, result))
        return
    name = args.motion if args.motion is not None else args.motion_file
    _print_caption_hits(f"motion → text: {name} (✓ = one of its own captions)", result.captions)
    _print_motion_hits(f"motion → motion: more like {name}", result.motions)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "index":
            out = build_index(args.run_dir, args.shards, args.split, args.batch_size)
            if int(os.environ.get("RANK", "0")) == 0:
                meta = json.loads((out / META_FILE).read_text(encoding="utf-8"))
                print(f"wrote {out}: {meta['num_motions']} motions, {meta['num_captions']} captions "
                      f"({meta['split']} split, {meta['bundle']} bundle, dim {meta['dim']}, "
                      f"layout {meta['layout'] or 'unknown: no joints'})")
        elif args.command == "query":
            _query(args)
        else:
            from rehamot.retrieval.server import serve

            serve(args.run_dir, args.host, args.port, verbose=args.verbose)
    except (SearchError, FileNotFoundError, NotADirectoryError, ValueError) as err:
        print(f"search: {err}", file=sys.stderr)
        return 2
    finally:
        dist = sys.modules.get("torch.distributed")  # not imported by quick failures: keep them quick
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()
    return 0
