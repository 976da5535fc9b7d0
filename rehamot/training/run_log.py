"""What the user sees of a run: progress, metrics.jsonl and TensorBoard.

In a terminal a rich progress bar shows the step, loss, speed and time left; when the output
goes to a file (a log, CI, SLURM) each logged step is one plain line instead, since a progress
bar would collapse into one clipped line there. Only the main process creates a RunLog; the
other ranks get a `NullLog` with the same methods.

metrics.jsonl holds one record per step: a run resumed from step s first drops the records of
steps after s that the stopped run wrote past its checkpoint (a kill -9 between two saves),
since it logs those steps again.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def loss_label(loss_name: str, configured: str | None) -> str:
    """The loss of a step, saying when it is the warm-up before the configured one."""
    if configured is None or loss_name == configured:
        return loss_name
    return f"{loss_name} (warm-up → {configured})"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class RunLog:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, console: Console | None = None,
                 loss_name: str | None = None, resumed: bool = False):
        from torch.utils.tensorboard import SummaryWriter  # heavy import: main process only

        self.console = console or Console()
        self.total_steps, self.start_step, self.loss_name = total_steps, start_step, loss_name
        self.started = time.perf_counter()
        if resumed:
            drop_records_after(run_dir / "metrics.jsonl", start_step)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.progress: Progress | None = None
        if self.console.is_terminal:
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

    def status(self, record: dict[str, Any]) -> str:
        return (
            f"{loss_label(record['loss_name'], self.loss_name)} {record['loss']:.3f} | {record['samples_per_s']:.0f}/s "
            f"| data {record['data_wait_s'] * 1e3:.0f}ms | drop {record['dropped_negatives']:.0f} "
            f"| lr {record.get('lr/motion', 0.0):.1e}"
        )

    def step(self, step: int, record: dict[str, Any] | None) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)
        if record is None:
            return
        if self.progress is not None:
            self.progress.update(self.task, status=self.status(record))
        else:
            done = step - self.start_step
            elapsed = time.perf_counter() - self.started
            eta = elapsed / done * (self.total_steps - step) if done else 0.0
            self.console.print(f"step {step}/{self.total_steps} | {self.status(record)} | "
                               f"elapsed {_duration(elapsed)} | ETA {_duration(eta)}", highlight=False, soft_wrap=True)
        self.write(record)

    def write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                self.tb.add_scalar(key, value, record["step"])
        self.tb.flush()

    def print(self, *args: Any) -> None:
        self.console.print(*args)

    def close(self) -> None:
        if self.jsonl.closed:
            return
        if self.progress is not None:
            self.progress.stop()
        self.jsonl.close()
        self.tb.close()


def drop_records_after(path: Path, step: int) -> None:
    """Rewrite `path` (atomically) without the records of steps after `step`, nor a last line
    the kill cut short; every other line is kept as it was."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    kept = [line if line.endswith("\n") else line + "\n"
            for line in text.splitlines(keepends=True) if _keep(line, step)]
    if "".join(kept) == text:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def _keep(line: str, step: int) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return line.endswith("\n")  # without its newline: a record cut short by the kill
    return not (isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step)


class NullLog:
    def step(self, step: int, record: dict[str, Any] | None) -> None: ...
    def write(self, record: dict[str, Any]) -> None: ...
    def print(self, *args: Any) -> None: ...
    def close(self) -> None: ...
