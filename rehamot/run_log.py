"""What the user sees of a run: a rich progress bar, metrics.jsonl and TensorBoard.

Only the main process creates a RunLog; the other ranks get a `NullLog` with the same methods.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class RunLog:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, console: Console | None = None):
        from torch.utils.tensorboard import SummaryWriter  # heavy import: main process only

        self.console = console or Console()
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, status="")
        self.progress.start()

    def step(self, step: int, record: dict[str, Any] | None) -> None:
        self.progress.update(self.task, completed=step)
        if record is None:
            return
        status = (
            f"{record['loss_name']} {record['loss']:.3f} | {record['samples_per_s']:.0f}/s "
            f"| data {record['data_wait_s'] * 1e3:.0f}ms | drop {record['dropped_negatives']:.0f} "
            f"| lr {record.get('lr/motion', 0.0):.1e}"
        )
        self.progress.update(self.task, status=status)
        self.write(record)

    def write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                self.tb.add_scalar(key, value, record["step"])
        self.tb.flush()

    def print(self, *args: Any) -> None:
        self.progress.console.print(*args)

    def close(self) -> None:
        if self.jsonl.closed:
            return
        self.progress.stop()
        self.jsonl.close()
        self.tb.close()


class NullLog:
    def step(self, step: int, record: dict[str, Any] | None) -> None: ...
    def write(self, record: dict[str, Any]) -> None: ...
    def print(self, *args: Any) -> None: ...
    def close(self) -> None: ...
