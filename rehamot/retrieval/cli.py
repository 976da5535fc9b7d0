"""Search a trained model from the command line, or serve a local search page.

    rehamot-search index RUN_DIR [--shards DIR] [--split test|all] [--name NAME]
    rehamot-search index RUN_DIR --motions DIR [--name NAME]   (a folder of MOTION_ID.npy, no captions)
    rehamot-search query RUN_DIR "a person jumps twice" [--top-k 5] [--json] [--index NAME]
    rehamot-search query RUN_DIR --motion ID [--top-k 5] [--json]
    rehamot-search query RUN_DIR --motion-file MOTION.npy [--top-k 5] [--json]
    rehamot-search serve RUN_DIR [--host 127.0.0.1] [--port 8000] [--index NAME]

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
    SkippedFile,
    build_folder_index,
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
        captions = "\n".join(hit.captions) if hit.captions else "[dim]no captions[/dim]"
        table.add_row(str(hit.rank), hit.motion_id, f"{hit.score:.3f}", captions)
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
    index = commands.add_parser("index", help="encode a split (or a folder of motions) into RUN_DIR/index/")
    index.add_argument("run_dir")
    index.add_argument("--shards", default=None, help="shard folder or URL prefix (default: the run's data.shards)")
    index.add_argument("--split", default="test", help="a split of the shards, or all")
    index.add_argument("--motions", default=None, metavar="DIR",
                       help="index a folder of MOTION_ID.npy raw features (the model's layout) instead "
                            "of shards; written as RUN_DIR/search-index-NAME/")
    index.add_argument("--name", default=None,
                       help="write RUN_DIR/search-index-NAME/ beside the run's index (default for "
                            "--motions: the folder's name)")
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
    query.add_argument("--index", default=None, metavar="NAME", help="search the index NAME (index --name)")
    serve = commands.add_parser("serve", help="a local search page with animated stick figures")
    serve.add_argument("run_dir")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default: this machine only; the page has no authentication)")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve.add_argument("--verbose", action="store_true", help="log every request to stderr")
    serve.add_argument("--index", default=None, metavar="NAME", help="serve the index NAME (index --name)")
    return parser


def _query(args: argparse.Namespace) -> None:
    given = [name for name in ("text", "motion", "motion_file") if getattr(args, name) is not None]
    if len(given) != 1:
        raise SearchError("give one query: a text, --motion ID or --motion-file MOTION.npy")
    if args.text is not None:
        checked_text(args.text)  # fail before loading anything
    checked_k(args.top_k)
    index = SearchIndex.load(args.run_dir, name=args.index)
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
    if index.caption_ids:
        _print_caption_hits(f"motion → text: {name} (✓ = one of its own captions)", result.captions)
    else:  # a folder of motions: nothing to describe them with
        print("motion → text: no captions in this index")
    _print_motion_hits(f"motion → motion: more like {name}", result.motions)


def _print_skipped(skipped: list[SkippedFile]) -> None:
    if skipped:
        print(f"skipped {len(skipped)} file(s):")
        for item in skipped:
            print(f"  {item.file}: {item.reason}")


def _index(args: argparse.Namespace) -> None:
    skipped: list[SkippedFile] = []
    if args.motions is not None:
        if args.shards is not None or args.split != "test":
            raise SearchError("--motions indexes a folder of motions: drop --shards and --split")
        out, skipped = build_folder_index(args.run_dir, args.motions, args.name, args.batch_size)
    else:
        out = build_index(args.run_dir, args.shards, args.split,
                          args.batch_size, args.name)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    meta = json.loads((out / META_FILE).read_text(encoding="utf-8"))
    source = f"{meta['split']} split" if meta.get("split") else f"the motions of {meta['motions_dir']}"
    print(f"wrote {out}: {meta['num_motions']} motions, {meta['num_captions']} captions "
          f"({source}, {meta['bundle']} bundle, dim {meta['dim']}, "
          f"layout {meta['layout'] or 'unknown: no joints'})")
    _print_skipped(skipped)
    if meta.get("name"):
        print(f"search it: rehamot-search query {args.run_dir} TEXT --index {meta['name']}  "
              f"(serve ... --index {meta['name']})")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "index":
            _index(args)
        elif args.command == "query":
            _query(args)
        else:
            from rehamot.retrieval.server import serve

            serve(args.run_dir, args.host, args.port, verbose=args.verbose, index_name=args.index)
    except (SearchError, FileNotFoundError, NotADirectoryError, ValueError) as err:
        print(f"search: {err}", file=sys.stderr)
        return 2
    finally:
        dist = sys.modules.get("torch.distributed")  # not imported by quick failures: keep them quick
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()
    return 0
