"""Search a trained model from the command line: text -> top motions, motion -> top captions.

    rehamot-search index RUN_DIR [--shards DIR] [--split test]
    rehamot-search query RUN_DIR "a person jumps twice" [--top-k 5]
    rehamot-search query RUN_DIR --motion ID [--top-k 5]

(or `python rehamot/search.py ...`). The index and its Python API live in
`rehamot.search_index`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from rehamot.search_index import (
    META_FILE,
    CaptionHit,
    MotionHit,
    SearchError,
    SearchIndex,
    _checked_k,
    _checked_text,
    build_index,
)


def _print_motion_hits(query: str, hits: list[MotionHit]) -> None:

    table = Table(title=f"text → motion: “{query}”")
    table.add_column("rank", justify="right")
    table.add_column("motion id", no_wrap=True)
    table.add_column("score", justify="right")
    table.add_column("its captions")
    for hit in hits:
        table.add_row(str(hit.rank), hit.motion_id, f"{hit.score:.3f}", "\n".join(hit.captions))
    Console().print(table)


def _print_caption_hits(motion_id: str, hits: list[CaptionHit]) -> None:

    table = Table(title=f"motion → text: {motion_id} (✓ = one of its own captions)")
    table.add_column("rank", justify="right")
    table.add_column("own", justify="center")
    table.add_column("caption id", no_wrap=True)
    table.add_column("score", justify="right")
    table.add_column("caption")
    for hit in hits:
        table.add_row(str(hit.rank), "✓" if hit.own else "", hit.caption_id, f"{hit.score:.3f}", hit.text)
    Console().print(table)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="encode a split into RUN_DIR/index/")
    index.add_argument("run_dir")
    index.add_argument("--shards", default=None, help="shard folder (default: the run's data.shards)")
    index.add_argument("--split", default="test")
    index.add_argument("--batch-size", type=int, default=128)
    query = commands.add_parser("query", help="top motions for a text, or top captions for --motion ID")
    query.add_argument("run_dir")
    query.add_argument("text", nargs="?", default=None)
    query.add_argument("--motion", default=None, help="search the other way: captions for this motion id")
    query.add_argument("--top-k", type=int, default=5)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "index":
            out = build_index(args.run_dir, args.shards, args.split, args.batch_size)
            if int(os.environ.get("RANK", "0")) == 0:
                meta = json.loads((out / META_FILE).read_text(encoding="utf-8"))
                print(f"wrote {out}: {meta['num_motions']} motions, {meta['num_captions']} captions "
                      f"({meta['split']} split, {meta['bundle']} bundle, dim {meta['dim']})")
        else:
            if (args.text is None) == (args.motion is None):
                raise SearchError("give a query text or --motion ID (one of them)")
            if args.text is not None:
                _checked_text(args.text)  # fail before loading anything
            _checked_k(args.top_k)
            index = SearchIndex.load(args.run_dir)
            if args.motion is not None:
                _print_caption_hits(args.motion, index.query_motion(args.motion, args.top_k))
            else:
                _print_motion_hits(args.text, index.query_text(args.text, args.top_k))
    except (SearchError, FileNotFoundError, NotADirectoryError, ValueError) as err:
        print(f"search: {err}", file=sys.stderr)
        return 2
    finally:
        dist = sys.modules.get("torch.distributed")  # not imported by quick failures: keep them quick
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
