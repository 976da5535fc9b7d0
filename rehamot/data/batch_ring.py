"""Shared-memory slots through which loader workers hand their padded motions to the trainer.

A DataLoader worker's tensor crosses to the trainer in a shared-memory segment of its own: a
new segment per batch, whose every page faults in the worker when written and again in the
trainer when read, and is unmapped after. At ~200 KB of motion per sample that was the
largest cost of a loader worker (docs/benchmarks.md). Here each worker gets a ring of
`capacity` slots of one full batch (B, max_len, F) allocated once per epoch before the workers
start; a worker writes a batch's motions into its next slot and sends only the slot's number,
and the trainer's side copies the (B, T, F) it needs into an ordinary tensor and frees the
slot. The batch handed to the training loop owns its memory, whatever the loop keeps of it.

Flow control is a semaphore per worker, `capacity` permits: a worker takes one before writing
a slot, the trainer returns it after its copy. A worker's batches are consumed in the order it
writes them (the DataLoader delivers in order), so the slot a permit frees is the oldest. A
worker never waits longer than WAIT_S for a permit: past that (a consumer that stopped copying)
it sends the batch in a fresh segment, the DataLoader's own way, rather than block.

Shared memory (/dev/shm) per loader worker: capacity x B x max_len x F x 4 bytes, reserved
when allocated: 20 MB at the paper's B = 32 (3 slots, 196 frames, 263 features), 158 MB at
B = 256 -- about what the batches in flight took before, in one place for the epoch. When
/dev/shm cannot hold the ring (a container's 64 MB default), `BatchRing.allocate` says why and
returns None: the loader then sends whole batches through its pipe (pipeline.py), and the
segments torch named before it failed are removed, so nothing is left in /dev/shm.
"""
from __future__ import annotations

import math
import multiprocessing
import os
from pathlib import Path
from typing import Any

import torch

RING_KEY = "ring_slot"  # (worker, slot, frames) of a batch whose motions wait in a ring slot
WAIT_S = 10.0


SHM_DIR = Path("/dev/shm")  # where torch names its shared-memory segments (Linux)


def shared_zeros(shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 tensor of zeros allocated in shared memory (batch_ring.py's slots).

    Allocated there directly: `share_memory_` (the public fallback) would build it in private
    memory and copy it; a new segment is zero-filled by the kernel. When shared memory is full,
    torch raises RuntimeError but leaves the segment it had named behind: removed here.
    """
    count = math.prod(shape)
    before = _own_segments()
    try:
        try:
            storage = torch.UntypedStorage._new_shared(count * 4)
            return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape)
        except (AttributeError, TypeError, RuntimeError):
            return torch.zeros(shape, dtype=torch.float32).share_memory_()
    except RuntimeError:
        for name in _own_segments() - before:
            (SHM_DIR / name).unlink(missing_ok=True)
        raise


def _own_segments() -> set[str]:
    """This process's torch segment names in /dev/shm (torch_<pid>_...); none elsewhere."""
    try:
        return {name for name in os.listdir(SHM_DIR) if name.startswith(f"torch_{os.getpid()}_")}
    except OSError:
        return set()


class BatchRing:
    """Every loader worker's slots for one epoch's DataLoader (created before its workers)."""

    @classmethod
    def allocate(cls, workers: int, capacity: int, batch_size: int, max_len: int, feature_dim: int
                 ) -> tuple[BatchRing | None, str | None]:
        """The ring, or (None, why) when shared memory cannot hold it."""
        try:
            return cls(workers, capacity, batch_size, max_len, feature_dim), None
        except RuntimeError as err:
            size = workers * capacity * batch_size * max_len * feature_dim * 4
            return None, (f"the loader's batch ring needs {size / 2**20:.1f} MB of shared memory ({SHM_DIR}) "
                          f"and could not get it ({str(err).splitlines()[0]}): batches go through the loader "
                          "workers' pipe instead (slower; e.g. docker run --shm-size=1g gives it room)")

    def __init__(self, workers: int, capacity: int, batch_size: int, max_len: int, feature_dim: int) -> None:
        self.capacity, self.batch_size, self.max_len, self.feature_dim = capacity, batch_size, max_len, feature_dim
        # flat slots: a batch of T frames fills the first B*T*F floats of its slot, contiguous
        # (one memcpy to copy out, not B strided runs)
        self.slots = [shared_zeros((capacity, batch_size * max_len * feature_dim)) for _ in range(workers)]
        self.free = [multiprocessing.get_context().Semaphore(capacity) for _ in range(workers)]

    def view(self, worker: int, slot: int, frames: int) -> torch.Tensor:
        """Slot `slot` of `worker` as a (B, frames, F) tensor."""
        count = self.batch_size * frames * self.feature_dim
        return self.slots[worker][slot, :count].view(self.batch_size, frames, self.feature_dim)

    def writer(self, worker: int) -> RingWriter:
        return RingWriter(self, worker)

    def take(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Trainer side: the batch with its motions copied out of their slot, the slot freed."""
        where = batch.pop(RING_KEY, None)
        if where is not None:
            worker, slot, frames = where
            batch["motion"] = self.view(worker, slot, frames).clone()
            self.free[worker].release()
        return batch


class RingWriter:
    """Worker side: the buffer for the next batch's motions, in this worker's next slot."""

    def __init__(self, ring: BatchRing, worker: int) -> None:
        self.ring, self.worker, self.written = ring, worker, 0

    def buffer(self, batch_size: int, frames: int) -> tuple[torch.Tensor, tuple[int, int, int] | None]:
        """A (batch_size, frames, F) float32 view to fill (all of it: it holds an earlier
        batch), and the ring address to send in its place; (a fresh zeroed shared tensor,
        None) when no slot came free within WAIT_S."""
        ring = self.ring
        if batch_size != ring.batch_size or frames > ring.max_len \
                or not ring.free[self.worker].acquire(timeout=WAIT_S):
            return shared_zeros((batch_size, frames, ring.feature_dim)), None
        slot = self.written % ring.capacity
        self.written += 1
        return ring.view(self.worker, slot, frames), (self.worker, slot, frames)
