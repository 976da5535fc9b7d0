"""The shard contract: what `shards/make_shards.py` writes and `rehamot.data` reads.

One WebDataset sample per motion (a captioned sub-clip is its own motion):

    <key>.motion.npy   float32 (or float16) array (T, F), saved with allow_pickle=False
    <key>.json         SampleMeta below, UTF-8 JSON

Keys contain no dots (WebDataset splits member names at the first dot).

`DIR/manifest.json` describes one shard set; see the shard record below. Everything here is
plain data (JSON, .npy without pickle) so that shards handed to us by others are never
unpickled.

The shard index (format 3) is the map of a shard: beside each shard `<split>-%06d.tar` lies
`<split>-%06d.index.json`, listing in tar order each sample's key, where each of its members'
bytes lie (offset of the data after its 512-byte header, size) with a digest of those bytes
(`member_digest`), and its captions. The manifest holds the index's sha256, so the manifest
vouches for every sample through it while staying small for 100k-sample corpora. Readers never
parse a tar header: they read exactly the mapped bytes (a local file by seeking, a stream in
order, skipping what lies between) and check each member against its digest before decoding
it, so a worker reading a slice of a shard, or a resume skipping samples, still checks every
sample it uses. The captions let a reader know a split's texts up front without reading a tar
(the training stream tokenises them all at start-up). Shards stay plain WebDataset tars: any
tar reader reads them (`make_shards.py index` maps shards made elsewhere, or upgrades an
older set in place). `make_shards.py verify` also checks each whole shard's sha256.
"""
from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

import numpy as np
import xxhash

from rehamot.data import locations

# 2: per-sample digests in per-shard index files; 3: the index maps each member's bytes and holds
# the captions (older sets are refused: `make_shards.py index DIR` upgrades them in place)
FORMAT_VERSION = 3
INDEX_VERSION = 2  # of the index file (format 3's)
MANIFEST_NAME = "manifest.json"
MOTION_MEMBER = "motion.npy"
META_MEMBER = "json"
SHARD_PATTERN = "{split}-%06d.tar"
TAR_BLOCK = 512
INDEX_SUFFIX = ".index.json"
INDEX_FORMAT = "rehamot-shard-index"
# The member digest is xxh3-128 of the member's bytes (128 bits leave no chance of an altered
# member keeping its digest by accident): ~3 us for a 132 KiB demo sample, 1 % of a core at 3,000 samples/s (sha256 took
# ~35 %, blake2b ~85 %). It detects changed bytes, not a forger: that is the whole-shard
# sha256 in the manifest, which `make_shards.py verify` checks.
DIGEST = "xxh3-128"
DIGEST_SIZE = 16
DIGESTED_MEMBERS = (MOTION_MEMBER, META_MEMBER)  # our shards' members, in the index's order (the motion first)
RESHARD = ("re-shard them with this rehamot (python shards/make_shards.py <humanml3d|kitml|"
           "manifest|demo> ... --out DIR --overwrite)")
UPGRADE = "upgrade them in place (python shards/make_shards.py index DIR)"
SPLITS = ("train", "val", "test")
# A manifest names its shards and indexes by plain file names in its own folder: no '/', no
# ':' (a URL scheme, webdataset's `pipe:` running a command), no leading '.' or '-'.
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# The longest motion a shard member may hold, whatever the converter's --max-frames: 55 minutes
# at 20 fps. A reader of a stream (a URL, a compressed shard) reads no member larger than
# member_cap: a header claiming more is a bad shard, not a reason to inflate gigabytes.
MAX_FRAMES = 65_536
MEMBER_SLACK = 1 << 20  # the .npy header, a sample's JSON (its captions)
STD_FLOOR = 1e-3  # constant channels must not divide by zero when normalising

