"""Shared-memory slots through which loader workers hand their padded motions to the trainer.

A DataLoader worker's tensor crosses to the trainer in a shared-memory segment of its own: a
new segment per batch, whose every page faults in the worker when written and again in the
trainer when read, and is unmapped after. At ~200 KB of motion per sample that was the
largest cost of a loader worker (docs/benchmarks.md). Here each worker gets a ring of
`capacity` slots of one full batch (B, max_len, F), all workers' rings in one segment allocated
once per epoch before the workers start; a worker writes a batch's motions into its next slot
and sends only the slot's number, and the trainer's side copies the (B, T, F) it needs into an
ordinary tensor (pinned memory when CUDA is there: `pin_batches`) and frees the slot. The batch
handed to the training loop owns its memory, whatever the loop keeps of it.

The segment comes from public APIs: `multiprocessing.shared_memory.SharedMemory` names and
creates it, `os.posix_fallocate` reserves its pages (a full /dev/shm is then an error here, not
a SIGBUS in a worker writing a page tmpfs cannot back), and `torch.from_file(shared=True)` maps
it, so that the mapping belongs to a torch storage and lives exactly as long as the tensors on
it. Who unlinks it, and when: only the trainer, once. Forked workers (Linux's default) inherit
the mapping, so the trainer unlinks the name at once and nothing is left in /dev/shm whatever
happens later, SIGKILL included. Spawned (or fork-server) workers map it again by name, without
a SharedMemory of their own (Python < 3.13 would register every attach with the resource
tracker: warnings and double unlinks), so the name lives until the ring is released (garbage
collected, or at the trainer's exit, Ctrl-C and exceptions included); if the trainer is killed
first, multiprocessing's resource tracker, with which the trainer's SharedMemory registered it,
unlinks it once the trainer and its workers are gone. (That tracker is one small process the
first SharedMemory starts beside the trainer, whatever the start method.)

Flow control is a semaphore per worker, `capacity` permits: a worker takes one before writing
a slot, the trainer returns it after its copy. A worker's batches are consumed in the order it
writes them (the DataLoader delivers in order), so the slot a permit frees is the oldest. A
worker never waits longer than WAIT_S for a permit: past that (a consumer that stopped copying)
it sends the batch in a fresh segment, the DataLoader's own way, rather than block.

Shared memory (/dev/shm) per loader worker: capacity x B x max_len x F x 4 bytes, reserved
when allocated: 20 MB at the paper's B = 32 (3 slots, 196 frames, 263 features), 158 MB at
B = 256 -- about what the batches in flight took before, in one place for the epoch. When
/dev/shm cannot hold the ring (a container's 64 MB default), `BatchRing.allocate` says why and
returns None, the segment already removed: the loader then sends whole batches through its pipe
(pipeline.py).
"""
from __future__ import annotations

import math
import multiprocessing
import os
import weakref
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np
import torch

RING_KEY = "ring_slot"  # (worker, slot, frames) of a batch whose motions wait in a ring slot
WAIT_S = 10.0
SHM_DIR = Path("/dev/shm")  # where POSIX shared memory lives (Linux): the ring is mapped by its path


def pin_batches() -> bool:
    """Whether the trainer's batches go to pinned (page-locked) host memory: when CUDA is
    there, so that the trainer's `non_blocking` copies to the device are asynchronous (from
    pageable memory CUDA stages them through a pinned buffer of its own, synchronously)."""
    return torch.cuda.is_available()


def host_tensor(value: np.ndarray | torch.Tensor, pin: bool) -> torch.Tensor:
    """One of a batch's arrays as a tensor owning its memory, pinned when `pin`; one copy at
    most (an unpickled array is a read-only view of the message: copied either way)."""
    if isinstance(value, torch.Tensor):
        return value.pin_memory() if pin and not value.is_pinned() else value
    if not pin:
        return torch.from_numpy(value.copy())
    out = torch.empty(value.shape, dtype=torch.from_numpy(np.empty(0, value.dtype)).dtype, pin_memory=True)
    np.copyto(out.numpy(), value)
    return out


def _map(path: Path, count: int) -> torch.Tensor:
    """The float32 tensor of `count` elements over the shared-memory file at `path`."""
    return torch.from_file(str(path), shared=True, size=count, dtype=torch.float32)


def _unlink(segment: shared_memory.SharedMemory, owner: int) -> None:
    if os.getpid() != owner:  # a forked child exiting through atexit: the segment is not its own
        return
    try:
        segment.unlink()
    except FileNotFoundError:  # someone removed /dev/shm's files under us: nothing left to do
        pass


