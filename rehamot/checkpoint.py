"""Atomic checkpoints of a run: accelerate state + data position, `latest`, keep the last k.

Layout under RUN_DIR/checkpoints/:
    step-00000100/          a complete checkpoint (accelerate state files + position.json)
    step-00000200.partial/  a save in progress; never loaded, removed by the next save
    latest                  text file naming the newest complete checkpoint

A save is written into `<name>.partial` by every rank, then the main process writes
position.json and renames the folder; `latest` is replaced with os.replace. A crash or kill -9
at any point leaves the previous checkpoint and `latest` intact. The checkpoint folders are
our own run's files, so accelerate's state files (which pickle RNG states) may be used here;
nothing shared with others is loaded from them (see export.py).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

POSITION_FILE = "position.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file."""

LATEST_FILE = "latest"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
             and not p.name.endswith(".partial") and (p / POSITION_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (by `latest`, falling back to a scan), or None."""
    root = checkpoint_root(run_dir)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / POSITION_FILE).is_file():
            return candidate
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """`latest` with no checkpoint starts fresh (a first cluster job); a path must exist."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if (path / POSITION_FILE).is_file():
        return path
    inner = latest_checkpoint(path)  # a run dir given instead of a checkpoint
    if inner is not None:
        return inner
    raise CheckpointError(f"resume={resume}: no checkpoint there ({path / POSITION_FILE} missing)")


def read_position(ckpt: Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    path = ckpt / POSITION_FILE
    try:
        position = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({err}); resume from another checkpoint") from None
    missing = set(required) - set(position) if isinstance(position, dict) else {"a JSON object"}
    if missing:
        raise CheckpointError(f"{path}: no {', '.join(sorted(missing))}; resume from another checkpoint")
    return position


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    position: dict[str, Any],
    save_state: Callable[[str], Any],
    barrier: Callable[[], None],
    is_main: bool,
    keep: int = 2,
) -> Path:
    """All ranks call this at the same step boundary; returns the final folder."""
    root = checkpoint_root(run_dir)
    final = root / step_name(step)
    partial = root / (step_name(step) + ".partial")
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # re-saving the same step (e.g. end of run right after a save)
            shutil.rmtree(final)
    barrier()
    save_state(str(partial))
    barrier()
    if is_main:
        _write_atomic(partial / POSITION_FILE, json.dumps(position, indent=1, sort_keys=True))
        os.replace(partial, final)
        _write_atomic(root / LATEST_FILE, final.name + "\n")
        for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final