# Stable reason codes for manifest["skipped"][i]["reason"].
SKIP_REASONS = {
    "non_finite": "motion contains NaN or inf",
    "bad_feature_dim": "feature dimension differs from the corpus's",
    "too_few_frames": "fewer frames than --min-frames",
    "unreadable_motion": "the .npy is truncated or unreadable",
    "pickled_motion": "the .npy holds Python objects (would need pickle)",
    "missing_caption_file": "no caption file for this motion",
    "empty_caption": "caption text is empty",
    "bad_encoding": "caption file is not valid UTF-8",
    "missing_motion": "a split names an id with no motion file",
    "duplicate_id": "the id appears more than once",
    "no_captions": "no usable caption is left for this motion",
    "bad_caption_span": "caption start/end lies outside the motion or is empty",
    "bad_caption_index": "a split's caption index does not exist in the caption file",
    "mirror_excluded": "mirrored (M...) id excluded by --mirrors exclude",
    "bad_record": "a manifest line is not a valid record",
    "bad_id": "the id is not a valid shard key (letters, digits, '_' and '-' only)",
    "outside_root": "the path resolves outside the corpus root (a symlink, '..' or an "
                    "absolute path); it is not read",
    "bad_fps": "the record's fps is not a finite number within the accepted range",
    # the joints source's codes (`rehamot.motion.skeletons.REASONS`, the same keys: tested)
    "bad_shape": "the joints are not a real (frames, joints, 3) array",
    "bad_joint_count": "the joint count differs from the named skeleton's",
    "unknown_skeleton": "the skeleton name is not one of SKELETONS",
    "not_finite": "the joints contain NaN or inf",
    "bad_unit": "the unit is not m, cm or mm",
    "bad_up_axis": "the up axis is not y or z",
    "too_short": "fewer than 2 frames at 20 fps",
    "degenerate_pose": "two joints joined by a bone coincide, so the bone has no direction",
    # given by readers of the shards, never written into a manifest
    "digest_mismatch": "a member's bytes differ from the digest its shard index recorded "
                       "at sharding time (the shard was altered after sharding)",
}

# SampleMeta (the sample's JSON member):
# {
#   "id": "000123_1",            # the sample key (== __key__), no dots
#   "parent_id": "000123",       # the source motion id (== id for whole clips)
#   "split": "train",
#   "fps": 20.0,
#   "frames": 118,               # T of motion.npy
#   "captions": [{"caption_id": "000123_1:0", "text": "a person ...",
#                 "start": 0.0, "end": 0.0}, ...],   # start/end in seconds of the parent
#   "source": {"corpus": "humanml3d", "file": "new_joint_vecs/000123.npy",
#              "crop": [first_frame, last_frame_exclusive] of the parent}
# }
#
# A shard record (manifest["splits"][split]["shards"][i]):
# {"path": "train-000000.tar", "samples": 93, "captions": 310, "sha256": <the tar's>,
#  "index": "train-000000.index.json", "index_sha256": <the index file's>}
#
# The index file (encode_index), UTF-8 JSON:
# {"format": "rehamot-shard-index", "version": 2, "shard": "train-000000.tar",
#  "bytes": <the tar's size>, "digest": "xxh3-128", "members": ["motion.npy", "json"],
#  "samples": [["000123_1", [[<data offset>, <size>, <hex digest>] of motion.npy, [...] of json],
#               [["000123_1:0", "a person ..."], ...]], ...]}
# members[0] is the motion; a member a sample lacks is null; a sample whose captions cannot be
# used has, instead of its caption list, the reason (a string) readers report it as bad with.


class ShardSetError(ValueError):
    """The shard set cannot be read as its manifest describes it (an older format, a shard or
    index missing, an index that is not the one the manifest hashed). Found at start-up,
    before any training; the message is one line."""


class NpyHeaderError(ValueError):
    """The .npy header is unreadable, or claims other data than the bytes that follow it."""


class PickledNpy(NpyHeaderError):
    """The header declares Python objects: loading it would need pickle."""


