"""The epoch plan (pure): equal steps on every rank, every visited sample exactly once."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from rehamot.data.pipeline import preflight
from rehamot.data.plan import plan_epoch, shard_order, steps_per_epoch

REPO = Path(__file__).resolve().parents[2]
UNEVEN = [3, 11, 5, 17, 2, 9, 13, 1, 24, 6]  # 91 samples


def positions(plan):
    return [(seg.shard, p) for seg in plan.segments for p in range(seg.first, seg.stop)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
@pytest.mark.parametrize("batch_size", [2, 5])
def test_equal_steps_and_each_sample_at_most_once(world_size, num_workers, batch_size):
    plans = plan_epoch(UNEVEN, seed=7, epoch=3, world_size=world_size, num_workers=num_workers,
                       batch_size=batch_size)
    steps = steps_per_epoch(sum(UNEVEN), world_size, batch_size)
    assert len(plans) == world_size * max(num_workers, 1)
    for rank in range(world_size):
        mine = [p for p in plans if p.rank == rank]
        # A rank's workers deliver batches b % nw == w: together exactly range(steps).
        assert sorted(b for p in mine for b in p.batches) == list(range(steps))
        for p in mine:
            assert p.num_samples == len(p.batches) * batch_size
            assert list(p.batches) == list(range(p.worker, steps, max(num_workers, 1)))
    visited = [pos for p in plans for pos in positions(p)]
    assert len(visited) == len(set(visited)) == steps * world_size * batch_size
    assert sum(UNEVEN) - len(visited) < world_size * batch_size  # only the remainder is left out
    assert all(0 <= pos < UNEVEN[shard] for shard, pos in visited)


def test_shard_order_is_a_seeded_permutation_that_changes_per_epoch():
    orders = [shard_order(10, seed=1, epoch=e) for e in range(4)]
    assert all(sorted(o) == list(range(10)) for o in orders)
    assert len({tuple(o) for o in orders}) == 4
    assert shard_order(10, seed=1, epoch=2) == orders[2]
    assert shard_order(10, seed=2, epoch=2) != orders[2]


def test_slots_read_contiguous_stretches_of_the_permuted_shards():
    plans = plan_epoch(UNEVEN, seed=0, epoch=0, world_size=2, num_workers=2, batch_size=4)
    order = shard_order(len(UNEVEN), 0, 0)
    stream = [(s, p) for s in order for p in range(UNEVEN[s])]
    concatenated = [pos for plan in plans for pos in positions(plan)]  # rank-major
    assert concatenated == stream[: len(concatenated)]
    # The dropped remainder is the tail of this epoch's stream, so it moves between epochs.
    other = plan_epoch(UNEVEN, seed=0, epoch=1, world_size=2, num_workers=2, batch_size=4)
    assert set(concatenated) != {pos for plan in other for pos in positions(plan)}


def test_preflight_names_shards_and_readers():
    with pytest.raises(ValueError, match=r"7 shards.*8 readers \(2 ranks x 4 loader workers\)"):
        preflight(split="train", num_shards=7, num_samples=700, world_size=2, num_workers=4,
                  batch_size=8)
    with pytest.raises(ValueError, match="num_workers <= 3"):
        preflight(split="train", num_shards=7, num_samples=700, world_size=2, num_workers=4,
                  batch_size=8)
    with pytest.raises(ValueError, match=r"15 samples, fewer than one global batch of 2 ranks x 8"):
        preflight(split="train", num_shards=7, num_samples=15, world_size=2, num_workers=1,
                  batch_size=8)
    preflight(split="train", num_shards=8, num_samples=16, world_size=2, num_workers=4,
              batch_size=8)


def test_schema_import_stays_light():
    # shards/ imports rehamot.data.schema; the package's re-exports must not drag torch in.
    code = "import sys, rehamot.data.schema; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_data_never_imports_models_accelerate_or_distributed():
    forbidden = ("rehamot.models", "accelerate", "torch.distributed", "shards", "tests")
    for path in (REPO / "rehamot" / "data").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad = [n for n in names if n.startswith(forbidden)]
            assert not bad, f"{path.name} imports {bad}"
