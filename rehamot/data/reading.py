"""Reading a shard set: manifest (local dir or URL prefix), shard indexes, shard segments,
sample validation.

Everything is decoded with schema.decode_motion / decode_meta (never pickle); webdataset's own
decoders are not used. Every sample a reader uses is first checked against its shard's index
of per-sample digests (`check_digests`), which `load_indexes` reads and checks against the
manifest's sha256 at start-up.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import Any

import numpy as np
from webdataset.tariterators import base_plus_ext

from rehamot.data import schema
from rehamot.data.locations import is_url
from rehamot.data.locations import join as member_url
from rehamot.data.tar_stream import open_samples, open_stream

log = logging.getLogger("rehamot.data")


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
        with open_stream(url) as stream:
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


class _MemberFilter:
    """The select predicate of tar_stream.open_samples (webdataset's select_files): members of
    the samples wanted, read without touching the data of the others (skipped, never decoded).

    Drops the first `skip` samples (a segment starting inside a shard), samples whose key
    `want_key` rejects, and members whose extension is not in `members` (when given).
    """

    def __init__(self, skip: int = 0, members: frozenset[str] | None = None,
                 want_key: Callable[[str], bool] | None = None) -> None:
        self.skip, self.members, self.want_key = skip, members, want_key
        self.seen, self.last = 0, None

    def __call__(self, fname: str) -> bool:
        key, ext = base_plus_ext(fname)
        if key is None:
            return False
        if key != self.last:
            self.last, self.seen = key, self.seen + 1
        if self.seen <= self.skip or (self.members is not None and ext not in self.members):
            return False
        return self.want_key is None or self.want_key(key)


def read_segment(url: str, first: int = 0, stop: int | None = None,
                 max_member: int = schema.MAX_MEMBER_BYTES) -> Iterator[dict[str, Any]]:
    """Raw samples {__key__, __url__, member: bytes} at positions [first, stop) of one shard.

    Errors of the tar itself (missing file, truncation, a member of impossible size: see
    tar_stream; `max_member` bounds a stream's, schema.member_cap of the manifest's
    feature_dim where the caller knows it) propagate: the caller decides whether the rest of
    the segment is lost or fatal.
    """
    samples = open_samples(url, _MemberFilter(skip=first), max_member)
    with closing(samples):
        for position, raw in enumerate(samples, start=first):
            if stop is not None and position >= stop:
                return
            yield raw


def read_members(url: str, members: frozenset[str] | None = None,
                 want_key: Callable[[str], bool] | None = None,
                 max_member: int = schema.MAX_MEMBER_BYTES) -> Iterator[dict[str, Any]]:
    """Raw samples of a whole shard restricted to some members and/or keys (the data of the
    others is skipped unread). A sample with none of the members is not yielded."""
    samples = open_samples(url, _MemberFilter(members=members, want_key=want_key), max_member)
    with closing(samples):
        yield from samples


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
        keep = None if wanted is None else wanted.__contains__
        for raw in read_members(url, frozenset({schema.MOTION_MEMBER}), want_key=keep,
                                max_member=schema.member_cap(feature_dim)):
            try:
                check_digests(index, raw)
                motions[raw["__key__"]] = decode_motion_member(raw[schema.MOTION_MEMBER], feature_dim)
            except BadSample as bad:
                raise ValueError(f"{url}: sample {raw['__key__']}: {bad}") from None
    return motions


def decode_sample(raw: dict[str, Any], feature_dim: int) -> tuple[dict[str, Any], np.ndarray]:
    """(meta, motion) of a raw sample, or BadSample saying what is wrong with it."""
    if schema.MOTION_MEMBER not in raw:
        raise BadSample(f"no .{schema.MOTION_MEMBER} member")
    return decode_meta_member(raw), decode_motion_member(raw[schema.MOTION_MEMBER], feature_dim)


def decode_meta_member(raw: dict[str, Any]) -> dict[str, Any]:
    """The sample's JSON, checked: its id is the key and it has usable captions."""
    if schema.META_MEMBER not in raw:
        raise BadSample(f"no .{schema.META_MEMBER} member")
    try:
        meta = schema.decode_meta(raw[schema.META_MEMBER])
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise BadSample(f"unreadable json: {exn}") from exn
    if not isinstance(meta, dict) or meta.get("id") != raw.get("__key__"):
        found = meta.get("id") if isinstance(meta, dict) else None
        raise BadSample(f"json id {found!r} differs from the key")
    captions = meta.get("captions")
    if not isinstance(captions, list) or not captions or not all(
        isinstance(c, dict) and isinstance(c.get("caption_id"), str)
        and isinstance(c.get("text"), str) and c["text"].strip() for c in captions
    ):
        raise BadSample("json has no usable captions")
    return meta


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