def member_cap(feature_dim: int) -> int:
    """The largest member a shard set of `feature_dim` features holds: MAX_FRAMES of float64."""
    return MAX_FRAMES * feature_dim * 8 + MEMBER_SLACK


# a stream read without its manifest's feature_dim: features up to 512 (about 256 MiB)
MAX_MEMBER_BYTES = member_cap(512)


def caption_id(sample_id: str, index: int) -> str:
    return f"{sample_id}:{index}"


def load_manifest(shard_dir: str | Path, *, names_checked: bool = True) -> dict[str, Any]:
    """The manifest of a shard folder or URL prefix (locations.py), checked (check_manifest);
    `names_checked=False` only for `verify`, which reports each bad name itself and reads none
    of them."""
    if locations.is_url(str(shard_dir)):
        return _load_remote_manifest(str(shard_dir), names_checked)
    path = Path(shard_dir) / MANIFEST_NAME
    if not Path(shard_dir).exists():  # a wrong path, most likely: say so before suggesting a build
        raise FileNotFoundError(f"shard folder {shard_dir} does not exist: check the path, or build "
                                "shards first (shards/make_shards.py)")
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {shard_dir}: not a shard folder; build shards "
                                "first (shards/make_shards.py)")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    (check_manifest if names_checked else check_format)(manifest, str(path))
    return manifest


def _load_remote_manifest(location: str, names_checked: bool) -> dict[str, Any]:
    url = locations.join(location, MANIFEST_NAME)
    try:
        # the first contact with a location: a failure now is more likely a wrong host or port
        # than a server restarting, so it is said at once (later reads retry)
        data = locations.read_bytes(url, retries=0)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {MANIFEST_NAME} at {url}: check the URL, or upload the whole "
                                "shard folder (shards/make_shards.py builds one)") from None
    except OSError as failure:  # refused, unreachable, retries spent
        raise ShardSetError(f"cannot read the manifest: {str(failure)[:300]}") from None
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise ShardSetError(f"{url}: not a manifest ({exn}); {RESHARD}") from None
    (check_manifest if names_checked else check_format)(manifest, url)
    return manifest


def check_manifest(manifest: Any, where: str) -> None:
    """ShardSetError (one line) unless `manifest` is of FORMAT_VERSION and names its shards and
    indexes by plain file names: every reader of a manifest runs this before using it."""
    check_format(manifest, where)
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        raise ShardSetError(f"{where}: no splits; {RESHARD}")
    for split, entry in splits.items():
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list):
            raise ShardSetError(f"{where}: split {str(split)!r:.40} lists no shards; {RESHARD}")
        for record in shards:
            if not isinstance(record, dict):
                raise ShardSetError(f"{where}: a shard record is not an object; {RESHARD}")
            check_file_name(record.get("path"), where)
            if "index" in record:
                check_file_name(record["index"], where)


def check_file_name(name: Any, where: str) -> str:
    """`name` if it is a plain file name (FILE_NAME), else ShardSetError naming `where`."""
    if not isinstance(name, str) or not FILE_NAME.fullmatch(name):
        raise ShardSetError(f"{where}: names a shard file {str(name)!r:.80}; a manifest names "
                            f"its shards and indexes by plain file names ({FILE_NAME.pattern}), "
                            f"nothing else is read")
    return name


def runs_command(location: str) -> bool:
    """Whether webdataset's gopen would run `location` as a shell command (`pipe:`)."""
    return urlparse(location.strip()).scheme == "pipe"


def shared_location(location: Any, source: str) -> str:
    """A shard location read from a file others may hand over (a bundle's or run's config):
    a folder or a URL that runs nothing; a `pipe:` location is refused, naming `source`.
    Only what the user types (their config file, a command-line value) may run a command."""
    if not isinstance(location, str) or not location.strip():
        raise ShardSetError(f"{source}: data.shards is not a shard location; give --shards DIR")
    if runs_command(location):
        raise ShardSetError(f"{source}: data.shards {location!r:.80} is a `pipe:` command; a "
                            f"location read from a shared file never runs one: give --shards DIR")
    return location


