"""Shared fixtures: offline text models, the demo shards built once per session."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_cli(args: list[str], timeout: float = 600, env: dict[str, str] | None = None, check: bool = True,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"STDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def one_torch_thread():
    """In-process encoding with one thread, like the subprocesses (OMP_NUM_THREADS=1): on shared
    cores, torch's second thread waits for a busy core at every op and makes small models
    several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """A small demo corpus (300 motions) sharded once for the whole test session."""
    out = tmp_path_factory.mktemp("demo") / "shards"
    run_cli([sys.executable, "shards/make_shards.py", "demo", "--motions", "300", "--out", str(out),
             "--workers", "2", "--shard-mb", "2"])
    return out

# Overrides for seconds-long end-to-end runs: a tiny motion tower and a 1-layer MiniLM.
TINY_RUN = [
    "model.d_model=32", "model.layers=1", "model.heads=2", "model.ff=64", "model.embed_dim=64",
    "model.text_layers=1", "model.dropout=0.0", "train.batch_size=16", "data.num_workers=0",
    "train.log_every=1", "train.schedule=constant", "train.eval_batch_size=64", "loss.warmup_steps=2",
    "loss.warmup_epochs=0", "train.lr_warmup_steps=0",
    # an untrained tiny model maps everything close together: 0.75 would drop every negative
    "loss.threshold_motion=0.99", "loss.threshold_text=0.99",
]
# TINY_RUN draws no random number in a step and reads in the main process; the demo config
# does both (dropout, a loader worker). Resume checks add these, or they could not see a
# random number drawn outside the training step.
AS_DEMO_RANDOMNESS = ["model.dropout=0.1", "data.num_workers=1"]


@pytest.fixture(scope="session")
def indexed_run(demo_shards, tmp_path_factory) -> Path:
    """A tiny trained run with its search index, shared by the search tests (they only add
    named indexes beside it)."""
    out = tmp_path_factory.mktemp("indexed") / "run"
    run_cli([sys.executable, "rehamot/train.py", "configs/demo.yaml", *TINY_RUN, f"data.shards={demo_shards}",
             f"run.dir={out}", "train.max_steps=2", "train.val_every=2", "train.save_every=100",
             "data.max_len=100"])  # the model sees 100 frames; the page still shows whole clips
    run_cli([sys.executable, "rehamot/search.py", "index", str(out)])
    return out


def assert_refused(out, *fragments: str) -> None:
    """Exit 2, no traceback, and stderr holds exactly one line: the refusal."""
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr and len(lines) == 1, out.stderr[-3000:]
    assert lines[0].startswith("rehamot: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


class Pipe(io.RawIOBase):
    """A stream that cannot seek, like a URL's."""

    def __init__(self, data: bytes) -> None:
        self.data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self.data.read(min(len(buffer), 1000))
        buffer[: len(chunk)] = chunk
        return len(chunk)
