"""Samples of an uncompressed tar stream, grouped by key as webdataset groups them, fast.

Python's tarfile builds a TarInfo per member (about 35 µs of header parsing each) and
webdataset adds a generator layer per member and per sample: together ~230 µs a sample, about
40 % of the loader's time on the demo shards; this reader takes ~40 (docs/benchmarks.md). Our shards are plain tars
written by webdataset's TarWriter, so this reader parses their 512-byte headers directly:
ustar and GNU headers, with the POSIX pax (`x`) and GNU long-name (`L`) records tarfile writes
for long names, checksums verified. It yields what `webdataset.tarfile_samples` yields for the
same stream ({__key__, __url__, lower-cased extension: bytes}), with the same key rule
(webdataset's base_plus_ext), the same skipped names (`__...__` metadata) and the same refusal
of a member repeated within a sample. A gzip, bzip2 or xz shard is inflated as it is read and
parsed the same way.

Shards come from other people, so no header is trusted: a member size must lie in [0, the
bytes left in the file] for a file, and in [0, `max_member`] for a stream (a pipe, a URL, a
compressed shard, whose size is unknown until read), before anything is read or skipped. A
negative size would make a skip seek backwards and re-read the same header forever; a huge
one would make a compressed shard inflate without bound.

Errors: a member cut short or of an impossible size, a header cut short or failing its
checksum, a stream that is no tar, and a repeated member raise TarStreamError naming the shard
(the caller decides what the rest of the shard is worth); the archive ends at its
end-of-archive block or at a clean end of the stream.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from webdataset.tariterators import base_plus_ext

from rehamot.data.locations import open_location
from rehamot.data.schema import MAX_MEMBER_BYTES

BLOCK = 512
_REGULAR = frozenset(b"07\0")  # file, contiguous file, old-style file
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
# what tarfile's "r|*" (webdataset's reader) inflates, by magic number
_DECOMPRESSORS: tuple[tuple[bytes, Callable[[Any], BinaryIO]], ...] = (
    (b"\x1f\x8b", lambda raw: gzip.GzipFile(fileobj=raw, mode="rb")),
    (b"BZh", lambda raw: bz2.BZ2File(raw, "rb")),
    (b"\xfd7zXZ\x00", lambda raw: lzma.LZMAFile(raw, "rb")),
)


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


def _pax_records(data: bytes, where: str) -> dict[str, str]:
    """`length key=value\\n` records of a pax extended header."""
    records, at = {}, 0
    while at < len(data) and data[at:at + 1] != b"\0":
        try:
            space = data.index(b" ", at)
            length = int(data[at:space])
        except ValueError:
            length = 0
        if length <= 0:
            raise TarStreamError(f"{where}: malformed pax record")
        key, _, value = data[space + 1:at + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        at += length
    return records


class _Members:
    """(name, size, is_regular) of each member; the consumer may take the member's data with
    `data()` before asking for the next one, else it is skipped unread."""

    def __init__(self, stream: BinaryIO, where: str, max_member: int) -> None:
        self.stream, self.where = stream, where
        # a seek past a file's end succeeds silently: sizes are checked against what is left
        end = _file_size(stream)
        self.left = end - stream.tell() if end is not None else None  # None: a stream
        self.max_member = max_member
        self.pending, self.name = 0, ""

    def _read(self, size: int, what: str) -> bytes:
        data = self.stream.read(size)
        if self.left is not None:
            self.left -= len(data)
        if len(data) != size:
            raise TarStreamError(f"{self.where}: unexpected end of data in {what} "
                                 f"({len(data)} of {size} bytes)")
        return data

    def data(self) -> bytes:
        """The current member's bytes."""
        data, self.pending = self._read(self.pending, self.name), 0
        return data

    def _checked_size(self, size: int, name: str) -> int:
        """`size` if a member of that size can be in this shard, else TarStreamError."""
        if size < 0:
            raise TarStreamError(f"{self.where}: member {name!r:.80} claims a negative size "
                                 f"({size} bytes): a bad shard")
        if self.left is not None and size > self.left:
            raise TarStreamError(f"{self.where}: unexpected end of data in {name!r:.80} (it "
                                 f"claims {size} bytes, the file has {self.left} left)")
        if self.left is None and size > self.max_member:
            raise TarStreamError(f"{self.where}: member {name!r:.80} claims {size} bytes, more "
                                 f"than the {self.max_member} a member of a stream may hold: "
                                 f"a bad shard")
        return size

    def _skip(self, size: int) -> None:
        if self.left is not None:
            if size > self.left:
                raise TarStreamError(f"{self.where}: unexpected end of data in {self.name}")
            self.stream.seek(size, 1)
            self.left -= size
        while size and self.left is None:
            chunk = self.stream.read(min(size, 1 << 20))
            if not chunk:
                raise TarStreamError(f"{self.where}: unexpected end of data in {self.name}")
            size -= len(chunk)

    def __iter__(self) -> Iterator[tuple[str, int, bool]]:
        long_name: str | None = None
        pax: dict[str, str] = {}
        while True:
            block = self.stream.read(BLOCK)
            if self.left is not None:
                self.left -= len(block)
            if not block or block == bytes(BLOCK):
                return  # a clean end of the stream, or the end-of-archive block
            if len(block) != BLOCK:
                raise TarStreamError(f"{self.where}: a header cut short ({len(block)} bytes)")
            if not _valid_header(block):
                raise TarStreamError(f"{self.where}: a header fails its checksum")
            kind, size = block[156], _number(block[124:136])
            if kind in b"xLgK":  # records about the next member (pax, GNU long name/link)
                self.name = "an extended header"
                self.pending = self._checked_size(size, self.name)
                record = self.data()
                self._skip(_padding(size))
                if kind == ord("x"):
                    pax = _pax_records(record, self.where)
                elif kind == ord("L"):
                    long_name = record.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue
            name = block[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if block[257:265] == b"ustar\x0000" and block[345]:  # POSIX: a path prefix
                prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                name = f"{prefix}/{name}"
            name = pax.get("path", long_name or name)
            size = self._checked_size(_pax_size(pax, size, self.where), name)
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


def _pax_size(pax: dict[str, str], size: int, where: str) -> int:
    """The pax record's size (decimal digits only) when there is one, else the header's."""
    if "size" not in pax:
        return size
    if not pax["size"].isascii() or not pax["size"].isdigit():
        raise TarStreamError(f"{where}: pax size {pax['size']!r:.40} is not a size (a bad shard)")
    return int(pax["size"])


def _padding(size: int) -> int:
    return -size % BLOCK


def tar_samples(stream: BinaryIO, url: str, select: Callable[[str], bool] | None = None,
                max_member: int = MAX_MEMBER_BYTES) -> Iterator[dict[str, Any]]:
    """Samples {__key__, __url__, ext: bytes} of a tar stream (plain, or gzip/bzip2/xz); members
    whose name `select` rejects are skipped unread (webdataset's select_files). A stream's
    members are at most `max_member` bytes (a file's: at most what the file holds)."""
    first = stream.read(BLOCK)
    if hasattr(stream, "seekable") and stream.seekable():
        stream.seek(-len(first), 1)
    else:
        stream = _Prepended(first, stream)
    if first and first != bytes(BLOCK) and (len(first) != BLOCK or not _valid_header(first)):
        stream = _inflated(stream, first, url)
    members = _Members(stream, url, max_member)
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


def tar_entries(stream: BinaryIO, url: str, max_member: int = MAX_MEMBER_BYTES
                ) -> Iterator[tuple[str, bool, bytes]]:
    """(name, is_regular, data) of every member of a plain tar, in order, with the checks of
    tar_samples (sizes, checksums): for a reader that judges members itself (shard verify)."""
    members = _Members(stream, url, max_member)
    for name, _, regular in members:
        yield name, regular, members.data() if regular else b""


def _inflated(stream: BinaryIO, first: bytes, url: str) -> BinaryIO:
    """The tar inside a compressed shard, as a stream of unknown size (members capped)."""
    for magic, opener in _DECOMPRESSORS:
        if first.startswith(magic):
            return _Unseekable(opener(stream), url)
    raise TarStreamError(f"{url}: not a tar, nor a gzip, bzip2 or xz compressed tar")


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


class _Unseekable:
    """A decompressor read as a plain stream: never seeked (the file size behind it is the
    compressed one), its format errors as TarStreamError."""

    def __init__(self, stream: BinaryIO, url: str) -> None:
        self.stream, self.url = stream, url

    def read(self, size: int) -> bytes:
        try:
            return self.stream.read(size)
        except (OSError, EOFError, lzma.LZMAError, zlib.error) as err:
            raise TarStreamError(f"{self.url}: cannot inflate ({type(err).__name__}: {err})") \
                from err

    def seekable(self) -> bool:
        return False


def open_stream(url: str) -> BinaryIO:
    """A shard file at a local path or any location rehamot.data.locations opens (file://,
    http(s)://, s3://, fsspec's schemes, a `pipe:` the user typed). Readers join a local folder
    and a shard name into a path that keeps no scheme (locations.join), so a name never
    becomes a URL."""
    return open_location(url)


def open_samples(url: str, select: Callable[[str], bool] | None = None,
                 max_member: int = MAX_MEMBER_BYTES) -> Iterator[dict[str, Any]]:
    """The samples of the shard at `url` (see open_stream).

    A reader that stops early (a slot's part of a shard) closes a `pipe:` command's output
    while it still writes: its failing exit (curl: 23) is the expected consequence then, not
    an error of the shard; after a complete read it is one."""
    stream, complete = open_stream(url), False
    try:
        yield from tar_samples(stream, url, select, max_member)
        complete = True
    finally:
        try:
            stream.close()
        except OSError:
            if complete:
                raise
