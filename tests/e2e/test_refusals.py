"""Bad settings and broken state end in one line and a non-zero exit, never a traceback or a
"successful" run."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
from conftest import TINY_RUN, assert_refused, run_cli

READ_ONLY = Path("/sys/rehamot-refusal-test")  # sysfs refuses new folders, even to root


def train(overrides: list[str]):
    return run_cli([sys.executable, "rehamot/train.py", "configs/demo.yaml", *TINY_RUN, *overrides], check=False)


@pytest.mark.parametrize("override, fragment", [
    ("train.log_every=0", "train.log_every=0: must be >= 1"),
    ("train.epochs=0", "train.epochs=0: must be >= 1"),
    ("train.max_steps=-3", "train.max_steps=-3: must be >= 1"),
    ("data.num_workers=-1", "data.num_workers=-1: must be >= 0"),
    ("train.lr=nan", "train.lr=nan: must be a finite number"),
    ("loss.threshold_motion=1.5", "loss.threshold_motion=1.5: must be a cosine in (-1, 1]"),
    ("loss.threshold_text=-2", "loss.threshold_text=-2.0: must be a cosine in (-1, 1]"),
])
def test_bad_values_are_refused_before_anything_runs(override, fragment, tmp_path):
    out = train([f"run.dir={tmp_path / 'run'}", override])
    assert_refused(out, fragment)
    assert not (tmp_path / "run").exists()


def test_a_split_without_samples_is_refused_before_training(demo_shards, tmp_path):
    out = train([f"data.shards={demo_shards}", f"run.dir={tmp_path / 'run'}", "data.val_split=nosuch"])
    assert_refused(out, "data.val_split=nosuch: no samples", "splits there: ")
    assert not (tmp_path / "run").exists()


def test_an_unreachable_shard_url_is_one_line_at_once(tmp_path):
    """A mistyped host or port: the first contact is not retried (no minute of retry warnings)."""
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = train([f"data.shards=http://127.0.0.1:{port}/demo", f"run.dir={tmp_path / 'run'}"])
    assert_refused(out, "cannot read the manifest", f"127.0.0.1:{port}/demo/manifest.json")
    assert not (tmp_path / "run").exists()


def test_resume_from_a_path_without_a_checkpoint(demo_shards, tmp_path):
    out = train([f"data.shards={demo_shards}", f"run.dir={tmp_path / 'run'}", f"resume={tmp_path / 'nothing'}"])
    assert_refused(out, "no checkpoint there", str(tmp_path / "nothing"))


def test_a_damaged_checkpoint_is_refused_naming_the_file(demo_shards, tmp_path):
    from rehamot.training import checkpoint as ckpt
    def save_state(path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"weights")

    checkpoint = ckpt.save_checkpoint(tmp_path / "run", 4, {"step": 4, "epoch": 0}, save_state, lambda: None, True)
    position = checkpoint / "position.json"
    position.write_text(position.read_text()[:12])  # truncated after the save
    out = train([f"data.shards={demo_shards}", f"run.dir={tmp_path / 'run'}", "resume=latest"])
    assert_refused(out, "no intact checkpoint", str(position), "checksum mismatch")
    out = train([f"data.shards={demo_shards}", f"run.dir={tmp_path / 'run'}", f"resume={checkpoint}"])
    assert_refused(out, str(position), "checksum mismatch")


@pytest.mark.skipif(os.access("/sys", os.W_OK) and not READ_ONLY.parent.is_dir(), reason="needs a read-only /sys")
def test_an_unwritable_run_dir_is_one_line(demo_shards):
    out = train([f"data.shards={demo_shards}", f"run.dir={READ_ONLY}"])
    assert_refused(out, str(READ_ONLY), "writable")


def test_a_second_run_on_a_locked_run_dir_is_refused_naming_the_holder(demo_shards, tmp_path):
    import json
    import socket
    import subprocess

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        (run_dir / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                                       "slurm_job_id": None, "started": "now"}))
        out = train([f"data.shards={demo_shards}", f"run.dir={run_dir}"])
        assert_refused(out, "is in use by another run", f"pid {holder.pid}")
        assert not (run_dir / "config.yaml").exists()  # nothing of the holder's was touched
    finally:
        holder.kill()
        holder.wait()
