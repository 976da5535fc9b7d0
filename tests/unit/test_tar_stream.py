"""The fast tar reader yields what webdataset yields, refuses what is broken; the fast .npy path
decodes what np.load decodes."""
from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import Pipe
from data_fixtures import truncate_inside_sample, write_shard_set

from rehamot.data import schema
from rehamot.data.reading import _MemberFilter
from rehamot.data.tar_stream import TarStreamError, open_samples, tar_samples


def webdataset_samples(url: str, select=None) -> list[dict]:
    return list(wds.tarfile_samples(iter([{"url": url}]), select_files=select))


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    return write_shard_set(tmp_path_factory.mktemp("tars"), {"train": [13, 7]}, feature_dim=5)


@pytest.mark.parametrize("skip", [0, 4])
def test_same_samples_as_webdataset_on_written_shards(shard_set, skip):
    for path in shard_set.shard_paths("train"):
        ours = list(open_samples(str(path), _MemberFilter(skip=skip)))
        assert ours == webdataset_samples(str(path), _MemberFilter(skip=skip))
        assert len(ours) == len(list(open_samples(str(path)))) - skip


def test_member_and_key_selection_match_webdataset(shard_set):
    path = str(shard_set.shard_paths("train")[0])
    wanted = {"000002", "000007"}.__contains__
    select = _MemberFilter(members=frozenset({schema.MOTION_MEMBER}), want_key=wanted)
    ours = list(open_samples(path, select))
    assert [s["__key__"] for s in ours] == ["000002", "000007"]
    assert all(set(s) == {"__key__", "__url__", schema.MOTION_MEMBER} for s in ours)
    again = _MemberFilter(members=frozenset({schema.MOTION_MEMBER}), want_key=wanted)
    assert ours == webdataset_samples(path, again)


def write_tar(path: Path, members: list[tuple[str, bytes]], fmt: int) -> None:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_long_names_directories_and_metadata_members(tmp_path, fmt):
    long_dir = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "d" * 90  # ustar: prefix field
    members = [("__meta__", b"skipped"), (f"{long_dir}/{'k' * 30}.json", b"{}"),
               (f"{long_dir}/{'k' * 30}.MOTION.npy", b"abc"), ("two.json", b"[]"),
               ("two.motion.npy", b""), ("three.txt", b"x" * 1025)]
    path = tmp_path / "t.tar"
    write_tar(path, members, fmt)
    with tarfile.open(path, "a", format=fmt) as tar:
        tar.addfile(tarfile.TarInfo("adir/"))  # not a regular file: skipped
    ours = list(open_samples(str(path)))
    assert ours == webdataset_samples(str(path))
    assert [s["__key__"] for s in ours] == [f"{long_dir}/{'k' * 30}", "two", "three"]
    assert ours[0]["motion.npy"] == b"abc"  # the extension is lower-cased, as webdataset does


def test_a_cut_member_and_a_bad_header_raise(shard_set, tmp_path):
    path = tmp_path / "cut.tar"
    path.write_bytes(shard_set.shard_paths("train")[0].read_bytes())
    truncate_inside_sample(path, 5)
    samples = open_samples(str(path))
    assert len([next(samples) for _ in range(5)]) == 5  # the samples before the cut are whole
    with pytest.raises(TarStreamError, match="unexpected end of data"):
        next(samples)
    data = bytearray(shard_set.shard_paths("train")[1].read_bytes())
    data[1024 + 3] ^= 0xFF  # the second member's header
    with pytest.raises(TarStreamError, match="checksum"):
        list(tar_samples(io.BytesIO(bytes(data)), "altered.tar"))


def test_a_repeated_member_raises_like_webdataset(tmp_path):
    path = tmp_path / "dup.tar"
    write_tar(path, [("a.json", b"1"), ("a.json", b"2")], tarfile.PAX_FORMAT)
    with pytest.raises(ValueError, match="duplicate"):
        webdataset_samples(str(path))
    with pytest.raises(TarStreamError, match="duplicate"):
        list(open_samples(str(path)))


def test_a_compressed_or_unseekable_stream_is_still_read(shard_set):
    raw = shard_set.shard_paths("train")[1].read_bytes()
    expected = list(open_samples(str(shard_set.shard_paths("train")[1])))

    unseekable = list(tar_samples(io.BufferedReader(Pipe(raw)), expected[0]["__url__"]))
    assert unseekable == expected
    compressed = list(tar_samples(io.BytesIO(gzip.compress(raw)), expected[0]["__url__"]))
    assert compressed == expected


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(3, 4), np.ones((2, 5), dtype=">f8"),
    np.asfortranarray(np.arange(6, dtype=np.float16).reshape(2, 3)), np.zeros((0, 263), np.float32),
    np.float32(2.5), np.arange(4, dtype=np.int64)])
@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_the_fast_npy_path_decodes_what_np_load_decodes(array, version):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version)
    data = buffer.getvalue()
    assert schema._NPY_SAVED_HEADER.match(data)  # the fast path is taken
    decoded = schema.decode_motion(data)
    expected = np.load(io.BytesIO(data))
    assert decoded.dtype == expected.dtype and decoded.shape == expected.shape
    assert np.array_equal(decoded, expected)
    with pytest.raises(schema.NpyHeaderError, match="bytes"):
        schema.decode_motion(data[:-1] if array.size else data + b"\0")


def test_a_cut_inside_a_skipped_member_is_still_found(shard_set, tmp_path):
    """Skipping an unselected member seeks; a seek past the end must not read as a clean end."""
    path = tmp_path / "cut.tar"
    path.write_bytes(shard_set.shard_paths("train")[0].read_bytes())
    truncate_inside_sample(path, 5)
    only_json = _MemberFilter(members=frozenset({schema.META_MEMBER}))
    samples = open_samples(str(path), only_json)
    assert len([next(samples) for _ in range(5)]) == 5
    with pytest.raises(TarStreamError, match="unexpected end of data"):
        next(samples)


def test_stopping_early_on_a_pipe_is_not_an_error(tmp_path, recwarn):
    """A slot reads part of a shard: closing a `pipe:` URL's command early (curl then exits
    23, a write error) must end the segment quietly, not as an error of the shard."""
    from rehamot.data.reading import read_segment

    big = write_shard_set(tmp_path, {"train": [12]}, feature_dim=263, frames=(150, 200))
    path = big.shard_paths("train")[0]  # ~2 MB: more than a pipe buffers
    url = f"pipe:cat {path} || exit 23"
    assert [s["__key__"] for s in read_segment(url, 2, 5)] == ["000002", "000003", "000004"]
    samples = open_samples(url)
    next(samples)
    samples.close()  # the consumer stops after one sample
    assert not [w for w in recwarn if "unraisable" in str(w.category).lower()]
