"""Progress of the steps that take more than a few seconds (text cache, encoding a split).

In a terminal: a rich progress bar, removed when done. Otherwise (a log file, CI, SLURM),
where a bar would collapse into one clipped line: a plain line when the step starts, one
every `every_s` seconds, and one at the end. Both go to stderr, so that stdout stays the
command's result (tables, `--json`).
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")


def track(items: Iterable[T], total: int, description: str, *, enabled: bool = True, unit: str = "batches",
          every_s: float = 30.0, console: Console | None = None) -> Iterator[T]:
    """Yield `items`, showing how far along they are (only where `enabled`, e.g. on rank 0)."""
    if not enabled:
        yield from items
        return
    console = console or Console(stderr=True)
    if console.is_terminal:
        columns = (TextColumn(f"[bold]{description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(description, total=total)
            for item in items:
                yield item
                progress.advance(task)
        return
    started = last = time.perf_counter()
    console.print(f"{description}: {total} {unit} ...", highlight=False)
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= every_s and done < total:
            last = now
            eta = (now - started) / done * (total - done)
            console.print(f"{description}: {done}/{total} {unit}, {now - started:.0f} s, about {eta:.0f} s left",
                          highlight=False)
    console.print(f"{description}: {done} {unit} in {time.perf_counter() - started:.1f} s", highlight=False)