def check_format(manifest: Any, where: str) -> None:
    """ShardSetError (one line) unless `manifest` is of FORMAT_VERSION."""
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version == FORMAT_VERSION:
        return
    if isinstance(version, int) and version < FORMAT_VERSION:
        raise ShardSetError(f"{where}: shards of format {version}, whose index does not map "
                            f"the samples; this rehamot reads only format {FORMAT_VERSION}: "
                            f"{UPGRADE}, or {RESHARD}")
    raise ShardSetError(f"{where}: format_version {version!r}, this rehamot reads "
                        f"{FORMAT_VERSION}: use the rehamot that wrote them, or {RESHARD}")


def check_shard_files(location: str, manifest: dict[str, Any],
                      splits: list[str] | None = None) -> None:
    """ShardSetError (one line) naming the first shard or index of the splits (default: all)
    that is missing: a stat per file in a folder, a HEAD request (S3: head_object) per file at
    a URL prefix, nothing for a `pipe:` command. Torch-free: an entry point can run it before
    anything heavy is imported or written."""
    entries = manifest.get("splits", {})
    names = [name for split in (entries if splits is None else splits)
             for record in entries.get(split, {}).get("shards", [])
             for name in (record["path"], index_name(record["path"]))]
    try:
        missing = locations.missing([locations.join(location, name) for name in names])
    except OSError as failure:  # a server that stays unreachable
        raise ShardSetError(f"{location}: cannot check the shard files ({str(failure)[:200]})") \
            from None
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        first = missing[0].rsplit("/", 1)[-1] if locations.is_url(location) else Path(missing[0]).name
        raise ShardSetError(
            f"{location}: {first}{more} is named in {MANIFEST_NAME} but missing; copy "
            f"the whole shard folder again, or {RESHARD}")


