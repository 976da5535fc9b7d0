"""Re-read a shard set and check it against its manifest; returns the problems found.

Every malformed sample is a problem naming the shard and the key, never an exception: motion
headers are checked against the member's size before anything is allocated, object dtypes
(pickles) are refused, and JSON that is not an object is reported. Each shard's whole sha256
must be the manifest's, its index the one the manifest hashed, and each sample is read through
the index as training reads it (no tar header is parsed): its members must match the digests
there, so an altered shard is reported sample by sample.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from rehamot.data import locations, schema
from rehamot.data.reading import load_index, read_samples
from shards.plan import inside_root, is_valid_key


def verify_shards(shard_dir: str | Path) -> list[str]:
    """The problems of the shard set in a folder or at a URL prefix (rehamot.data.locations)."""
    location = str(shard_dir)
    manifest = schema.load_manifest(location, names_checked=False)  # each bad name reported
    problems: list[str] = []
    listed = set()
    for split, entry in manifest["splits"].items():
        samples = captions = 0
        for shard in entry["shards"]:
            plain = _is_plain_name(shard["path"])
            if plain:
                listed.add(shard["path"])
            where = _shard_location(location, shard["path"]) if plain else None
            if where is None:  # a path or a symlink out of DIR: a manifest must not make us read it
                problems.append(f"{str(shard['path'])!r:.80}: not a file inside the shard "
                                f"folder; not read")
                continue
            problems += _verify_shard(location, where, shard, split, manifest)
            samples += shard["samples"]
            captions += shard["captions"]
        if (samples, captions) != (entry["motions"], entry["captions"]):
            problems.append(f"{split}: shards list {samples} samples / {captions} captions, "
                            f"the split says {entry['motions']} / {entry['captions']}")
    if not locations.is_url(location):  # a URL prefix is not listed: strays stay unseen there
        for stray in sorted(p.name for p in Path(location).glob("*.tar")):
            if stray not in listed:
                problems.append(f"{stray}: a tar the manifest does not list (mixed shard sets?)")
    return problems


def _shard_location(location: str, name: str) -> str | None:
    """Where a plain-named member is read: inside the folder (links resolved), or the URL."""
    if locations.is_url(location):
        return locations.join(location, name)
    path = inside_root(Path(location) / name, Path(location))
    return None if path is None else str(path)


def _is_plain_name(name: object) -> bool:
    """A manifest names shards by plain file name; anything else could point outside DIR or,
    as a URL (`pipe:`), run a command."""
    return isinstance(name, str) and schema.FILE_NAME.fullmatch(name) is not None


def _verify_shard(location: str, path: str, shard: dict[str, Any], split: str,
                  manifest: dict[str, Any]) -> list[str]:
    name = shard["path"]
    problems = []
    try:
        if not locations.exists(path):
            return [f"{name}: missing"]
        digest = _sha256(path)
    except OSError as err:  # a server that stays unreachable: the shard cannot be checked
        return [f"{name}: unreadable ({type(err).__name__}: {err})"]
    if digest != shard["sha256"]:
        problems.append(f"{name}: sha256 {digest[:12]}... differs from the manifest's "
                        f"{shard['sha256'][:12]}... (altered or truncated)")
    if _shard_location(location, schema.index_name(name)) is None:
        return problems + [f"{schema.index_name(name)}: not a file inside the shard folder; not read"]
    try:
        index = load_index(location, shard)
    except schema.ShardSetError as err:
        return problems + [str(err)]
    ours = index.members == schema.DIGESTED_MEMBERS  # else a plain WebDataset set (`index`)
    captions = 0
    previous, seen = "", set()
    try:
        for raw in read_samples(path, index, max_member=schema.member_cap(int(manifest["feature_dim"]))):
            key, position = raw["__key__"], raw["__position__"]
            where = f"{name}/{key}"
            if not is_valid_key(key):
                problems.append(f"{where}: key is not a valid shard key (dots or other characters)")
            # our writer sorts keys; a set made elsewhere keeps its tar order, but no key twice
            if (key <= previous) if ours else (key in seen):
                problems.append(f"{where}: keys out of order or repeated" if ours else f"{where}: key repeated")
            previous = key
            seen.add(key)
            mismatch = index.mismatch(raw, position)
            if mismatch is not None:  # reported, and what is wrong with its bytes too
                problems.append(f"{where}: digest_mismatch: {mismatch}")
            texts = index.captions[position]
            if isinstance(texts, str):
                problems.append(f"{where}: {texts}")
                continue
            captions += len(texts)
            if ours and set(raw) - {"__key__", "__url__", "__position__"} != set(schema.DIGESTED_MEMBERS):
                problems.append(f"{where}: members {sorted(m for m in index.members if m in raw)}, "
                                f"expected {sorted(schema.DIGESTED_MEMBERS)}")
                continue
            problems += _verify_sample(where, key, raw, index.motion, split, manifest, ours, texts)
    except (ValueError, OSError) as err:  # cut short, its map out of range, unreachable
        return problems + [f"{name}: unreadable ({type(err).__name__}: {err})"]
    if captions != shard["captions"]:
        problems.append(f"{name}: {captions} captions, the manifest says {shard['captions']}")
    return problems


def _sha256(path: str) -> str:
    with locations.open_location(path) as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def _verify_sample(where: str, key: str, members: dict[str, bytes], motion_member: str, split: str,
                   manifest: dict[str, Any], ours: bool, captions: list[list[str]]) -> list[str]:
    """The sample's problems: its motion against the manifest and, in our own shards, its
    SampleMeta JSON against the motion and the index's captions."""
    try:
        motion = schema.decode_motion(members[motion_member])
    except (ValueError, EOFError) as err:  # NpyHeaderError / PickledNpy included
        return [f"{where}: cannot decode {motion_member} ({type(err).__name__}: {err})"]
    problems = []
    if motion.ndim != 2 or motion.shape[0] == 0 or motion.shape[1] != manifest["feature_dim"]:
        problems.append(f"{where}: motion shape {motion.shape}, expected "
                        f"(T>0, {manifest['feature_dim']})")
    if motion.dtype != np.dtype(manifest["dtype"]):
        problems.append(f"{where}: dtype {motion.dtype}, expected {manifest['dtype']}")
    if not ours:
        return problems
    try:
        meta = schema.decode_meta(members[schema.META_MEMBER])
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        return problems + [f"{where}: cannot decode its json ({type(err).__name__}: {err})"]
    if not isinstance(meta, dict):
        return problems + [f"{where}: its json is a {type(meta).__name__}, not an object"]
    if meta.get("id") != key or meta.get("split") != split:
        problems.append(f"{where}: json says id {meta.get('id')!r} split {meta.get('split')!r}")
    if motion.ndim == 2 and meta.get("frames") != motion.shape[0]:
        problems.append(f"{where}: json says {meta.get('frames')} frames, motion has "
                        f"{motion.shape[0]}")
    if schema.meta_captions(members[schema.META_MEMBER], key) != captions:
        problems.append(f"{where}: its json's captions are not its index's")
    return problems
