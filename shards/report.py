"""Rich progress while writing, and the summary table of a shard set."""
from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from rehamot.data.locations import is_url
from shards.hygiene import hygiene_lines


@contextlib.contextmanager
def progress_bar(console: Console | None, total: int) -> Iterator[Callable[[], None]]:
    """Yields `advance()`; one bar over the source motions."""
    console = console or Console(stderr=True)
    columns = (TextColumn("sharding"), BarColumn(), MofNCompleteColumn(), TextColumn("motions"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("sharding", total=total)
        yield lambda: progress.advance(task)


def summary_tables(manifest: dict[str, Any], shard_dir: str | Path | None = None) -> list[Any]:
    """The split and skip tables; MB only for a local folder (a URL's files are not asked)."""
    if shard_dir is not None and is_url(str(shard_dir)):
        shard_dir = None
    shard_dir = None if shard_dir is None else Path(shard_dir)
    splits = Table(title=f"{manifest['corpus']} shards: {manifest['feature_dim']} features at "
                         f"{manifest['fps']:g} fps, {manifest['dtype']}")
    for column in ("split", "motions", "captions", "shards", "MB"):
        splits.add_column(column, justify="left" if column == "split" else "right")
    for name, entry in manifest["splits"].items():
        size = sum((shard_dir / s["path"]).stat().st_size for s in entry["shards"]
                   if shard_dir is not None and (shard_dir / s["path"]).is_file())
        splits.add_row(name, str(entry["motions"]), str(entry["captions"]),
                       str(len(entry["shards"])), f"{size / 1e6:.1f}" if shard_dir else "-")

    skipped = Table(title="skipped")
    for column in ("reason", "level", "count", "example"):
        skipped.add_column(column)
    counts = Counter((s["reason"], s["level"]) for s in manifest["skipped"])
    examples: dict[tuple[str, str], str] = {}
    for s in manifest["skipped"]:
        examples.setdefault((s["reason"], s["level"]), f"{s['id']}: {s['detail']}"[:70])
    for (reason, level), count in sorted(counts.items()):
        skipped.add_row(reason, level, str(count), examples[(reason, level)])
    if not counts:
        skipped.add_row("-", "-", "0", "nothing skipped")
    return [splits, skipped]


def accounting_line(manifest: dict[str, Any]) -> str:
    acc = manifest.get("accounting", {})
    if not acc:
        return ""
    m, c = acc["motions"], acc["captions"]
    return (f"motions named {m['named']} = written {m['written']} + skipped {m['skipped']}; "
            f"captions named {c['named']} = written {c['written']} + skipped {c['skipped']}; "
            f"{acc['samples']} samples (sub-clips included)")


def empty_split_lines(manifest: dict[str, Any]) -> list[str]:
    """What training will do about each standard split without samples."""
    splits = manifest.get("splits", {})
    return [f"split {split!r} has no samples: training refuses to start while data.{split}_split "
            f"names it; point data.{split}_split at a split with samples (or add some)"
            for split in ("train", "val", "test") if not splits.get(split, {}).get("motions")]


def print_summary(manifest: dict[str, Any], shard_dir: str | Path | None = None,
                  console: Console | None = None) -> None:
    console = console or Console()
    for table in summary_tables(manifest, shard_dir):
        console.print(table)
    console.print(accounting_line(manifest))
    for line in empty_split_lines(manifest):
        console.print(f"[bold yellow]warning:[/] {line}", highlight=False)
    console.print(f"mean/std: {manifest['mean_std_source']}")
    findings = hygiene_lines(manifest.get("hygiene", {}))
    if findings:
        console.print("[bold yellow]split hygiene:[/]")
        for line in findings:
            console.print(f"  - {line}", markup=False, highlight=False)
    else:
        console.print("split hygiene: clean")
