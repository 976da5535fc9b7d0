"""Small file helpers shared by the writer and the verifier (no heavy imports here)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def make_dir_like_mkdir(path: Path) -> None:
    """tempfile.mkdtemp makes 0700 folders; give the final one the mode `mkdir` would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
