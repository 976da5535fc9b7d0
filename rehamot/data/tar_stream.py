"""Samples of an uncompressed tar stream, grouped by key as webdataset groups them, fast.

Python's tarfile builds a TarInfo per member (about 35 µs of header parsing each) and
webdataset adds a generator layer per member and per sample: together ~230 µs a sample, about
40 % of the loader's time on the demo shards; this reader takes ~40 (docs/benchmarks.md). Our shards are plain tars
written by webdataset's TarWriter, so this reader parses their 512-byte headers directly:
ustar and GNU headers, with the POSIX pax (`x`) and GNU long-name (`L`) records tarfile writes
for long names, checksums verified. It yields what `webdataset.tarfile_samples` yields for the
same stream ({__key__, __url__, lower-cased extension: bytes}), with the same key rule
(webdataset's base_plus_ext), the same skipped names (`__...__` metadata) and the same refusal
of a member repeated within a sample. A stream that does not start with a tar header (a
compressed shard) is handed to webdataset unchanged.

Errors: a member cut short, a header cut short or failing its checksum, and a repeated member
raise TarStreamError (the caller decides what the rest of the shard is worth); the archive
ends at its end-of-archive block or at a clean end of the stream.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any, BinaryIO

import webdataset as wds
from webdataset.tariterators import base_plus_ext

BLOCK = 512
_REGULAR = frozenset(b"07\0")  # file, contiguous file, old-style file
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta


class TarStreamError(ValueError):
    """The tar stream is malformed or cut short at the point named."""


def _number(field: bytes) -> int:
    """A header number: octal digits, or GNU base-256 when the first byte's high bit is set."""
    if field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] == 0xFF else value
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _valid_header(block: bytes) -> bool:
    """The header's checksum (its bytes summed with the checksum field as spaces) matches."""
    try:
        recorded = _number(block[148:156])
    except ValueError:
        return False
    unsigned = sum(block) - sum(block[148:156]) + 8 * 0x20
    return recorded == unsigned


