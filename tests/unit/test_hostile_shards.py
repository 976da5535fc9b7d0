"""Shards, manifests and generated files from others: no reader hangs, runs a command or
inflates a bomb.

Each attack alters a real shard set the way someone handing it over could: the tar only (its
index and the manifest stay valid), the manifest's shard names, or a bundle's data.shards.
Readers follow the index and parse no tar header, so an altered tar costs its shifted samples
(digest_mismatch), never a hang; the one tar reader left, the standard library's that maps
shards made elsewhere (`make_shards.py index`), checks each header's size first. The builders
here are shared with tests/e2e/test_hostile_shards_e2e.py.
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import shutil
import tarfile
import zlib
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

from rehamot.data import locations, schema
from rehamot.data.eval_set import EvalSet
from rehamot.data.pipeline import DataConfig, TrainStream
from rehamot.data.reading import BadSampleError, load_index, member_url, read_manifest, read_segment
from rehamot.evaluation.generation_cli import read_generated
from shards.index_shards import IndexError_, tar_members
from shards.verify import verify_shards

BLOCK = 512


# -- hostile tars (the index and the manifest are left as they were) ------------------------------
def base256(value: int) -> bytes:
    """A 12-byte tar number field in GNU base-256 (negative numbers: two's complement)."""
    if value < 0:
        return b"\xff" + (value % (1 << 88)).to_bytes(11, "big")
    return b"\x80" + value.to_bytes(11, "big")


def header(name: str, kind: bytes, size_field: bytes = b"%011o\0" % 0) -> bytes:
    """A ustar header block with a raw size field and a valid checksum."""
    info = tarfile.TarInfo(name)
    info.type = kind
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    block[124:136] = size_field
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def pax_header(key: str, value: str) -> bytes:
    """A pax extended header (kind x) holding one record, with its data block."""
    line = f" {key}={value}\n".encode()
    length = len(line) + len(str(len(line) + 2))
    body = str(length).encode() + line
    return header("PaxHeaders/x", tarfile.XHDTYPE, b"%011o\0" % len(body)) + body + bytes(-len(body) % BLOCK)


def insert_before_sample(shard: Path, position: int, blocks: bytes) -> None:
    """Put `blocks` just before the first member of the sample at `position` of `shard`."""
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in members))
    first = next(m for m in members if m.name.split(".", 1)[0] == keys[position])
    data = shard.read_bytes()
    shard.chmod(0o644)
    shard.write_bytes(data[:first.offset] + blocks + data[first.offset:])


def negative_directory(shard: Path, position: int = 2) -> None:
    """A directory entry (every reader skips it) of base-256 size -512: skipping `size` bytes
    after its header seeks back onto that header, forever."""
    insert_before_sample(shard, position, header("adir/", tarfile.DIRTYPE, base256(-512)))


def negative_pax_size(shard: Path, position: int = 2) -> None:
    """The same through a pax `size=-1536` record on a `__meta__` member (skipped too): back
    over the member's header, the pax data and the pax header, which says the same again."""
    insert_before_sample(shard, position, pax_header("size", "-1536") + header("__meta__", tarfile.REGTYPE))


def huge_member(shard: Path, position: int = 2, size: int = 10 ** 15) -> None:
    """A regular member claiming `size` bytes (base-256) before the sample at `position`."""
    insert_before_sample(shard, position, header("zzz.txt", tarfile.REGTYPE, base256(size)))


ATTACKS = {"negative directory": negative_directory, "negative pax size": negative_pax_size,
           "huge member": huge_member}


def gzip_bomb(shard: Path, size: int) -> int:
    """Replace `shard` by a gzip of a tar whose first member holds `size` zero bytes (its header
    tells the truth); returns the file's size. Repeated gzip members of one compressed chunk:
    milliseconds to build whatever `size` is."""
    chunk = 1 << 24
    assert size % chunk == 0
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip member
    zeros = compressor.compress(bytes(chunk)) + compressor.flush()
    shard.chmod(0o644)
    with open(shard, "wb") as out:
        out.write(gzip.compress(header("000000.motion.npy", tarfile.REGTYPE, b"%011o\0" % size)))
        for _ in range(size // chunk):
            out.write(zeros)
        out.write(gzip.compress(bytes(2 * BLOCK)))
    return shard.stat().st_size


def point_manifest_at(shards: Path, name: str) -> None:
    """The manifest's first train shard renamed `name` (the file itself is left alone)."""
    manifest = json.loads((shards / schema.MANIFEST_NAME).read_text())
    manifest["splits"]["train"]["shards"][0]["path"] = name
    (shards / schema.MANIFEST_NAME).write_text(json.dumps(manifest))


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    from data_fixtures import write_shard_set  # here: the e2e tests import this module's builders

    return write_shard_set(tmp_path_factory.mktemp("hostile") / "shards", {"train": [6, 6, 6, 6], "test": [5]},
                           feature_dim=5).root


@pytest.fixture
def shards(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "shards"))


