"""The loader workers' shared-memory ring: slots reused only once the trainer copied them out,
batches the training loop keeps stay intact, a worker never blocks on a consumer that stopped,
a /dev/shm too small for it falls back to the pipe, forked and spawned workers deliver the same
batches, and no segment outlives its trainer, however the trainer ends."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rehamot.data import batch_ring
from rehamot.data.batch_ring import RING_KEY, SHM_DIR, BatchRing, host_tensor, pin_batches
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


def test_batches_in_host_memory_without_cuda_are_copies_and_tensors_pass_through():
    """Without CUDA nothing is pinned: the loader's arrays become tensors of their own memory (an
    unpickled array is a read-only view of the message), tensors stay as they are."""
    if torch.cuda.is_available():
        pytest.skip("pinned batches are exercised on a GPU by benchmarks/gpu_device.sh")
    assert pin_batches() is False
    message = np.arange(6, dtype=np.int64).reshape(2, 3)
    message.flags.writeable = False
    tensor = host_tensor(message, pin_batches())
    assert tensor.dtype == torch.int64 and tensor.tolist() == message.tolist() and not tensor.is_pinned()
    tensor[0, 0] = 7  # its own memory, writable
    assert message[0, 0] == 0
    motion = torch.ones(2, 4, 3)
    assert host_tensor(motion, pin_batches()) is motion
    ring = BatchRing(workers=1, capacity=1, batch_size=2, max_len=5, feature_dim=3)
    taken = ring.take(fill(ring.writer(0), 1.0, 4), pin_batches())["motion"]
    assert not taken.is_pinned() and taken.untyped_storage().data_ptr() != ring.slots.untyped_storage().data_ptr()


@pytest.mark.skipif(multiprocessing.get_all_start_methods()[0] != "fork", reason="forked loader workers")
def test_a_ring_for_forked_workers_has_no_name_in_dev_shm_yet_is_shared():
    ring = BatchRing(workers=1, capacity=2, batch_size=2, max_len=5, feature_dim=3)
    assert not (SHM_DIR / ring.name).exists()  # unlinked at once: a killed trainer leaves nothing
    pid = os.fork()
    if pid == 0:  # a forked worker writes its slot
        fill(ring.writer(0), 4.0, 5)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert (ring.take({RING_KEY: (0, 0, 5)})["motion"][0] == 4).all()


# Two epochs of a 2-worker stream (workers started by argv[2]: fork, spawn); prints the digest of
# every batch, then what is left in /dev/shm.
STREAM_SCRIPT = """
import hashlib, json, multiprocessing, os, sys
from rehamot.data.pipeline import DataConfig, TrainStream

multiprocessing.set_start_method(sys.argv[2])
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


def in_own_dev_shm(command: list[str], shm_size: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`command` in its own mount namespace whose /dev/shm is a tmpfs of `shm_size` (the machine's
    is untouched), and what is left in that /dev/shm once it ended (a resource tracker that
    outlives it given up to 5 s)."""
    script = (f'mount -t tmpfs -o size={shm_size} tmpfs /dev/shm || exit 97; "$@"; rc=$?; '
              'for i in $(seq 50); do [ -z "$(ls -A /dev/shm)" ] && break; sleep 0.1; done; '
              'echo LEFT:; ls -A /dev/shm; exit $rc')
    out = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *command], capture_output=True, text=True,
                         timeout=180)
    if out.returncode == 97 or (out.returncode == 1 and "unshare failed" in out.stderr):
        pytest.skip(f"cannot mount a /dev/shm of its own here: {out.stderr.strip()[:200]}")
    before, _, left = out.stdout.rpartition("LEFT:\n")
    return subprocess.CompletedProcess(out.args, out.returncode, before, out.stderr), left.split()


def stream_in(shards: Path, shm_size: str | None, start_method: str = "fork") -> tuple[dict, str]:
    """STREAM_SCRIPT in a subprocess; with shm_size, in a /dev/shm of that size (in_own_dev_shm),
    whose leftovers are returned as "left"."""
    command = [sys.executable, "-c", STREAM_SCRIPT, str(shards), start_method]
    if shm_size is None:
        out, left = subprocess.run(command, capture_output=True, text=True, timeout=180), None
    else:
        out, left = in_own_dev_shm(command, shm_size)
    assert out.returncode == 0, out.stderr[-3000:]
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "left": left}, out.stderr


needs_unshare = pytest.mark.skipif(shutil.which("unshare") is None or not SHM_DIR.is_dir(), reason="needs unshare")


@pytest.fixture(scope="module")
def ring_shards(tmp_path_factory) -> Path:
    from data_fixtures import write_shard_set

    root = tmp_path_factory.mktemp("ring")
    write_shard_set(root, {"train": [40, 40, 40]}, feature_dim=64, frames=(20, 80), seed=5)
    return root


@needs_unshare
def test_a_dev_shm_too_small_for_the_ring_falls_back_to_the_same_batches(ring_shards):
    ring, ring_err = stream_in(ring_shards, None)
    # the ring needs 2 workers x 3 slots x 16 x 60 x 64 x 4 B = 1.4 MB; the loader's own
    # semaphores and queues fit in 256 KB, and so do batches sent through the pipe
    small, small_err = stream_in(ring_shards, "256k")
    assert "batch ring" not in ring_err
    warnings = [line for line in small_err.splitlines() if "batch ring" in line]
    assert len(warnings) == 1 and "shared memory" in warnings[0], small_err[-3000:]  # once, not per epoch
    assert len(small["digests"]) == len(ring["digests"]) > 0
    assert small["digests"] == ring["digests"]
    assert small["shm"] == [] and small["left"] == []  # the segment that could not be reserved is gone


@needs_unshare
def test_spawned_workers_map_the_ring_and_deliver_the_forked_workers_batches(ring_shards):
    forked, _ = stream_in(ring_shards, "64m", "fork")
    spawned, spawned_err = stream_in(ring_shards, "64m", "spawn")
    assert "batch ring" not in spawned_err and "resource_tracker" not in spawned_err, spawned_err[-3000:]
    assert spawned["digests"] == forked["digests"] and len(forked["digests"]) > 0
    assert forked["shm"] == []  # forked workers' rings are never named in /dev/shm
    assert spawned["left"] == forked["left"] == []  # each epoch's ring unlinked by the trainer, once


# A trainer that allocated a ring for its workers (started by argv[1]) and then ends by argv[2].
ENDING_SCRIPT = """
import multiprocessing, os, signal, sys
from rehamot.data.batch_ring import BatchRing

multiprocessing.set_start_method(sys.argv[1])
ring = BatchRing(workers=2, capacity=3, batch_size=4, max_len=10, feature_dim=8)
print(ring.name, flush=True)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
raise KeyboardInterrupt  # Ctrl-C, or any exception out of the training loop
"""


@needs_unshare
@pytest.mark.parametrize("start_method, ending", [("spawn", "kill"), ("spawn", "ctrl-c"), ("fork", "kill")])
def test_no_ring_outlives_its_trainer(start_method, ending):
    out, left = in_own_dev_shm([sys.executable, "-c", ENDING_SCRIPT, start_method, ending], "16m")
    assert out.returncode != 0 and out.stdout.strip().startswith("psm_"), out.stderr[-3000:]
    assert left == []
    if ending != "kill":  # unlinked by the trainer itself, not by the resource tracker after it
        assert "resource_tracker" not in out.stderr, out.stderr[-3000:]
