"""The shard index, built once with the standard library's tar reader: at sharding (writer.py),
for WebDataset shards made elsewhere, and to upgrade an older rehamot set in place.

    python shards/make_shards.py index DIR [--out DIR] [--split train] [--fps 20]
                                 [--layout humanml3d | --feature-dim F] [--corpus NAME]

A folder of WebDataset shards made elsewhere holds `<key>.npy` motions (T, F) with `<key>.json`
captions (a list of strings, or an object with a `captions` list of strings or of
{"text": ...} objects) or `<key>.txt` captions (one per line). Each shard's split comes from
its name (`train-*`, `val-*`, `test-*`) or `--split`; fps and the feature layout from flags;
Mean/Std from the train split. Samples that cannot be trained on are left out of the index (the
tar is not changed: a reader follows the index) and listed in the manifest's `skipped`, with
the shard sets' own reasons. The index files, the leak keys (leak_keys.py; each sample its own
parent) and manifest.json go beside the shards, or to --out (a folder to upload beside the
shards in a bucket).

A folder holding a rehamot manifest of an older format is upgraded instead: each shard is
mapped, its samples checked against the old index's digests, the new indexes, the leak keys
(each sample's parent from its meta JSON) and the manifest written (the tars are not touched),
byte for byte what sharding the same corpus now writes.

Headers come from others: each member's size is checked against the bytes the file holds
before the reader is let past it (a negative or huge size would make tarfile seek backwards
and read the same header forever, or skip beyond the end).
"""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from rehamot.data import schema

COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd
FOREIGN_MEMBERS = ("npy", "json", "txt")  # the motion, then the caption members
SPLIT_PREFIXES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
LAYOUTS = {"humanml3d": 263, "kitml": 251}


class IndexError_(ValueError):  # noqa: N801 - IndexError is a builtin
    """A shard cannot be mapped (not a tar, compressed, a header of impossible size)."""


def tar_members(path: Path) -> list[tuple[str, int, int]]:
    """(name, offset of its data, size) of each regular member of an uncompressed tar, in order.
    IndexError_ naming the file for anything else."""
    total = path.stat().st_size
    members: list[tuple[str, int, int]] = []
    with open(path, "rb") as stream:
        head = stream.read(8)
        if head.startswith(COMPRESSED):
            raise IndexError_(f"{path.name}: a compressed tar; an index maps the bytes of a plain "
                              f"tar: decompress it first")
        stream.seek(0)
        previous = -1
        try:
            with tarfile.open(fileobj=stream, mode="r:") as tar:
                while (member := tar.next()) is not None:
                    if member.size < 0 or member.offset_data + member.size > total \
                            or member.offset <= previous:
                        raise IndexError_(f"{path.name}: member {member.name!r:.80} claims "
                                          f"{member.size} bytes at {member.offset_data}, the file "
                                          f"has {total}: a bad shard")
                    previous = member.offset
                    if member.isreg():
                        members.append((member.name, member.offset_data, member.size))
        except tarfile.TarError as err:
            raise IndexError_(f"{path.name}: not a readable tar ({err})") from None
    return members


