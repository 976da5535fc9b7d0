"""The training batches are pinned: same samples, crops, captions, tokens, order and bad-sample
counts as the loader this project shipped before its fast path, bit for bit.

The digests below were recorded with that loader (per-sample tarfile reading, np.load, per-sample
normalisation, per-batch tokenisation) on the same fixture. A change that moves a crop, a
caption draw, a token or a bad-sample count fails here; a deliberate change of the data order
must say so and re-pin.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from data_fixtures import minilm_tokenizer, truncate_inside_sample, write_shard_set

from rehamot.data.pipeline import DataConfig, TrainStream

SIZES = [9, 14, 6, 17, 11, 8]  # 65 samples, uneven shards
BAD = {4: "npy", 20: "nan", 33: "json", 41: "pickle"}
B = 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    clean = tmp_path_factory.mktemp("pinned")
    write_shard_set(clean, {"train": SIZES}, feature_dim=7, frames=(20, 60), seed=4, bad=BAD)
    cut = tmp_path_factory.mktemp("pinned-truncated")
    shutil.copytree(clean, cut, dirs_exist_ok=True)
    truncate_inside_sample(cut / "train-000003.tar", 9)  # an interrupted copy: 8 samples lost
    return {"clean": str(clean), "truncated": str(cut)}


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_tokenizer()


def batches_digest(batches: list[dict]) -> str:
    """sha256 of everything a batch carries, in order."""
    h = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            value = batch[key]
            h.update(key.encode())
            if isinstance(value, torch.Tensor):
                h.update(f"{value.dtype}{tuple(value.shape)}".encode())
                h.update(np.ascontiguousarray(value.numpy()).tobytes())
            else:
                h.update(json.dumps(value).encode())
    return h.hexdigest()


CASES = {
    # name: (shards, DataConfig overrides, rank, world, epoch, start step, tokenised)
    "in-process": ("clean", {}, 0, 1, 0, 0, True),
    "two-workers-bucketed": ("clean", {"num_workers": 2, "length_buckets": 3}, 0, 1, 1, 0, True),
    "rank-1-of-2": ("clean", {"num_workers": 1, "min_len": None}, 1, 2, 2, 0, True),
    "resumed-mid-epoch": ("clean", {"num_workers": 2, "length_buckets": 2}, 0, 1, 1, 5, True),
    "truncated-shard": ("truncated", {"num_workers": 2}, 0, 1, 0, 0, True),
    "untokenised": ("clean", {"shuffle_buffer": 0}, 0, 1, 3, 0, False),
}

PINNED = {  # case: (bad samples met, sha256 of the batches)
    "in-process": (4, "3c79b9365dbe58ec112d64025631b677cf836ab8bf2f6be9f281b2fb0497bf5e"),
    "rank-1-of-2": (2, "0da715cc4d0fc314e87ddd18b2007d0a1f30ca5f90f0d2c2b39f755f2b7fddd6"),
    "resumed-mid-epoch": (2, "cff040634405d6e0a6e7d7f2471453a5dcda858176ca348c02052d2fee3a0f9b"),
    "truncated-shard": (13, "b14b536ef221ab0fff8f05f1202d4c68f7eb8dd484f36f5895e9c1e43fbb392e"),
    "two-workers-bucketed": (4, "77a56aa3373b95ea4a3fc917deac642a622b31b27e638a1d862004cfe0728a3b"),
    "untokenised": (4, "ee6d73999c18bf21ff129347bfe5caf4258d0d323dacea127726144ed6c88549"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_batches_are_the_pinned_ones(shards, tokenizer, case):
    where, overrides, rank, world, epoch, start, tokenised = CASES[case]
    base = DataConfig(shards[where], batch_size=B, num_workers=0, seed=9, shuffle_buffer=12,
                      min_len=10, max_len=40, max_text_len=12)
    stream = TrainStream(replace(base, **overrides), tokenizer if tokenised else None, rank, world)
    batches = list(stream.loader(epoch, start))
    assert len(batches) == stream.steps_per_epoch - start
    bad = sum(b["bad_samples"] for b in batches)
    print(f'"{case}": ({bad}, "{batches_digest(batches)}"),')
    assert (bad, batches_digest(batches)) == PINNED[case]
