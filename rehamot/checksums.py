"""Checksums of a folder's files: written last when the folder is made, verified before use.

Checkpoints and exported bundles carry `checksums.json` (the sha256 of every other file), so a
flipped byte, a truncated or missing file, or a stray one is refused with a message naming the
file instead of being loaded silently.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CHECKSUM_FILE = "checksums.json"
CHECKSUM_FORMAT = "rehamot-checksums/1"


class IntegrityError(ValueError):
    """A folder's files do not match their checksums; the message names the file."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE)


def write_checksums(folder: str | Path) -> None:
    """(Re)write FOLDER/checksums.json atomically over the folder's current files."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): sha256_file(p) for p in _files(folder)}
    tmp = folder / (CHECKSUM_FILE + ".tmp")
    tmp.write_text(json.dumps({"format": CHECKSUM_FORMAT, "files": files}, indent=1), encoding="utf-8")
    os.replace(tmp, folder / CHECKSUM_FILE)


def verify_checksums(folder: str | Path, what: str = "folder", error: type[IntegrityError] = IntegrityError) -> None:
    """Raise `error` naming the first file that is missing, extra or altered."""
    folder = Path(folder)
    listing = folder / CHECKSUM_FILE
    try:
        recorded = json.loads(listing.read_text(encoding="utf-8"))
        files = recorded["files"] if recorded.get("format") == CHECKSUM_FORMAT else None
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise error(f"{listing}: missing or unreadable ({type(err).__name__}); this {what} cannot be verified") from None
    if not isinstance(files, dict):
        raise error(f"{listing}: not a {CHECKSUM_FORMAT} listing; this {what} cannot be verified")
    present = {str(p.relative_to(folder)) for p in _files(folder)}
    for name in sorted(set(files) - present):
        raise error(f"{folder / name}: missing from the {what}")
    for name in sorted(present - set(files)):
        raise error(f"{folder / name}: not part of the {what} as saved")
    for name, digest in sorted(files.items()):
        if sha256_file(folder / name) != digest:
            raise error(f"{folder / name}: checksum mismatch: the {what} is damaged")
