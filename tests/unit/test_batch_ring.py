"""The loader workers' shared-memory ring: slots reused only once the trainer copied them out,
batches the training loop keeps stay intact, a worker never blocks on a consumer that stopped."""
from __future__ import annotations

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
