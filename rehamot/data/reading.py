"""Reading a shard set: manifest (local dir or URL prefix), shard indexes, samples read through
their index, sample validation.

The index is the map (schema.py): a sample's members are read at the offsets and sizes it
records, nothing more, and no tar header is parsed. A local file is read by seeking to each
sample (one read per sample); any other location (http(s), s3, fsspec's schemes, a `pipe:`) is
read in order from the first wanted sample's offset (a Range request where the scheme has
them), the bytes between wanted members skipped by count. A read cut short is retried by
locations.py, resuming with a Range request at the byte reached inside the mapped sample.
Everything is decoded with schema.decode_motion (never pickle); every sample a reader uses is
first checked against its index's digests (`check_digests`), which `load_indexes` reads and
checks against the manifest's sha256 at start-up.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

import numpy as np

from rehamot.data import schema
from rehamot.data.locations import file_path, is_url, open_location, ranged, scheme
from rehamot.data.locations import join as member_url

log = logging.getLogger("rehamot.data")
_SKIP = 1 << 20  # bytes read at a time when a stream skips unwanted bytes


class BadSample(Exception):
    """A sample that cannot be used (corrupt member, wrong shape, bad JSON, ...).

    `reason` is a schema.SKIP_REASONS code when one names the problem; str() starts with it.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        if reason is not None and reason not in schema.SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {message}" if reason else message)
        self.reason = reason


class BadSampleError(RuntimeError):
    """Raised instead of skipping in strict mode; names the shard and the sample key."""


class ShardReadError(ValueError):
    """A shard cannot be read as its index maps it (cut short, its map out of range): the
    samples from the one named on are lost; the caller decides what that costs."""


def read_manifest(location: str) -> dict[str, Any]:
    """The checked manifest of a shard folder or URL prefix (schema.load_manifest)."""
    return schema.load_manifest(location)


def split_shards(manifest: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """The manifest's shard records [{path, samples, ...}] of one split, in manifest order."""
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ValueError(f"split {split!r} is not in the manifest (it has {sorted(splits)})")
    return list(splits[split]["shards"])


def load_index(location: str, record: dict[str, Any]) -> schema.ShardIndex:
    """A shard's index, checked against the manifest's sha256 (ShardSetError otherwise)."""
    name = schema.index_name(record["path"])
    if record.get("index") != name or not record.get("index_sha256"):
        raise schema.ShardSetError(
            f"{location}: the manifest names no index {name} for {record['path']} (index "
            f"{record.get('index')!r}); {schema.RESHARD}")
    url = member_url(location, name)
    try:
        with open_location(url) as stream:
            data = stream.read()
    except Exception as exn:  # missing file, failed request: the shard set is incomplete
        raise schema.ShardSetError(f"{url}: cannot read this shard index ({type(exn).__name__}: "
                                   f"{str(exn)[:200]}); copy the whole shard folder again, or "
                                   f"{schema.RESHARD}") from exn
    if hashlib.sha256(data).hexdigest() != record["index_sha256"]:
        raise schema.ShardSetError(f"{url}: sha256 differs from the manifest's (the index was "
                                   f"altered or belongs to another build); {schema.RESHARD}")
    try:
        index = schema.ShardIndex.parse(data, record["path"])
    except (ValueError, UnicodeDecodeError) as exn:
        raise schema.ShardSetError(f"{url}: not a shard index ({exn}); {schema.RESHARD}") from exn
    if len(index) != int(record["samples"]):
        raise schema.ShardSetError(f"{url}: lists {len(index)} samples, the manifest says "
                                   f"{record['samples']}; {schema.RESHARD}")
    return index


def load_indexes(location: str, records: list[dict[str, Any]]) -> list[schema.ShardIndex]:
    """The indexes of `records`, in order; a URL prefix is read a few requests at a time."""
    if not is_url(location) or len(records) < 2:
        return [load_index(location, r) for r in records]
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda r: load_index(location, r), records))


def check_digests(index: schema.ShardIndex, raw: dict[str, Any], position: int | None = None
                  ) -> None:
    """BadSample(digest_mismatch) unless the raw sample's members are the ones sharded (see
    schema.ShardIndex.mismatch); hashes the bytes already read, before anything is decoded."""
    problem = index.mismatch(raw, position)
    if problem is not None:
        raise BadSample(problem, reason="digest_mismatch")


# -- reading samples through the index -------------------------------------------------------------
def read_samples(url: str, index: schema.ShardIndex, positions: Iterable[int] | None = None,
                 slots: Sequence[int] | None = None, max_member: int = schema.MAX_MEMBER_BYTES
                 ) -> Iterator[dict[str, Any]]:
    """Raw samples {__key__, __url__, __position__, member: bytes} of `url` at `positions`
    (ascending; default all), with the members of `slots` (default all; index.members order)
    that each sample has, read exactly where the index maps them.

    ShardReadError names the shard when the map cannot be followed (index.problem, a member
    larger than `max_member`: schema.member_cap of the manifest's feature_dim where the caller
    knows it) or the bytes end early: at the first sample concerned, after the ones before it.
    A missing file or a failed request propagates as OSError."""
    positions = range(len(index)) if positions is None else positions
    slots = range(len(index.members)) if slots is None else slots
    if index.problem:
        raise ShardReadError(f"{url}: {index.problem}")
    local = _local_path(url)
    stream: BinaryIO | None = None
    try:
        if local is not None:
            stream = open(local, "rb")  # noqa: SIM115 - closed below
            file_bytes = os.fstat(stream.fileno()).st_size
        at = None  # a stream's position; None: not opened yet
        for position in positions:
            spans = [(int(index.offsets[position, s]), int(index.sizes[position, s]), index.members[s])
                     for s in slots if index.sizes[position, s] >= 0]
            raw: dict[str, Any] = {"__key__": index.keys[position], "__url__": url, "__position__": position}
            if not spans:
                yield raw
                continue
            spans.sort()
            first, end = spans[0][0], spans[-1][0] + spans[-1][1]
            if any(length > max_member for _, length, _ in spans):
                raise ShardReadError(f"{url}: {schema.index_name(index.shard)} maps sample "
                                     f"{position} to a member larger than the {max_member} bytes "
                                     f"a member may hold")
            if local is not None:
                if end > file_bytes:
                    raise ShardReadError(f"{url}: ends at byte {file_bytes}, its index maps sample "
                                         f"{position} to bytes up to {end} (the shard was cut short)")
                data = os.pread(stream.fileno(), end - first, first)
            else:
                if at is None:
                    at = first if ranged(url) else 0
                    stream = open_location(url, at)
                _skip(stream, first - at, url)
                data = _read_exactly(stream, end - first, url, position)
                at = end
            for offset, length, member in spans:
                raw[member] = data[offset - first:offset - first + length]
            yield raw
    finally:
        if stream is not None:
            _close(stream)