class BatchRing:
    """Every loader worker's slots for one epoch's DataLoader (created before its workers)."""

    @classmethod
    def allocate(cls, workers: int, capacity: int, batch_size: int, max_len: int, feature_dim: int
                 ) -> tuple[BatchRing | None, str | None]:
        """The ring, or (None, why) when shared memory cannot hold it."""
        try:
            return cls(workers, capacity, batch_size, max_len, feature_dim), None
        except (OSError, RuntimeError) as err:
            size = workers * capacity * batch_size * max_len * feature_dim * 4
            return None, (f"the loader's batch ring needs {size / 2**20:.1f} MB of shared memory ({SHM_DIR}) "
                          f"and could not get it ({str(err).splitlines()[0]}): batches go through the loader "
                          "workers' pipe instead (slower; e.g. docker run --shm-size=1g gives it room)")

    def __init__(self, workers: int, capacity: int, batch_size: int, max_len: int, feature_dim: int) -> None:
        self.capacity, self.batch_size, self.max_len, self.feature_dim = capacity, batch_size, max_len, feature_dim
        # flat slots: a batch of T frames fills the first B*T*F floats of its slot, contiguous
        # (one memcpy to copy out, not B strided runs)
        self.shape = (workers, capacity, batch_size * max_len * feature_dim)
        count = math.prod(self.shape)
        # the workers' start method is the DataLoader's default, the semaphores' context
        context = multiprocessing.get_context()
        self.free = [context.Semaphore(capacity) for _ in range(workers)]
        segment = shared_memory.SharedMemory(create=True, size=count * 4)
        try:
            segment.close()  # its own mapping: the torch storage below maps the file instead
            self.name, self.path = segment.name, SHM_DIR / segment.name
            fd = os.open(self.path, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, count * 4)
            finally:
                os.close(fd)
            self.slots = _map(self.path, count).view(self.shape)
        except BaseException:
            _unlink(segment, os.getpid())
            raise
        if context.get_start_method() == "fork":  # the workers inherit the mapping: no name needed
            _unlink(segment, os.getpid())
            self.path = None
        else:
            weakref.finalize(self, _unlink, segment, os.getpid())

    def __reduce__(self) -> tuple[Any, ...]:
        """A spawned worker's copy: the same segment mapped again by name."""
        if self.path is None:
            raise TypeError("this batch ring was made for forked loader workers: its segment has no name left")
        return _attach, (self.path, self.shape, self.capacity, self.batch_size, self.max_len, self.feature_dim,
                         self.free)

    def view(self, worker: int, slot: int, frames: int) -> torch.Tensor:
        """Slot `slot` of `worker` as a (B, frames, F) tensor."""
        count = self.batch_size * frames * self.feature_dim
        return self.slots[worker, slot, :count].view(self.batch_size, frames, self.feature_dim)

    def writer(self, worker: int) -> RingWriter:
        return RingWriter(self, worker)

    def take(self, batch: dict[str, Any], pin: bool = False) -> dict[str, Any]:
        """Trainer side: the batch with its motions copied out of their slot (into pinned memory
        when `pin`), the slot freed."""
        where = batch.pop(RING_KEY, None)
        if where is not None:
            worker, slot, frames = where
            view = self.view(worker, slot, frames)
            batch["motion"] = torch.empty(view.shape, dtype=view.dtype, pin_memory=True).copy_(view) if pin else view.clone()
            self.free[worker].release()
        return batch


def _attach(path: Path, shape: tuple[int, int, int], capacity: int, batch_size: int, max_len: int,
            feature_dim: int, free: list[Any]) -> BatchRing:
    """The trainer's ring in a spawned worker: mapped, never unlinked here (the trainer does)."""
    if not path.exists():  # torch.from_file would create an empty file of that name
        raise FileNotFoundError(f"{path}: the loader's batch ring is gone")
    ring = BatchRing.__new__(BatchRing)
    ring.capacity, ring.batch_size, ring.max_len, ring.feature_dim = capacity, batch_size, max_len, feature_dim
    ring.shape, ring.name, ring.path, ring.free = shape, path.name, None, free
    ring.slots = _map(path, math.prod(shape)).view(shape)
    return ring


class RingWriter:
    """Worker side: the buffer for the next batch's motions, in this worker's next slot."""

    def __init__(self, ring: BatchRing, worker: int) -> None:
        self.ring, self.worker, self.written = ring, worker, 0

    def buffer(self, batch_size: int, frames: int) -> tuple[torch.Tensor, tuple[int, int, int] | None]:
        """A (batch_size, frames, F) float32 view to fill (all of it: it holds an earlier
        batch), and the ring address to send in its place; (a fresh zeroed tensor in shared
        memory, None) when no slot came free within WAIT_S."""
        ring = self.ring
        if batch_size != ring.batch_size or frames > ring.max_len \
                or not ring.free[self.worker].acquire(timeout=WAIT_S):
            return torch.zeros((batch_size, frames, ring.feature_dim)).share_memory_(), None
        slot = self.written % ring.capacity
        self.written += 1
        return ring.view(self.worker, slot, frames), (self.worker, slot, frames)
