"""Atomic checkpoints of a run: accelerate state + data position, `latest`, keep the last k.

Layout under RUN_DIR/checkpoints/:
    step-00000100/          a complete checkpoint (accelerate state files + position.json)
    step-00000200.partial/  a save in progress; never loaded, removed by the next save
    latest                  text file naming the newest complete checkpoint

A save is written into `<name>.partial` by every rank, then the main process writes
position.json and, last, checksums.json (the sha256 of every file) and renames the folder;
`latest` is replaced with os.replace. A crash or kill -9 at any point leaves the previous
checkpoint and `latest` intact. A checkpoint is trusted only when every file matches its
checksum: `resume=PATH` refuses a damaged one naming the file; `resume=latest` falls back to
the newest intact checkpoint with a warning naming the damaged one. Retention deletes older
checkpoints only after the new one has been read back and verified. A save that cannot be
written (a full disk, a quota) raises CheckpointSaveError, an OSError naming the checkpoint,
and removes its `.partial` folder; the previous checkpoints and `latest` are untouched. The
checkpoint folders are our own run's files, so accelerate's state files (which pickle RNG
states) may be used here; nothing shared with others is loaded from them (see export.py).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch.distributed
from safetensors import SafetensorError

from rehamot import checksums

POSITION_FILE = "position.json"


class CheckpointError(checksums.IntegrityError):
    """A checkpoint that cannot be resumed from; the message names the file."""

LATEST_FILE = "latest"
CHECKSUM_FILE = checksums.CHECKSUM_FILE


class CheckpointSaveError(OSError):
    """A checkpoint that could not be written; `filename` is its folder (the command's OSError
    handler prints it in one line)."""


# What writing a checkpoint's files raises when the disk refuses: OSError; safetensors'
# SafetensorError ("I/O error: No space left on device"); torch.save's RuntimeError from its
# zip writer (whose message, "unexpected pos", says nothing). A RuntimeError of torch.distributed
# is a failed collective, not a write, and keeps its own handling.
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)


@contextmanager
def _saving(final: Path, partial: Path, is_main: bool) -> Iterator[None]:
    try:
        yield
    except WRITE_ERRORS as err:
        if isinstance(err, CheckpointSaveError) or isinstance(err, getattr(torch.distributed, "DistError", ())):
            raise
        if is_main:  # its space back for the rest of the run's files
            shutil.rmtree(partial, ignore_errors=True)
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointSaveError(getattr(err, "errno", None) or errno.EIO,
                                  f"could not save this checkpoint ({type(err).__name__}: {detail}); the "
                                  f"previous checkpoints are intact", str(final)) from err


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


def write_checksums(folder: Path) -> None:
    checksums.write_checksums(folder)


def verify_checkpoint(folder: Path) -> None:
    """Raise CheckpointError naming the first file that is missing, extra or altered."""
    checksums.verify_checksums(folder, "checkpoint", CheckpointError)


def _newest_intact(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that verifies; a damaged newer one is skipped with a warning."""
    newest = latest_checkpoint(run_dir)
    candidates = complete_checkpoints(run_dir)
    if newest is not None and newest in candidates:  # `latest` first, then the others newest first
        candidates.remove(newest)
        candidates.append(newest)
    damaged = []
    for candidate in reversed(candidates):
        try:
            verify_checkpoint(candidate)
        except CheckpointError as err:
            damaged.append(str(err))
            continue
        if damaged:
            print(f"WARNING: {'; '.join(damaged)}. Resuming from the newest intact checkpoint, {candidate}, "
                  "instead.", file=sys.stderr, flush=True)
        return candidate
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {checkpoint_root(run_dir)}: {'; '.join(damaged)}")
    return None


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """The verified checkpoint to resume from. `latest` with no checkpoint starts fresh (a
    first cluster job) and falls back past damaged ones with a warning; a path must exist and
    verify (a run dir given as the path means its `latest`)."""
    if not resume:
        return None
    if resume == "latest":
        return _newest_intact(run_dir)
    path = Path(resume)
    if not (path / POSITION_FILE).is_file():
        inner = latest_checkpoint(path)  # a run dir given instead of a checkpoint
        if inner is None:
            raise CheckpointError(f"resume={resume}: no checkpoint there ({path / POSITION_FILE} missing)")
        path = inner
    verify_checkpoint(path)
    return path


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
    with _saving(final, partial, is_main):
        save_state(str(partial))
    barrier()
    if is_main:
        with _saving(final, partial, is_main):
            _write_atomic(partial / POSITION_FILE, json.dumps(position, indent=1, sort_keys=True))
            write_checksums(partial)  # last: a checkpoint without it is incomplete
            os.replace(partial, final)
            _write_atomic(root / LATEST_FILE, final.name + "\n")
        verify_checkpoint(final)  # read back before anything older is deleted
        for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final