def _local_path(url: str) -> str | None:
    """The file behind a local path or file:// URL, None for anything read as a stream."""
    kind = scheme(url)
    if kind == "":
        return url
    return file_path(url) if kind == "file" else None


def _skip(stream: BinaryIO, count: int, url: str) -> None:
    while count > 0:
        chunk = stream.read(min(count, _SKIP))
        if not chunk:
            raise ShardReadError(f"{url}: the stream ended before the bytes its index maps")
        count -= len(chunk)


def _read_exactly(stream: BinaryIO, size: int, url: str, position: int) -> bytes:
    parts, left = [], size
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            raise ShardReadError(f"{url}: the stream ended inside sample {position} (the shard "
                                 f"was cut short)")
        parts.append(chunk)
        left -= len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _close(stream: BinaryIO) -> None:
    """Close a stream; a `pipe:` command's output closed early makes it fail (curl: 23): that
    is the expected consequence of reading part of a shard, not an error of the shard."""
    try:
        stream.close()
    except OSError:
        pass


def read_segment(url: str, index: schema.ShardIndex, first: int = 0, stop: int | None = None,
                 max_member: int = schema.MAX_MEMBER_BYTES) -> Iterator[dict[str, Any]]:
    """Raw samples at positions [first, stop) of one shard, every member (read_samples)."""
    return read_samples(url, index, range(first, len(index) if stop is None else stop), None, max_member)


def read_raw_motions(location: str, split: str, ids: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """The full sharded features of a split's motions (all, or those in `ids`), by id, each
    checked against its shard's digest index before it is decoded (a mismatch or a corrupt
    member is a ValueError naming the shard and sample: these readers never skip)."""
    manifest = read_manifest(location)
    feature_dim = int(manifest["feature_dim"])
    wanted = None if ids is None else set(ids)
    records = split_shards(manifest, split)
    motions: dict[str, np.ndarray] = {}
    for record, index in zip(records, load_indexes(location, records)):
        url = member_url(location, record["path"])
        positions = [p for p, key in enumerate(index.keys) if wanted is None or key in wanted]
        try:
            for raw in read_samples(url, index, positions, [0], schema.member_cap(feature_dim)):
                motions[raw["__key__"]] = decode_indexed(index, raw, feature_dim, captions=False)[1]
        except BadSample as bad:
            raise ValueError(f"{url}: sample {raw['__key__']}: {bad}") from None
    return motions


def decode_indexed(index: schema.ShardIndex, raw: dict[str, Any], feature_dim: int,
                   captions: bool = True) -> tuple[list[list[str]], np.ndarray]:
    """(captions, motion) of a raw sample read through `index`, its members checked against
    their digests first; BadSample saying what is wrong otherwise. `captions=False`: the
    motion alone matters (the captions are not judged)."""
    position = raw["__position__"]
    check_digests(index, raw, position)
    texts = index.captions[position]
    if captions and isinstance(texts, str):
        raise BadSample(texts)
    if index.motion not in raw:
        raise BadSample(f"no .{index.motion} member")
    return texts, decode_motion_member(raw[index.motion], feature_dim)


def decode_motion_member(data: bytes, feature_dim: int) -> np.ndarray:
    """The (T, F) float motion, checked for shape and finite values."""
    try:
        motion = schema.decode_motion(data)
    except Exception as exn:  # whatever a malformed .npy raises (it is never unpickled)
        raise BadSample(f"unreadable motion.npy: {exn}") from exn
    if motion.ndim != 2 or motion.shape[0] < 1 or motion.shape[1] != feature_dim:
        raise BadSample(f"motion shape {motion.shape}, expected (T>=1, {feature_dim})")
    if motion.dtype.kind != "f":
        raise BadSample(f"motion dtype {motion.dtype}, expected float")
    if not np.isfinite(motion).all():
        raise BadSample("motion contains NaN or inf")
    return motion


class RateLimitedWarning:
    """logger.warning for the first `first` messages, then at most one per `every_s` seconds,
    saying how many were suppressed (a corrupt shard must not flood the log)."""

    def __init__(self, logger: logging.Logger, first: int = 5, every_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.first, self.every_s, self.clock = logger, first, every_s, clock
        self.calls, self.suppressed, self.last = 0, 0, float("-inf")

    def __call__(self, message: str) -> bool:
        """Returns whether the message was logged."""
        self.calls += 1
        now = self.clock()
        if self.calls > self.first and now - self.last < self.every_s:
            self.suppressed += 1
            return False
        if self.suppressed:
            message += f" ({self.suppressed} similar messages suppressed)"
        self.logger.warning(message)
        self.last, self.suppressed = now, 0
        return True
