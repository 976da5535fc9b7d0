"""Deterministic tar shards: fixed mtime/owner/mode, members sorted, size-based boundaries.

Boundaries depend only on the encoded bytes, so the same input gives the same shards
whatever the number of workers. Beside each shard goes its index (schema.encode_index: where
each sample's members lie, their digests, the captions), mapped with the standard library's
tar reader once the shard is closed (index_shards.py); the manifest record holds its sha256.

This module is the only code that writes the shard format: the sharding script, the tests'
fixtures and the benchmarks' synthetic shards all call it (`write_split` cuts shards at given
sample counts; a sample whose `motion` is None is written without its motion member, as a
damaged shard would be).
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from rehamot.data import schema
from shards.convert import EncodedSample
from shards.files import file_sha256
from shards.index_shards import our_entries

TAR_BLOCK = 512


def member_bytes(size: int) -> int:
    """Bytes a member takes in a tar: one header block plus its data padded to a block."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def sample_bytes(sample: EncodedSample) -> int:
    motion = 0 if sample.motion is None else member_bytes(len(sample.motion))
    return motion + member_bytes(len(sample.meta))


class SplitWriter:
    """Writes one split's samples, in the order given, into `<split>-%06d.tar` files."""

    def __init__(self, out_dir: Path, split: str, max_bytes: int) -> None:
        self.out_dir, self.split, self.max_bytes = Path(out_dir), split, max_bytes
        self.shards: list[dict[str, Any]] = []
        self._tar: wds.TarWriter | None = None
        self._file = None
        # the open shard's samples in tar order: key, {member: digest}, captions (or why none)
        self._written: list[tuple[str, dict[str, bytes], list[list[str]] | str]] = []
        self._bytes = self._samples = self._captions = 0
        self.samples = self.captions = 0

    def write(self, sample: EncodedSample) -> None:
        size = sample_bytes(sample)
        if self._tar is not None and self._samples and self._bytes + size > self.max_bytes:
            self._close_shard()
        if self._tar is None:
            self._open_shard()
        members = {schema.MOTION_MEMBER: sample.motion, schema.META_MEMBER: sample.meta}
        self._tar.write({"__key__": sample.id, **{k: v for k, v in members.items() if v is not None}})
        self._written.append((sample.id, {m: schema.member_digest(v) for m, v in members.items() if v is not None},
                              schema.meta_captions(sample.meta, sample.id)))
        self._bytes += size
        self._samples += 1
        self._captions += sample.captions
        self.samples += 1
        self.captions += sample.captions

    def end_shard(self) -> None:
        """Close the open shard now: the next sample starts a new one."""
        if self._tar is not None:
            self._close_shard()

    def close(self) -> list[dict[str, Any]]:
        self.end_shard()
        return self.shards

    def split_entry(self) -> dict[str, Any]:
        """The split's record in the manifest (call after `close`)."""
        return {"motions": self.samples, "captions": self.captions, "shards": self.shards}

    def _path(self) -> Path:
        name = schema.SHARD_PATTERN.format(split=self.split) % len(self.shards)
        return self.out_dir / name

    def _open_shard(self) -> None:
        self._file = open(self._path(), "wb")
        # mtime 0, fixed owner and read-only mode: no trace of who built it or when
        self._tar = wds.TarWriter(self._file, user="rehamot", group="rehamot", mode=0o444,
                                  mtime=0, encoder=False)
        self._bytes = self._samples = self._captions = 0
        self._written = []

    def _close_shard(self) -> None:
        path = self._path()
        self._tar.close()
        self._file.close()
        self._tar = self._file = None
        index = self.out_dir / schema.index_name(path.name)
        index.write_bytes(our_entries(path, self._written))
        self.shards.append({"path": path.name, "samples": self._samples,
                            "captions": self._captions, "sha256": file_sha256(path),
                            "index": index.name, "index_sha256": file_sha256(index)})


def write_split(out_dir: Path, split: str, shards: Iterable[Iterable[EncodedSample]]) -> dict[str, Any]:
    """Write one split as the given shards, each holding exactly its samples, in order; return
    the split's manifest record."""
    writer = SplitWriter(out_dir, split, max_bytes=2 ** 62)
    for samples in shards:
        for sample in samples:
            writer.write(sample)
        writer.end_shard()
    writer.close()
    return writer.split_entry()


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write `manifest.json` of a shard set, stamped with this code's shard format; return it."""
    manifest = {"format_version": schema.FORMAT_VERSION, **manifest}
    text = json.dumps(manifest, indent=1, ensure_ascii=False) + "\n"
    (Path(out_dir) / schema.MANIFEST_NAME).write_text(text, encoding="utf-8")
    return manifest


class RunningMoments:
    """Per-feature mean and variance merged sample by sample (Chan et al.), in float64."""

    def __init__(self, dim: int) -> None:
        self.count = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.m2 = np.zeros(dim, dtype=np.float64)

    def add(self, count: int, mean: np.ndarray, m2: np.ndarray) -> None:
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * count / total)
        self.count = total

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        std = np.sqrt(self.m2 / max(self.count, 1))
        return self.mean.astype(np.float32), np.maximum(std, schema.STD_FLOOR).astype(np.float32)