def mean_std(manifest: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    mean = np.asarray(manifest["mean"], dtype=np.float32)
    std = np.maximum(np.asarray(manifest["std"], dtype=np.float32), STD_FLOOR)
    return mean, std


def mixture_mean_std(manifests: Sequence[dict[str, Any]], weights: Sequence[float], split: str
                     ) -> tuple[np.ndarray, np.ndarray]:
    """One Mean/Std for a weighted mixture of shard sets: each source's moments (its manifest's
    mean and std) pooled with the share of the epoch it fills, weight x its `split` motions.
    Manifests hold no frame counts, so a source's motions stand in for its frames (equal mean
    lengths assumed). Pooled: mean = sum c_i mean_i, var = sum c_i (std_i^2 + mean_i^2) - mean^2.
    One source keeps its own Mean/Std, bit for bit."""
    if len(manifests) == 1:
        return mean_std(manifests[0])
    counts = np.asarray([w * int(m["splits"][split]["motions"]) for m, w in zip(manifests, weights)], np.float64)
    shares = counts / counts.sum()
    means = np.stack([np.asarray(m["mean"], np.float64) for m in manifests])
    stds = np.stack([np.asarray(m["std"], np.float64) for m in manifests])
    mean = shares @ means
    var = shares @ (stds**2 + means**2) - mean**2
    std = np.maximum(np.sqrt(np.maximum(var, 0.0)), STD_FLOOR)
    return mean.astype(np.float32), std.astype(np.float32)


def encode_motion(motion: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, motion, allow_pickle=False)
    return buf.getvalue()


def check_npy_header(stream: BinaryIO, size: int) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of the .npy of `size` bytes that starts at the stream's position.

    np.load trusts the header: one claiming shape (10**12, 263) makes it allocate terabytes
    before it finds the data missing, and an object dtype means a pickle. So the header is read
    first, and only a plain dtype whose shape accounts for exactly the bytes there are passes.
    Leaves the stream just after the header. Raises PickledNpy for object dtypes and
    NpyHeaderError for anything else that np.load should not be given.
    """
    start = stream.tell()
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
        else:  # 3.0 only exists for structured dtypes with non-latin-1 field names
            raise NpyHeaderError(f"unsupported .npy format version {version[0]}.{version[1]}")
    except NpyHeaderError:
        raise
    except (ValueError, TypeError, EOFError, OverflowError, SyntaxError) as err:
        raise NpyHeaderError(f"unreadable .npy header ({err})") from err
    held = size - (stream.tell() - start)
    _check_layout(shape, dtype, held)
    return tuple(shape), dtype


def _check_layout(shape: tuple[int, ...], dtype: np.dtype, held: int) -> None:
    if dtype.hasobject:
        raise PickledNpy(f"header declares dtype {dtype} (Python objects, would need pickle)")
    if any(d < 0 for d in shape):
        raise NpyHeaderError(f"header claims a negative shape {shape}")
    claimed = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if claimed != held:
        raise NpyHeaderError(f"header claims shape {shape} of {dtype} ({claimed} bytes), "
                             f"the data is {held} bytes")


# The header np.save writes for a plain dtype (format 1.0 or 2.0), read without numpy's
# ast.literal_eval (about 40 µs a sample); anything else takes check_npy_header's path.
_NPY_SAVED_HEADER = re.compile(
    rb"\x93NUMPY(?:\x01\x00(..)|\x02\x00(....))"
    rb"\{'descr': '([<>|=]?[a-zA-Z][0-9]*)', 'fortran_order': (True|False), "
    rb"'shape': \(([0-9]+(?:, [0-9]+)*,?)?\), \} *\n", re.DOTALL)


def decode_motion(data: bytes) -> np.ndarray:
    """Decode a motion member, its header checked first (check_npy_header): never unpickles,
    never allocates more than the bytes it was given. NpyHeaderError / PickledNpy otherwise.

    The array of np.save's own header is a read-only view of `data` (no copy); other headers
    go through np.load."""
    saved = _NPY_SAVED_HEADER.match(data)
    if saved is not None:
        v1, v2, descr, fortran, dims = saved.groups()
        header_end = (10 + int.from_bytes(v1, "little") if v1 is not None
                      else 12 + int.from_bytes(v2, "little"))
        if header_end == saved.end():
            shape = tuple(int(d) for d in dims.split(b",") if d.strip()) if dims else ()
            try:
                dtype = np.dtype(descr.decode("ascii"))
            except TypeError as err:
                raise NpyHeaderError(f"unreadable .npy header ({err})") from err
            _check_layout(shape, dtype, len(data) - header_end)
            flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=header_end)
            return flat.reshape(shape, order="F" if fortran == b"True" else "C")
    stream = io.BytesIO(data)
    check_npy_header(stream, len(data))
    stream.seek(0)
    return np.load(stream, allow_pickle=False)


def encode_meta(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")


def decode_meta(data: bytes) -> dict[str, Any]:
    return json.loads(data.decode("utf-8"))


# -- the shard index -------------------------------------------------------------------------------
def member_digest(data: bytes) -> bytes:
    """DIGEST of a member's raw bytes (as stored in the tar)."""
    return xxhash.xxh3_128_digest(data)


def index_name(shard_path: str) -> str:
    """`train-000000.tar` -> `train-000000.index.json`."""
    return shard_path.removesuffix(".tar") + INDEX_SUFFIX


def meta_problem(meta: Any, key: str) -> str | None:
    """Why a decoded SampleMeta cannot be used for sample `key` (its id, its captions), or None."""
    if not isinstance(meta, dict) or meta.get("id") != key:
        found = meta.get("id") if isinstance(meta, dict) else None
        return f"json id {found!r} differs from the key"
    captions = meta.get("captions")
    if not isinstance(captions, list) or not captions or not all(
        isinstance(c, dict) and isinstance(c.get("caption_id"), str)
        and isinstance(c.get("text"), str) and c["text"].strip() for c in captions
    ):
        return "json has no usable captions"
    return None


def meta_captions(data: bytes | None, key: str) -> list[list[str]] | str:
    """A sample's captions for its index, [[caption_id, text], ...] from its SampleMeta JSON
    member, or why it has none (what a reader of the sample reports as its bad-sample reason)."""
    if data is None:
        return f"no .{META_MEMBER} member"
    try:
        meta = decode_meta(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exn:
        return f"unreadable json: {exn}"
    problem = meta_problem(meta, key)
    return problem if problem else [[c["caption_id"], c["text"]] for c in meta["captions"]]


# a member's place in its shard: (offset of its data, its size, its DIGEST); None: absent
Span = tuple[int, int, bytes] | None


def encode_index(shard_path: str, shard_bytes: int, members: Sequence[str],
                 samples: Sequence[tuple[str, Sequence[Span], list[list[str]] | str]]) -> bytes:
    """The index file of a shard: per sample in tar order its key, the span of each of
    `members` (members[0] is the motion) and its captions (or why it has none). The same
    samples give the same bytes."""
    body = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "shard": shard_path,
            "bytes": shard_bytes, "digest": DIGEST, "members": list(members),
            "samples": [[key, [None if s is None else [s[0], s[1], s[2].hex()] for s in spans], captions]
                        for key, spans, captions in samples]}
    return (json.dumps(body, separators=(",", ":"), ensure_ascii=True) + "\n").encode("ascii")


class ShardIndex:
    """A shard's map: per sample in tar order its key, where each member's bytes lie (`offsets`,
    `sizes`: int64 (samples, members), -1 where a sample lacks the member), their digests
    (DIGEST_SIZE bytes per member slot, concatenated) and its captions ([caption_id, text]
    pairs, or a string saying why it has none). `members[0]` is the motion member.

    `problem`: why the map itself cannot be followed (an offset negative, out of the shard's
    recorded size, or overlapping another member), None when it can; readers then count every
    sample of the shard as bad with that reason."""

    def __init__(self, shard: str, shard_bytes: int, members: tuple[str, ...], keys: list[str],
                 offsets: np.ndarray, sizes: np.ndarray, digests: bytes,
                 captions: list[list[list[str]] | str]) -> None:
        self.shard, self.bytes, self.members, self.keys = shard, shard_bytes, members, keys
        self.offsets, self.sizes, self.digests, self.captions = offsets, sizes, digests, captions
        self.motion = members[0]
        self._positions: dict[str, int] | None = None
        self.problem = _layout_problem(self)

    @classmethod
    def parse(cls, data: bytes, shard: str) -> ShardIndex:
        """The index of `shard` from its file's bytes; ValueError if it is not one."""
        body = json.loads(data.decode("utf-8"))
        members = body.get("members") if isinstance(body, dict) else None
        if not isinstance(body, dict) or body.get("format") != INDEX_FORMAT \
                or body.get("version") != INDEX_VERSION or body.get("digest") != DIGEST \
                or body.get("shard") != shard or not isinstance(body.get("bytes"), int) \
                or not isinstance(members, list) or not members \
                or not all(isinstance(m, str) and m for m in members) or len(set(members)) != len(members):
            raise ValueError(f"not a version-{INDEX_VERSION} {INDEX_FORMAT} of {shard} with {DIGEST} digests")
        entries = body.get("samples")
        if not isinstance(entries, list):
            raise ValueError("no samples list")
        slots = len(members)
        offsets = np.full((len(entries), slots), -1, dtype=np.int64)
        sizes = np.full((len(entries), slots), -1, dtype=np.int64)
        digests = bytearray(len(entries) * slots * DIGEST_SIZE)
        keys, captions = [], []
        for row, entry in enumerate(entries):
            try:
                key, spans, caps = entry
                for slot, span in enumerate(spans):
                    if span is not None:
                        offset, size, digest = span
                        if type(offset) is not int or type(size) is not int:
                            raise TypeError
                        offsets[row, slot], sizes[row, slot] = offset, size
                        at = (row * slots + slot) * DIGEST_SIZE
                        digests[at:at + DIGEST_SIZE] = _digest_bytes(digest)
            except (TypeError, ValueError, OverflowError):
                raise ValueError(f"malformed entry {entry!r:.80}") from None
            if not isinstance(key, str) or len(spans) != slots or not _captions_ok(caps):
                raise ValueError(f"malformed entry {entry!r:.80}")
            keys.append(key)
            captions.append(caps)
        return cls(shard, body["bytes"], tuple(members), keys, offsets, sizes, bytes(digests), captions)

    def __len__(self) -> int:
        return len(self.keys)

    def position(self, key: str) -> int | None:
        if self._positions is None:
            self._positions = {k: i for i, k in enumerate(self.keys)}
        return self._positions.get(key)

    def digest(self, position: int, slot: int) -> bytes:
        at = (position * len(self.members) + slot) * DIGEST_SIZE
        return self.digests[at:at + DIGEST_SIZE]

    def mismatch(self, sample: Mapping[str, Any], position: int | None = None) -> str | None:
        """Why `sample` ({__key__, member: bytes}) is not what was sharded, or None.

        With `position` (its place in the tar) the key must be the index's there; without, the
        key is looked up. Every member the sample holds is checked; a missing member is left to
        the decoder to report.
        """
        key = sample.get("__key__")
        if position is None:
            position = self.position(key)
            if position is None:
                return f"key {key!r} is not in {index_name(self.shard)}"
        elif position >= len(self.keys) or self.keys[position] != key:
            listed = self.keys[position] if position < len(self.keys) else "no sample"
            return (f"sample {position} of the tar is {key!r}, {index_name(self.shard)} lists "
                    f"{listed!r} there (samples moved or replaced)")
        for slot, member in enumerate(self.members):
            data = sample.get(member)
            if data is None:
                continue
            if self.sizes[position, slot] < 0 or member_digest(data) != self.digest(position, slot):
                return (f"its {member} is not the one sharded ({DIGEST} differs from "
                        f"{index_name(self.shard)})")
        return None


def _digest_bytes(value: Any) -> bytes:
    digest = bytes.fromhex(value) if isinstance(value, str) else b""
    if len(digest) != DIGEST_SIZE:
        raise ValueError(f"not a {DIGEST} digest")
    return digest


def _captions_ok(captions: Any) -> bool:
    return isinstance(captions, str) or isinstance(captions, list) and all(
        isinstance(c, list) and len(c) == 2 and all(isinstance(x, str) for x in c) for c in captions)


def _layout_problem(index: ShardIndex) -> str | None:
    """Why the index's spans cannot be the members of one tar of `index.bytes` bytes: every
    member's data starts on a block after its header, lies inside the shard, and members
    follow each other in tar order without overlapping (a header between each two)."""
    present = index.sizes >= 0
    if not present.any():
        return None
    where = f"{index_name(index.shard)} maps"
    offsets, sizes = index.offsets[present], index.sizes[present]
    if (offsets < TAR_BLOCK).any() or (offsets % TAR_BLOCK).any():
        return f"{where} a member to an offset that no tar member's data can start at"
    if (offsets + sizes > index.bytes).any():
        return f"{where} a member beyond the shard's {index.bytes} bytes"
    # members in tar order: by sample, then by offset within the sample
    rows = np.where(present, index.offsets, np.iinfo(np.int64).max)
    order = np.argsort(rows, axis=1, kind="stable")
    starts = np.take_along_axis(rows, order, axis=1)
    ends = starts + np.take_along_axis(index.sizes, order, axis=1)
    keep = np.take_along_axis(present, order, axis=1)
    starts, ends = starts[keep], ends[keep]
    if (starts[1:] < ends[:-1] + TAR_BLOCK).any():
        return f"{where} members that overlap or are out of tar order"
    return None