def _pax_records(data: bytes) -> dict[str, str]:
    """`length key=value\\n` records of a pax extended header."""
    records, at = {}, 0
    while at < len(data) and data[at:at + 1] != b"\0":
        space = data.index(b" ", at)
        length = int(data[at:space])
        if length <= 0:
            raise TarStreamError("malformed pax record")
        key, _, value = data[space + 1:at + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        at += length
    return records


class _Members:
    """(name, size, is_regular) of each member; the consumer may take the member's data with
    `data()` before asking for the next one, else it is skipped unread."""

    def __init__(self, stream: BinaryIO, where: str) -> None:
        self.stream, self.where = stream, where
        # skipping seeks in a file; a seek past its end succeeds silently, so the end is checked
        self.end = _file_size(stream)
        self.seekable = self.end is not None
        self.pending, self.name = 0, ""

    def _read(self, size: int, what: str) -> bytes:
        data = self.stream.read(size)
        if len(data) != size:
            raise TarStreamError(f"{self.where}: unexpected end of data in {what} "
                                 f"({len(data)} of {size} bytes)")
        return data

    def data(self) -> bytes:
        """The current member's bytes."""
        data, self.pending = self._read(self.pending, self.name), 0
        return data

    def _skip(self, size: int) -> None:
        if size and self.seekable and self.stream.seek(size, 1) > self.end:
            raise TarStreamError(f"{self.where}: unexpected end of data in {self.name}")
        while size and not self.seekable:
            chunk = self.stream.read(min(size, 1 << 20))
            if not chunk:
                raise TarStreamError(f"{self.where}: unexpected end of data in {self.name}")
            size -= len(chunk)

    def __iter__(self) -> Iterator[tuple[str, int, bool]]:
        long_name: str | None = None
        pax: dict[str, str] = {}
        while True:
            block = self.stream.read(BLOCK)
            if not block or block == bytes(BLOCK):
                return  # a clean end of the stream, or the end-of-archive block
            if len(block) != BLOCK:
                raise TarStreamError(f"{self.where}: a header cut short ({len(block)} bytes)")
            if not _valid_header(block):
                raise TarStreamError(f"{self.where}: a header fails its checksum")
            kind, size = block[156], _number(block[124:136])
            if kind in b"xLgK":  # records about the next member (pax, GNU long name/link)
                self.name, self.pending = "an extended header", size
                record = self.data()
                self._skip(_padding(size))
                if kind == ord("x"):
                    pax = _pax_records(record)
                elif kind == ord("L"):
                    long_name = record.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue
            name = block[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if block[257:265] == b"ustar\x0000" and block[345]:  # POSIX: a path prefix
                prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                name = f"{prefix}/{name}"
            name = pax.get("path", long_name or name)
            size = int(pax.get("size", size))
            long_name, pax = None, {}
            self.name, self.pending = name, size
            yield name, size, kind in _REGULAR
            self._skip(self.pending + _padding(size))


def _file_size(stream: Any) -> int | None:
    """The size of the seekable file behind `stream`, None for anything else (a pipe)."""
    try:
        return os.fstat(stream.fileno()).st_size if stream.seekable() else None
    except (AttributeError, OSError, ValueError):
        return None


def _padding(size: int) -> int:
    return -size % BLOCK


def tar_samples(stream: BinaryIO, url: str, select: Callable[[str], bool] | None = None
                ) -> Iterator[dict[str, Any]]:
    """Samples {__key__, __url__, ext: bytes} of a plain tar stream; members whose name
    `select` rejects are skipped unread (webdataset's select_files)."""
    first = stream.read(BLOCK)
    if hasattr(stream, "seekable") and stream.seekable():
        stream.seek(-len(first), 1)
    else:
        stream = _Prepended(first, stream)
    if first and first != bytes(BLOCK) and (len(first) != BLOCK or not _valid_header(first)):
        yield from _webdataset_samples(stream, url, select)
        return
    members = _Members(stream, url)
    sample: dict[str, Any] | None = None
    for name, _, regular in members:
        if not regular or (name.startswith("__") and "/" not in name and name.endswith("__")) \
                or _SKIP_META.match(name) or (select is not None and not select(name)):
            continue
        key, ext = base_plus_ext(name)
        if key is None:
            continue
        data, ext = members.data(), ext.lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        if ext in sample:
            raise TarStreamError(f"{url}: {name}: duplicate file name in tar file {ext}")
        sample[ext] = data
    if sample is not None:
        yield sample


class _Prepended:
    """A read-only stream: `head` bytes, then the rest of `stream` (for a peeked block)."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if self.head:
            if size < 0:
                data, self.head = self.head + self.stream.read(), b""
                return data
            data, self.head = self.head[:size], self.head[size:]
            if len(data) < size:
                data += self.stream.read(size - len(data))
            return data
        return self.stream.read(size)

    def seekable(self) -> bool:
        return False


def _webdataset_samples(stream: Any, url: str, select: Callable[[str], bool] | None
                        ) -> Iterator[dict[str, Any]]:
    """webdataset's own reader, for what is not a plain tar (compressed shards)."""
    files = wds.tariterators.tar_file_expander(iter([{"url": url, "stream": stream}]),
                                               select_files=select)
    with closing(wds.tariterators.group_by_keys(files)) as samples:
        yield from samples


def open_samples(url: str, select: Callable[[str], bool] | None = None
                 ) -> Iterator[dict[str, Any]]:
    """The samples of the shard at `url` (a local path or anything webdataset's gopen opens).

    A reader that stops early (a slot's part of a shard) closes a `pipe:` command's output
    while it still writes: its failing exit (curl: 23) is the expected consequence then, not
    an error of the shard; after a complete read it is one."""
    stream, complete = wds.gopen(url, "rb"), False
    try:
        yield from tar_samples(stream, url, select)
        complete = True
    finally:
        try:
            stream.close()
        except OSError:
            if complete:
                raise
