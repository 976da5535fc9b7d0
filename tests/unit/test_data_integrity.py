"""Training reads only what the manifest describes.

Shards built by make_shards carry per-sample digests (a per-shard index whose sha256 the
manifest holds); every reader checks each sample's members against them as it decodes the
sample. Here real builds are altered the way a careless copy or an in-place "fix" would alter
them, keeping the tar valid and the manifest untouched, and every reader must notice:
the training stream (strict: stop naming shard and sample; else skip and count), the text
cache, the evaluation set and `make_shards.py verify`. Start-up refusals (old format, missing
shard or index) are one line. Also: the .npy header check of schema.decode_motion and the one
list of skip reasons.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub from tests

import numpy as np
import pytest
from shard_fixtures import clean_corpus

from rehamot.data import schema
from rehamot.data.eval_set import EvalSet
from rehamot.data.pipeline import DataConfig, TrainStream
from rehamot.data.reading import BadSampleError, read_manifest
from shards.make_shards import main

DIM = 8
B = 2


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A real build: 12 motions, 8 / 2 / 2, about two samples per shard."""
    root = tmp_path_factory.mktemp("integrity")
    clean_corpus(root / "corpus", n=12, dim=DIM, seed=5)
    out = root / "shards"
    assert main(["humanml3d", "--root", str(root / "corpus"), "--out", str(out),
                 "--feature-dim", str(DIM), "--shard-mb", "0.008"]) == 0
    return out


@pytest.fixture
def shards(built, tmp_path) -> Path:
    """A private copy of the build, free to alter."""
    return Path(shutil.copytree(built, tmp_path / "shards"))


def config(shards: Path, **overrides) -> DataConfig:
    return replace(DataConfig(str(shards), batch_size=B, num_workers=0, seed=3, shuffle_buffer=4),
                   **overrides)


def manifest_of(shards: Path) -> dict:
    return json.loads((shards / schema.MANIFEST_NAME).read_text())


def rewrite(shard: Path, change: Callable[[str, bytes], bytes]) -> list[str]:
    """Rewrite a shard in place, each member's bytes passed through `change(name, data)`: the
    tar stays valid, the manifest is not touched. Returns the keys whose bytes changed."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    changed = []
    shard.chmod(0o644)
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            new = change(member.name, data)
            if new != data:
                changed.append(member.name.split(".", 1)[0])
            member.size = len(new)
            tar.addfile(member, io.BytesIO(new))
    return list(dict.fromkeys(changed))


def motions_set_to(value: float) -> Callable[[str, bytes], bytes]:
    def change(name: str, data: bytes) -> bytes:
        if not name.endswith("." + schema.MOTION_MEMBER):
            return data
        motion = np.load(io.BytesIO(data))
        return schema.encode_motion(np.full_like(motion, value))
    return change


def captions_edited(name: str, data: bytes) -> bytes:
    if not name.endswith("." + schema.META_MEMBER):
        return data
    meta = json.loads(data)
    for caption in meta["captions"]:
        caption["text"] += " (edited)"
    return schema.encode_meta(meta)


def first_planned(stream: TrainStream) -> tuple[Path, int]:
    """The shard and position the stream reads first (slot 0's first segment)."""
    segment = stream.plan(0)[0].segments[0]
    return Path(stream.shard_urls[segment.shard]), segment.first


def keys_of(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar))


# -- the training stream ---------------------------------------------------------------------------
def test_an_altered_shard_stops_a_strict_stream_before_its_first_batch(shards):
    stream = TrainStream(config(shards, strict=True), None)
    shard, position = first_planned(stream)
    assert rewrite(shard, motions_set_to(1e6))
    with pytest.raises(BadSampleError) as error:
        next(iter(stream.loader(0)))  # the batch an optimizer step would take first
    message = str(error.value)
    assert shard.name in message and keys_of(shard)[position] in message
    assert "digest_mismatch" in message


def test_an_altered_shard_is_skipped_and_counted_in_a_non_strict_stream(shards, caplog):
    stream = TrainStream(config(shards), None)
    shard, _ = first_planned(stream)
    altered = rewrite(shard, motions_set_to(1e6))
    with caplog.at_level(logging.WARNING, logger="rehamot.data"):
        batches = list(stream.loader(0))
    assert len(batches) == stream.steps_per_epoch
    seen = {i for batch in batches for i in batch["ids"]}
    assert seen and not seen & set(altered)
    assert all(float(batch["motion"].abs().max()) < 1e3 for batch in batches)
    assert sum(batch["bad_samples"] for batch in batches) >= len(altered)
    assert "digest_mismatch" in caplog.text and shard.name in caplog.text


