"""The loader workers' shared-memory ring: slots reused only once the trainer copied them out,
batches the training loop keeps stay intact, a worker never blocks on a consumer that stopped,
and a /dev/shm too small for it falls back to the pipe, leaving nothing behind."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rehamot.data import batch_ring
from rehamot.data.batch_ring import RING_KEY, BatchRing
from rehamot.data.collate import pad_motions


def fill(writer: batch_ring.RingWriter, value: float, frames: int) -> dict:
    """What a loader worker sends for a batch of two motions filled with `value`."""
    out, address = writer.buffer(2, frames)
    motions = [np.full((frames, 3), value, np.float32), np.full((frames - 1, 3), value, np.float32)]
    batch = pad_motions(motions, out=out)
    if address is not None:
        del batch["motion"]
        batch[RING_KEY] = address
    return batch


def test_a_kept_batch_is_not_overwritten_when_its_slot_is_reused():
    ring = BatchRing(workers=1, capacity=1, batch_size=2, max_len=5, feature_dim=3)
    writer = ring.writer(0)
    first = ring.take(fill(writer, 1.0, 4))
    second = ring.take(fill(writer, 2.0, 5))  # the same slot, written again
    assert first["motion"].shape == (2, 4, 3) and second["motion"].shape == (2, 5, 3)
    assert (first["motion"][0] == 1).all() and (first["motion"][1, :3] == 1).all()
    assert (first["motion"][1, 3] == 0).all()  # padding is zero though the slot held data before
    assert (second["motion"][1, 4] == 0).all() and (second["motion"][0] == 2).all()


def test_a_worker_whose_slots_are_not_freed_falls_back_instead_of_blocking(monkeypatch):
    monkeypatch.setattr(batch_ring, "WAIT_S", 0.05)
    ring = BatchRing(workers=1, capacity=2, batch_size=2, max_len=5, feature_dim=3)
    writer = ring.writer(0)
    held = [fill(writer, float(k), 5) for k in range(3)]  # nobody takes: the third finds no slot
    assert [RING_KEY in b for b in held] == [True, True, False]
    assert held[2]["motion"].is_shared() and (held[2]["motion"][0] == 2).all()
    taken = [ring.take(b) for b in held]
    assert [float(b["motion"][0, 0, 0]) for b in taken] == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("shape", [(3, 5, 3), (2, 6, 3)])
def test_a_batch_too_large_for_a_slot_gets_its_own_segment(shape):
    ring = BatchRing(workers=1, capacity=2, batch_size=2, max_len=5, feature_dim=3)
    out, address = ring.writer(0).buffer(shape[0], shape[1])
    assert address is None and tuple(out.shape) == shape and out.is_shared()
    assert torch.count_nonzero(out) == 0


# Two epochs of a 2-worker stream; prints the digest of every batch, then what is left in /dev/shm.
STREAM_SCRIPT = """
import hashlib, json, os, sys
from rehamot.data.pipeline import DataConfig, TrainStream

cfg = DataConfig(sys.argv[1], batch_size=16, num_workers=2, seed=3, shuffle_buffer=8, max_len=60)
stream = TrainStream(cfg, None)
digests = []
for epoch in (0, 1):
    for batch in stream.loader(epoch):
        h = hashlib.sha256()
        for key in sorted(batch):
            value = batch[key]
            h.update(key.encode() + (value.numpy().tobytes() if hasattr(value, "numpy") else json.dumps(value).encode()))
        digests.append(h.hexdigest())
print(json.dumps({"digests": digests, "shm": sorted(os.listdir("/dev/shm"))}))
"""


def stream_in(shards: Path, shm_size: str | None) -> tuple[dict, str]:
    """STREAM_SCRIPT in a subprocess; with shm_size, in its own mount namespace whose /dev/shm is
    a tmpfs of that size (the machine's /dev/shm is untouched)."""
    command = [sys.executable, "-c", STREAM_SCRIPT, str(shards)]
    if shm_size is not None:
        command = ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size={shm_size} tmpfs /dev/shm && "
                   'exec "$@"', "sh", *command]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if shm_size is not None and out.returncode != 0 and "mount" in out.stderr and "Traceback" not in out.stderr:
        pytest.skip(f"cannot mount a small /dev/shm here: {out.stderr.strip()[:200]}")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@pytest.mark.skipif(shutil.which("unshare") is None or not Path("/dev/shm").is_dir(), reason="needs unshare")
def test_a_dev_shm_too_small_for_the_ring_falls_back_to_the_same_batches(tmp_path):
    from data_fixtures import write_shard_set

    write_shard_set(tmp_path, {"train": [40, 40, 40]}, feature_dim=64, frames=(20, 80), seed=5)
    ring, ring_err = stream_in(tmp_path, None)
    # the ring needs 2 workers x 3 slots x 16 x 60 x 64 x 4 B = 1.4 MB; the loader's own
    # semaphores and queues fit in 256 KB, and so do batches sent through the pipe
    small, small_err = stream_in(tmp_path, "256k")
    assert "batch ring" not in ring_err
    warnings = [line for line in small_err.splitlines() if "batch ring" in line]
    assert len(warnings) == 1 and "shared memory" in warnings[0], small_err[-3000:]  # once, not per epoch
    assert len(small["digests"]) == len(ring["digests"]) > 0
    assert small["digests"] == ring["digests"]
    assert small["shm"] == []  # nothing torch named before it failed is left behind