def tar_samples(path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Members grouped by key as WebDataset groups them (consecutive names of one key, the
    extension lower-cased, `__...__` metadata skipped): [(key, {ext: (offset, size)})]. A key
    or an extension seen twice is IndexError_."""
    from webdataset.tariterators import base_plus_ext  # noqa: PLC0415 - webdataset imports torch

    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    for name, offset, size in tar_members(path):
        key, ext = base_plus_ext(name)
        if key is None or name.startswith("__") or "/__" in name:
            continue
        ext = ext.lower()
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        if ext in samples[-1][1]:
            raise IndexError_(f"{path.name}: {name}: a member repeated within its sample")
        samples[-1][1][ext] = (offset, size)
    keys = [key for key, _ in samples]
    if len(set(keys)) != len(keys):
        raise IndexError_(f"{path.name}: a key appears in two places of the tar")
    return samples


def read_span(stream: Any, span: tuple[int, int]) -> bytes:
    stream.seek(span[0])
    return stream.read(span[1])


# -- one shard's index -------------------------------------------------------------------------
@dataclass
class ShardMap:
    """A mapped shard: its index's bytes and what was left out of it."""

    index: bytes
    samples: int
    captions: int
    skipped: list[dict[str, str]] = field(default_factory=list)
    motions: list[np.ndarray] = field(default_factory=list)  # kept when asked (Mean/Std)


def write_index(shard: Path, out_dir: Path, judge: ForeignJudge, keep_motions: bool = False,
                keys: Any = None, split: str = "") -> ShardMap:
    """Map `shard` with `judge.members` (the motion first), leaving out the samples `judge`
    refuses; write `<shard>.index.json` into `out_dir`. `keys` (a leak_keys.KeyCollector) gets
    each sample kept, as it is read, under `split`, each its own parent."""
    entries, skipped, motions, captions = [], [], [], 0
    with open(shard, "rb") as stream:
        for key, spans in tar_samples(shard):
            data = {ext: read_span(stream, span) for ext, span in spans.items() if ext in judge.members}
            verdict = judge(key, data)
            if isinstance(verdict, tuple):
                skipped.append({"id": key, "reason": verdict[0], "detail": f"{shard.name}: {verdict[1]}",
                                "level": "motion"})
                continue
            entries.append((key, [None if m not in data else (*spans[m], schema.member_digest(data[m]))
                                  for m in judge.members], verdict))
            captions += len(verdict)
            if keys is not None:
                add_key(keys, split, key, data[judge.members[0]], key)
            if keep_motions:
                motions.append(schema.decode_motion(data[judge.members[0]]))
    body = schema.encode_index(shard.name, shard.stat().st_size, judge.members, entries)
    (out_dir / schema.index_name(shard.name)).write_bytes(body)
    return ShardMap(body, len(entries), captions, skipped, motions)


def our_entries(shard: Path, written: list[tuple[str, dict[str, bytes], list[list[str]] | str]]
                ) -> bytes:
    """The index of a shard this rehamot's writer just wrote: `written` holds per sample its
    key, the digests of its members and its captions, in the order written."""
    mapped = tar_samples(shard)
    if [key for key, _ in mapped] != [key for key, _, _ in written]:
        raise IndexError_(f"{shard.name}: the tar's samples are not the ones written")
    entries = [(key, [None if m not in spans else (*spans[m], digests[m]) for m in schema.DIGESTED_MEMBERS],
                caps) for (key, spans), (_, digests, caps) in zip(mapped, written)]
    return schema.encode_index(shard.name, shard.stat().st_size, schema.DIGESTED_MEMBERS, entries)


def add_key(keys: Any, split: str, key: str, motion: bytes | None, parent: str | None) -> None:
    """One sample's leak key; a motion that decodes to no features is kept by id (a reader
    skips it as a bad sample: it can leak nothing)."""
    try:
        keys.add(split, SimpleNamespace(id=key, motion=motion), parent)
    except (ValueError, EOFError, IndexError):
        keys.add(split, SimpleNamespace(id=key, motion=None), parent)


def meta_parent(data: bytes | None) -> str | None:
    """The parent motion id a sample's meta JSON names (a sub-clip's source motion), if any."""
    try:
        parent = schema.decode_meta(data).get("parent_id") if data is not None else None
    except (UnicodeDecodeError, ValueError, AttributeError, RecursionError):
        return None
    return parent if isinstance(parent, str) and parent else None


# -- the index command ---------------------------------------------------------------------------
def foreign_captions(ext: str, data: bytes) -> list[str] | None:
    """Caption texts of a plain WebDataset sample's caption member, None when unusable."""
    try:
        text = data.decode("utf-8")
        if ext == "txt":
            return [line.strip() for line in text.splitlines() if line.strip()] or None
        body = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if isinstance(body, dict):
        body = body.get("captions")
    if not isinstance(body, list):
        return None
    texts = [c.get("text") if isinstance(c, dict) else c for c in body]
    texts = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    return texts or None


class ForeignJudge:
    """Whether a plain WebDataset sample can be trained on: a plain float (T, F) motion of the
    layout's F, finite, and at least one caption."""

    members = FOREIGN_MEMBERS

    def __init__(self, feature_dim: int) -> None:
        self.feature_dim = feature_dim
        self.dtypes: set[str] = set()

    def __call__(self, key: str, data: dict[str, bytes]) -> list[list[str]] | tuple[str, str]:
        """The sample's captions [[caption_id, text]], or (skip reason, detail)."""
        from shards.plan import is_valid_key  # noqa: PLC0415

        if not is_valid_key(key):
            return "bad_id", f"key {key!r:.80}"
        if "npy" not in data:
            return "missing_motion", "no .npy member"
        try:
            motion = schema.decode_motion(data["npy"])
        except schema.PickledNpy as err:
            return "pickled_motion", str(err)
        except (ValueError, EOFError) as err:
            return "unreadable_motion", str(err)
        if motion.ndim != 2 or motion.dtype.kind != "f" or motion.shape[0] < 1:
            return "unreadable_motion", f"shape {motion.shape} {motion.dtype}"
        if motion.shape[1] != self.feature_dim:
            return "bad_feature_dim", f"{motion.shape[1]} features, the layout has {self.feature_dim}"
        if not np.isfinite(motion).all():
            return "non_finite", "NaN or inf"
        caption_ext = next((c for c in self.members[1:] if c in data), None)
        if caption_ext is None:
            return "missing_caption_file", "no .json or .txt member"
        texts = foreign_captions(caption_ext, data[caption_ext])
        if texts is None:
            return "no_captions", f"no usable caption in its .{caption_ext}"
        self.dtypes.add(str(motion.dtype))
        return [[f"{key}:{k}", text] for k, text in enumerate(texts)]


def split_of(name: str, given: str | None) -> str | None:
    if given:
        return given
    head = name.split("-", 1)[0].split("_", 1)[0].split(".", 1)[0].lower()
    return SPLIT_PREFIXES.get(head)


def index_folder(folder: Path, out: Path | None, *, split: str | None, fps: float | None,
                 feature_dim: int | None, corpus: str | None, console: Any = print) -> dict[str, Any]:
    """The `index` command: map a plain WebDataset set, or upgrade an older rehamot set."""
    from shards.plan import ShardingError  # noqa: PLC0415

    if "://" in str(folder):
        raise ShardingError(f"{folder}: index reads the shards from a local folder (copy them "
                            f"here, or run where they are) and writes --out for the bucket")
    if not folder.is_dir():
        raise ShardingError(f"{folder}: not a folder")
    out = folder if out is None else out
    out.mkdir(parents=True, exist_ok=True)
    try:
        if (folder / schema.MANIFEST_NAME).is_file():
            return _upgrade(folder, out, console)
        return _index_plain(folder, out, split=split, fps=fps, feature_dim=feature_dim,
                            corpus=corpus or folder.resolve().name, console=console)
    except (IndexError_, schema.ShardSetError) as err:
        raise ShardingError(str(err)) from None


def _upgrade(folder: Path, out: Path, console: Any) -> dict[str, Any]:
    from shards.files import file_sha256  # noqa: PLC0415
    from shards.leak_keys import KeyCollector  # noqa: PLC0415
    from shards.plan import ShardingError  # noqa: PLC0415
    from shards.writer import write_manifest  # noqa: PLC0415

    manifest = json.loads((folder / schema.MANIFEST_NAME).read_text(encoding="utf-8"))
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version == schema.FORMAT_VERSION:
        # only a set this command mapped before it wrote keys lacks them: mapping it again adds them
        missing = "" if isinstance(manifest.get("leak_keys"), dict) else (
            f" (it lists no leak keys: remove its {schema.MANIFEST_NAME} and index the shards again)")
        console(f"index: {folder} is already of format {version}; nothing to do{missing}")
        return manifest
    if version != 2:
        raise ShardingError(f"{folder}: a manifest of format {version!r}; index upgrades format 2 "
                            f"sets (older ones: {schema.RESHARD})")
    schema.check_manifest({**manifest, "format_version": schema.FORMAT_VERSION}, str(folder))
    # the manifest's splits, shards and the tars' samples are build.py's writing order: its keys' order
    keys = KeyCollector(int(manifest["feature_dim"]), float(manifest["fps"]))
    for split, entry in manifest["splits"].items():
        for record in entry["shards"]:
            shard = folder / record["path"]
            old = _old_digests(folder / schema.index_name(record["path"]))
            written = []
            with open(shard, "rb") as stream:
                for key, spans in tar_samples(shard):
                    data = {m: read_span(stream, spans[m]) for m in schema.DIGESTED_MEMBERS if m in spans}
                    digests = {m: schema.member_digest(d) for m, d in data.items()}
                    recorded = old.get(key)
                    if recorded is None or any(recorded.get(m) != d for m, d in digests.items()):
                        raise ShardingError(f"{shard.name}/{key}: differs from its format-2 index "
                                            f"(altered since sharding): {schema.RESHARD}")
                    written.append((key, digests, schema.meta_captions(data.get(schema.META_MEMBER), key)))
                    add_key(keys, split, key, data.get(schema.MOTION_MEMBER),
                            meta_parent(data.get(schema.META_MEMBER)))
            if len(written) != int(record["samples"]):
                raise ShardingError(f"{shard.name}: {len(written)} samples, the manifest says {record['samples']}")
            index = out / schema.index_name(record["path"])
            index.write_bytes(our_entries(shard, written))
            record.update(index=index.name, index_sha256=file_sha256(index))
        console(f"index: {split}: {len(entry['shards'])} shards mapped")
    manifest.pop("format_version")
    return write_manifest(out, with_keys(manifest, keys.write(out)))


def with_keys(manifest: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """The manifest listing `entry` as its leak keys: where it was, else where build.py puts
    it (after `hygiene`), so the manifest is the bytes a fresh sharding writes."""
    if "leak_keys" in manifest:
        return {**manifest, "leak_keys": entry}
    items = list(manifest.items())
    at = next((i + 1 for i, (name, _) in enumerate(items) if name == "hygiene"), len(items))
    return dict([*items[:at], ("leak_keys", entry), *items[at:]])


def _old_digests(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {member: digest}} of a format-2 index."""
    body = json.loads(path.read_text(encoding="utf-8"))
    return {key: dict(zip(body["members"], (bytes.fromhex(h) for h in hexes)))
            for key, *hexes in body["samples"]}


def _index_plain(folder: Path, out: Path, *, split: str | None, fps: float | None,
                 feature_dim: int | None, corpus: str, console: Any) -> dict[str, Any]:
    from shards.files import file_sha256  # noqa: PLC0415
    from shards.leak_keys import KeyCollector  # noqa: PLC0415
    from shards.plan import ShardingError, is_valid_fps  # noqa: PLC0415
    from shards.writer import RunningMoments, write_manifest  # noqa: PLC0415

    if fps is None or not is_valid_fps(fps):
        raise ShardingError("--fps: give the shards' frame rate")
    if feature_dim is None:
        raise ShardingError(f"--layout ({' | '.join(LAYOUTS)}) or --feature-dim: give the motions' features")
    shards = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(".tar"))
    if not shards:
        raise ShardingError(f"{folder}: no .tar shards")
    by_split: dict[str, list[Path]] = {}
    for shard in shards:
        schema.check_file_name(shard.name, str(folder))
        name_split = split_of(shard.name, split)
        if name_split not in schema.SPLITS:
            raise ShardingError(f"{shard.name}: no split in its name (train-*, val-*, test-*); give --split")
        by_split.setdefault(name_split, []).append(shard)
    judge, moments, skipped, splits = ForeignJudge(feature_dim), RunningMoments(feature_dim), [], {}
    keys = KeyCollector(feature_dim, fps)
    for name in [s for s in schema.SPLITS if s in by_split]:
        records, motions_total, captions_total = [], 0, 0
        for shard in by_split[name]:
            mapped = write_index(shard, out, judge, keep_motions=name == "train", keys=keys, split=name)
            for motion in mapped.motions:
                data = motion.astype(np.float64)
                mean = data.mean(axis=0)
                moments.add(len(data), mean, ((data - mean) ** 2).sum(axis=0))
            skipped += mapped.skipped
            index = out / schema.index_name(shard.name)
            records.append({"path": shard.name, "samples": mapped.samples, "captions": mapped.captions,
                            "sha256": file_sha256(shard), "index": index.name,
                            "index_sha256": file_sha256(index)})
            motions_total += mapped.samples
            captions_total += mapped.captions
        splits[name] = {"motions": motions_total, "captions": captions_total, "shards": records}
        console(f"index: {name}: {len(records)} shards, {motions_total} samples, {captions_total} captions")
    if not moments.count:
        raise ShardingError(f"{folder}: no usable train sample (Mean/Std come from the train split)")
    if len(judge.dtypes) > 1:
        raise ShardingError(f"{folder}: motions of several dtypes ({sorted(judge.dtypes)})")
    mean, std = moments.mean_std()
    return write_manifest(out, {
        "corpus": corpus, "feature_dim": feature_dim, "fps": float(fps), "dtype": judge.dtypes.pop(),
        "converter": {"name": "index", "version": 1, "args": {"split": split, "fps": fps,
                                                              "feature_dim": feature_dim}},
        "splits": splits, "mean": [float(v) for v in mean], "std": [float(v) for v in std],
        "mean_std_source": "train split", "skipped": sorted(skipped, key=lambda s: (s["id"], s["reason"])),
        "leak_keys": keys.write(out),
    })