def test_a_missing_shard_or_index_is_one_line_at_start(shards):
    (shards / "val-000000.tar").unlink()  # not even the training split's
    with pytest.raises(schema.ShardSetError) as error:
        TrainStream(config(shards), None)
    assert "val-000000.tar" in str(error.value) and "\n" not in str(error.value)


def test_a_missing_or_altered_index_is_one_line_at_start(shards):
    record = manifest_of(shards)["splits"]["train"]["shards"][1]
    index = shards / record["index"]
    data = index.read_bytes()
    index.unlink()
    with pytest.raises(schema.ShardSetError) as error:
        TrainStream(config(shards), None)
    assert record["index"] in str(error.value) and "\n" not in str(error.value)
    index.write_bytes(data + b" ")  # still valid JSON, not the bytes the manifest hashed
    with pytest.raises(schema.ShardSetError) as error:
        TrainStream(config(shards), None)
    assert record["index"] in str(error.value) and "sha256" in str(error.value)


def test_old_format_shards_are_refused_with_the_reshard_message(shards):
    manifest = manifest_of(shards)
    manifest["format_version"] = 1
    for split in manifest["splits"].values():
        for record in split["shards"]:
            record.pop("index", None), record.pop("index_sha256", None)
    (shards / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    for read in (lambda: read_manifest(str(shards)), lambda: TrainStream(config(shards), None),
                 lambda: EvalSet(config(shards, split="val"))):
        with pytest.raises(schema.ShardSetError) as error:
            read()
        message = str(error.value)
        assert "make_shards.py" in message and "re-shard" in message and "\n" not in message


# -- evaluation and verify ------------------------------------------------------------------------
def test_the_eval_set_refuses_altered_motions_and_captions(shards):
    shard = shards / manifest_of(shards)["splits"]["val"]["shards"][0]["path"]
    original = shard.read_bytes()
    key = rewrite(shard, motions_set_to(1e6))[0]
    eval_set = EvalSet(config(shards, split="val"))  # only the indexes are read here
    with pytest.raises(ValueError, match=rf"{shard.name}.*{key}.*digest_mismatch"):
        list(eval_set.motion_batches(4))
    shard.write_bytes(original)
    key = rewrite(shard, captions_edited)[0]
    eval_set = EvalSet(config(shards, split="val"))  # the captions are the index's, as sharded
    assert not any(c.text.endswith("(edited)") for c in eval_set.captions)
    with pytest.raises(ValueError, match=rf"{shard.name}.*{key}.*digest_mismatch"):
        list(eval_set.motion_batches(4))  # every member of a sample read is checked


def test_make_shards_writes_an_index_of_every_sample(built):
    manifest = manifest_of(built)
    assert manifest["format_version"] == schema.FORMAT_VERSION == 3
    for split in manifest["splits"].values():
        for record in split["shards"]:
            index = built / record["index"]
            assert hashlib.sha256(index.read_bytes()).hexdigest() == record["index_sha256"]
            assert len(json.loads(index.read_text())["samples"]) == record["samples"]


def test_verify_names_each_altered_sample(shards, capsys):
    shard = shards / "train-000001.tar"
    altered = rewrite(shard, motions_set_to(1e6))
    assert main(["verify", str(shards)]) == 1
    err = capsys.readouterr().err.replace("\n", " ")
    for key in altered:
        assert f"train-000001.tar/{key}: " in err
        assert "digest" in err.split(f"train-000001.tar/{key}: ")[1][:160]
    (shards / manifest_of(shards)["splits"]["test"]["shards"][0]["index"]).unlink()
    assert main(["verify", str(shards)]) == 1
    assert "test-000000.index.json" in capsys.readouterr().err


# -- the text cache -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm():
    import torch

    from rehamot.models import TextEncoder, TextEncoderConfig, load_tokenizer

    torch.manual_seed(0)
    encoder = TextEncoder(TextEncoderConfig(num_layers=1))
    return encoder, load_tokenizer(encoder.cfg)


def cache(lm, shards: Path, cache_dir: Path, **kwargs):
    from rehamot.training import text_cache as tc
    encoder, tokenizer = lm
    return tc.load_or_build(encoder, tokenizer, shards=str(shards), split="train",
                            cache_dir=cache_dir, max_text_len=32, **kwargs)


def test_edited_captions_never_reach_the_text_cache(lm, shards, tmp_path):
    first = cache(lm, shards, tmp_path / "cache")
    stream = TrainStream(config(shards), None)
    shard, position = first_planned(stream)
    edited = rewrite(shard, captions_edited)
    again = cache(lm, shards, tmp_path / "cache").cache  # the manifest alone keys it
    for batch in stream.loader(0):  # every caption served is one the cache was built from
        assert not set(batch["ids"]) & set(edited)
        again.lookup(batch["texts"])
    with pytest.raises(BadSampleError, match=rf"{shard.name}, {keys_of(shard)[position]}: "
                                             r"digest_mismatch"):
        next(iter(TrainStream(config(shards, strict=True), None).loader(0)))
    # built anew: the captions come from the indexes (as sharded), never from the edited tars
    rebuilt = cache(lm, shards, tmp_path / "fresh")
    assert rebuilt.built and rebuilt.bad_samples == 0
    assert not any(text.endswith("(edited)") for text in rebuilt.cache.texts)
    assert set(rebuilt.cache.texts) == set(first.cache.texts)


def test_the_cache_key_covers_the_shard_indexes(built):
    from rehamot.training import text_cache as tc
    manifest = manifest_of(built)
    base = tc.split_content(manifest, "train")
    records = manifest["splits"]["train"]["shards"]
    other = {**manifest, "splits": {"train": {**manifest["splits"]["train"], "shards": [
        {**r, "index_sha256": "0" * 64} if i == 0 else r for i, r in enumerate(records)]}}}
    assert base is not None and tc.split_content(other, "train") != base


def test_a_caption_missing_from_the_cache_names_the_caption_sample_and_shard(tmp_path):
    import torch

    from rehamot.training import text_cache as tc
    found = tc.TextFeatureCache(tmp_path / "c.safetensors", "k", ["a person walks"],
                                torch.zeros(1, 3))
    with pytest.raises(tc.CaptionNotCached) as error:
        found.lookup(["a person walks", "a dog barks"], ids=["000001", "000002"],
                     shards=["train-000000.tar", "train-000003.tar"])
    message = str(error.value)
    assert not isinstance(error.value, KeyError)
    assert "'a dog barks'" in message and "000002" in message and "train-000003.tar" in message
    assert str(tmp_path / "c.safetensors") in message


# -- .npy headers and skip reasons ----------------------------------------------------------------
def header(shape: tuple[int, ...], descr: str = "<f4", payload: bytes = b"\0" * 64) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + payload


@pytest.mark.parametrize("data, error", [
    (header((10**12, DIM)), "NpyHeaderError"),  # 32 TB claimed: refused before any allocation
    (header((2, DIM), payload=b"\0" * 2 * DIM * 4 + b"extra"), "NpyHeaderError"),
    (header((2, DIM), payload=b"\0" * 10), "NpyHeaderError"),
    (header((-1, DIM)), "NpyHeaderError"),
    (header((2,), "|O"), "PickledNpy"),
    (b"\x93NUMPY\x09\x00garbage", "NpyHeaderError"),
])
def test_decode_motion_checks_the_header_before_numpy_allocates(data, error):
    with pytest.raises(getattr(schema, error)):
        schema.decode_motion(data)


def test_decode_motion_and_the_converter_share_one_header_check():
    import shards.npy_header as npy_header

    motion = np.arange(2 * DIM, dtype=np.float16).reshape(2, DIM)
    assert np.array_equal(schema.decode_motion(schema.encode_motion(motion)), motion)
    assert npy_header.NpyHeaderError is schema.NpyHeaderError
    assert npy_header.PickledNpy is schema.PickledNpy
    assert npy_header.check_npy_header is schema.check_npy_header


def test_skip_reasons_are_one_list():
    from shards import plan

    assert plan.SKIP_REASONS is schema.SKIP_REASONS
    assert {"outside_root", "bad_fps", "digest_mismatch"} <= set(schema.SKIP_REASONS)


def test_raw_motions_for_the_index_and_the_generation_evaluator_are_checked(shards):
    from rehamot.data.reading import read_raw_motions

    test_shards = sorted(shards.glob("test-*.tar"))
    clean = read_raw_motions(str(shards), "test")
    assert len(clean) == manifest_of(shards)["splits"]["test"]["motions"]
    altered = rewrite(test_shards[0], motions_set_to(1e6))
    with pytest.raises(ValueError, match=f"{test_shards[0].name}: sample {altered[0]}: digest_mismatch"):
        read_raw_motions(str(shards), "test")