def train_shard(shards: Path, number: int = 0) -> Path:
    return shards / f"train-{number:06d}.tar"


# -- 1. no size makes a reader loop, seek backwards or allocate --------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("attack", ATTACKS)
def test_an_impossible_member_size_is_a_bad_shard_named_not_a_hang(shards, attack):
    shard = train_shard(shards)
    ATTACKS[attack](shard)
    with pytest.raises(IndexError_, match=f"{shard.name}: member .* claims -?[0-9]+ bytes"):
        tar_members(shard)  # the standard library's reader, guarded: what `index` maps with
    index = load_index(str(shards), read_manifest(str(shards))["splits"]["train"]["shards"][0])
    raws = list(read_segment(str(shard), index))  # the map is followed: no header is parsed
    assert [index.mismatch(raw, raw["__position__"]) is None for raw in raws] == [True, True] + [False] * 4


@pytest.mark.timeout(60)
@pytest.mark.parametrize("attack", ATTACKS)
def test_a_lenient_training_stream_counts_the_shard_s_samples_as_bad(shards, attack, caplog):
    cfg = DataConfig(str(shards), batch_size=2, num_workers=0, seed=3, shuffle_buffer=4)
    stream = TrainStream(cfg, None)
    shard = Path(stream.shard_urls[stream.plan(0)[0].segments[0].shard])
    ATTACKS[attack](shard)
    with caplog.at_level(logging.WARNING, logger="rehamot.data"):
        batches = list(stream.loader(0))
    assert len(batches) == stream.steps_per_epoch
    assert sum(batch["bad_samples"] for batch in batches) >= 4  # the samples from the altered place on
    assert "digest_mismatch" in caplog.text and shard.name in caplog.text
    with pytest.raises(BadSampleError, match=f"{shard.name}, .*digest_mismatch"):
        list(TrainStream(replace(cfg, strict=True), None).loader(0))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("attack", ATTACKS)
def test_evaluation_and_verify_name_the_shard(shards, attack):
    shard = shards / "test-000000.tar"
    ATTACKS[attack](shard)
    eval_set = EvalSet(DataConfig(str(shards), split="test", batch_size=2))  # reads the index only
    with pytest.raises(ValueError, match="test-000000.tar.*digest_mismatch"):
        list(eval_set.motion_batches(2))
    problems = verify_shards(shards)
    assert any(p.startswith("test-000000.tar: sha256") for p in problems), problems
    assert any(p.startswith("test-000000.tar/000026: digest_mismatch") for p in problems), problems


