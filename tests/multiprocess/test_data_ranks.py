"""Real rank processes (gloo) stream uneven shards: equal steps, disjoint samples.

Ranks are fresh interpreters started the way torchrun starts them (this file run as a script,
rank and world size in the environment), so their loader workers fork as in a real launch.
Every step all-reduces across ranks, as the loss's gather does: a rank with fewer batches
would leave the others waiting, and the process group's timeout turns that into a failure.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "unit"))
from data_fixtures import minilm_tokenizer, write_shard_set  # noqa: E402

from rehamot.data.pipeline import DataConfig, TrainStream  # noqa: E402

SIZES = [7, 23, 4, 15, 9, 31, 2, 12, 18, 5]  # 126 samples
B = 5
EPOCHS = 2

pytestmark = pytest.mark.slow


def rank_main(num_workers: int, shards: str, out: str) -> None:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    cfg = DataConfig(shards, batch_size=B, num_workers=num_workers, seed=5, shuffle_buffer=32)
    stream = TrainStream(cfg, minilm_tokenizer(), rank, world_size)
    record = {"steps_per_epoch": stream.steps_per_epoch, "epochs": []}
    for epoch in range(EPOCHS):
        batches = []
        for batch in stream.loader(epoch):
            step_done = torch.ones(1)
            dist.all_reduce(step_done)  # lockstep: hangs, then times out, if counts differ
            assert batch["input_ids"].shape[0] == B and int(step_done) == world_size
            batches.append({"step": batch["step"], "ids": batch["ids"]})
        record["epochs"].append(batches)
        plan = [{"worker": p.worker, "batches": list(p.batches)} for p in stream.plan(epoch)]
        record.setdefault("plans", []).append(plan)
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("world_size", "num_workers"), [(2, 2), (3, 1)])
def test_ranks_get_equal_steps_and_disjoint_samples(tmp_path, monkeypatch, world_size,
                                                   num_workers):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    shards = write_shard_set(tmp_path / "shards", {"train": SIZES})
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(world_size), "PYTHONPATH": str(REPO)}
    ranks = [subprocess.Popen([sys.executable, __file__, str(num_workers), str(shards.root),
                               str(tmp_path)], env={**env, "RANK": str(rank)})
             for rank in range(world_size)]
    assert [p.wait(timeout=120) for p in ranks] == [0] * world_size
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world_size)]
    steps = sum(SIZES) // (world_size * B)
    assert {r["steps_per_epoch"] for r in records} == {steps}
    for epoch in range(EPOCHS):
        seen: list[str] = []
        for record in records:
            batches = record["epochs"][epoch]
            assert [b["step"] for b in batches] == list(range(steps))
            # Workers of one rank also read disjoint samples: group the batches by worker.
            by_worker = [{i for b in batches if b["step"] in p["batches"] for i in b["ids"]}
                         for p in record["plans"][epoch]]
            assert sum(map(len, by_worker)) == len(set().union(*by_worker)) == steps * B
            seen += [i for b in batches for i in b["ids"]]
        assert len(seen) == len(set(seen)) == steps * world_size * B
        assert set(seen) <= set(shards.ids["train"])
    first_epoch = [i for r in records for b in r["epochs"][0] for i in b["ids"]]
    second_epoch = [i for r in records for b in r["epochs"][1] for i in b["ids"]]
    assert first_epoch != second_epoch


if __name__ == "__main__":
    rank_main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