@pytest.mark.timeout(30)
def test_an_index_mapping_members_out_of_range_counts_the_shard_s_samples(shards, caplog):
    """A map that cannot be followed (negative, beyond the shard, overlapping) is the shard's
    problem: every sample of it is counted bad with that one reason, nothing is read."""
    record = read_manifest(str(shards))["splits"]["train"]["shards"][0]
    index = load_index(str(shards), record)
    for value, why in ((-512, "no tar member"), (10 ** 9, "beyond the shard"), (None, "overlap")):
        offsets = index.offsets.copy()
        offsets[1, 0] = offsets[0, 0] if value is None else value
        altered = schema.ShardIndex(index.shard, index.bytes, index.members, index.keys, offsets, index.sizes,
                                    index.digests, index.captions)
        assert why in altered.problem
    body = json.loads((shards / record["index"]).read_text())
    body["samples"][3][1][0][0] = -1024  # a negative offset, the index re-hashed into the manifest
    (shards / record["index"]).write_text(json.dumps(body))
    manifest = json.loads((shards / schema.MANIFEST_NAME).read_text())
    manifest["splits"]["train"]["shards"][0]["index_sha256"] = __import__("hashlib").sha256(
        (shards / record["index"]).read_bytes()).hexdigest()
    (shards / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    stream = TrainStream(DataConfig(str(shards), batch_size=2, num_workers=0, seed=3, shuffle_buffer=4), None)
    with caplog.at_level(logging.WARNING, logger="rehamot.data"):
        batches = list(stream.loader(0))
    assert len(batches) == stream.steps_per_epoch and list(stream.bad_shards()) == ["train-000000.tar"]
    assert stream.bad_shards()["train-000000.tar"] % 6 == 0  # the whole shard, each time it is read
    assert "shard unreadable" in caplog.text and "no tar member's data can start" in caplog.text


# -- 2. no location read from a file someone handed over runs a command ---------------------------
@pytest.mark.parametrize("name", ["pipe:touch MARKER", "../train-000000.tar", "sub/train-000000.tar",
                                  ".hidden.tar", "-x.tar", "http://host/x.tar", "", None])
def test_a_manifest_names_its_shards_by_plain_file_names(shards, name, tmp_path, monkeypatch):
    point_manifest_at(shards, name)
    monkeypatch.chdir(tmp_path)
    for read in (schema.load_manifest, read_manifest, lambda s: read_manifest(f"file://{s}")):
        with pytest.raises(schema.ShardSetError, match="plain file names"):
            read(str(shards))
    with pytest.raises(schema.ShardSetError, match="plain file names"):
        TrainStream(DataConfig(str(shards), batch_size=2), None)
    assert not (tmp_path / "MARKER").exists()


def test_plain_names_pass():
    for name in ("train-000000.tar", "val-000001.index.json", "Test_1.tar.gz"):
        assert schema.check_file_name(name, "manifest.json") == name


def test_a_local_folder_s_member_stays_a_path(tmp_path, monkeypatch):
    """`.` and `pipe:x` joined must not become the URL `pipe:x`; a path is opened as a file."""
    assert member_url(".", "pipe:touch MARKER") == "./pipe:touch MARKER"
    assert urlparse(member_url(".", "pipe:touch MARKER")).scheme == ""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError):
        locations.open_location(member_url(".", "pipe:touch MARKER"))
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("location", ["pipe:id", " pipe:id", "PIPE:id", "pipe:cat x/manifest.json #://x"])
def test_a_shared_config_s_pipe_location_is_refused(location):
    with pytest.raises(schema.ShardSetError, match=r"bundle/config.yaml: data.shards .*pipe"):
        schema.shared_location(location, "bundle/config.yaml")


@pytest.mark.parametrize("location", ["data/demo", "/srv/shards", "https://host/shards", "s3://bucket/shards",
                                      "file:///srv/shards"])
def test_a_shared_config_s_folder_or_url_passes(location):
    assert schema.shared_location(location, "bundle/config.yaml") == location


# -- 3. a compressed shard is never inflated ------------------------------------------------------
@pytest.mark.timeout(30)
def test_a_gzip_bomb_costs_its_samples_and_is_not_mapped(shards, caplog):
    shard = train_shard(shards)
    compressed = gzip_bomb(shard, 1 << 30)
    assert compressed < 2 << 20  # 1 GiB of zeros in under 2 MB
    stream = TrainStream(DataConfig(str(shards), batch_size=2, num_workers=0, seed=3, shuffle_buffer=4), None)
    with caplog.at_level(logging.WARNING, logger="rehamot.data"):
        batches = list(stream.loader(0))  # the mapped bytes of a 2 MB file: nothing inflated
    assert len(batches) == stream.steps_per_epoch and stream.bad_shards()["train-000000.tar"] >= 6
    with pytest.raises(IndexError_, match="train-000000.tar: a compressed tar"):
        tar_members(shard)


def test_a_member_cap_follows_from_the_feature_dim(pristine):
    assert schema.member_cap(263) == schema.MAX_FRAMES * 263 * 8 + schema.MEMBER_SLACK
    frames = np.zeros((schema.MAX_FRAMES, 263), dtype=np.float64)  # the longest motion passes
    assert len(schema.encode_motion(frames)) <= schema.member_cap(263)
    index = load_index(str(pristine), read_manifest(str(pristine))["splits"]["train"]["shards"][0])
    with pytest.raises(ValueError, match="larger than the 100 bytes"):  # a map is not read past a cap
        list(read_segment(str(train_shard(pristine)), index, max_member=100))


# -- 4. a generated file's header is checked before numpy allocates --------------------------------
def lying_npy(shape: tuple[int, ...]) -> bytes:
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return stream.getvalue() + bytes(4 * 263 * 3)


def test_a_generated_file_claiming_terabytes_is_listed_as_unreadable(tmp_path):
    (tmp_path / "a.npy").write_bytes(lying_npy((10 ** 12, 263)))
    np.save(tmp_path / "b.npy", np.zeros((3, 263), dtype=np.float32))
    found = read_generated(tmp_path, ["a", "b"], lambda motion, what: motion)
    assert list(found["motions"]) == ["b"]
    assert found["unreadable"][0]["file"] == "a.npy"
    assert "header claims shape" in found["unreadable"][0]["reason"]
