"""Re-read a shard set and check it against its manifest; returns the problems found."""
from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from rehamot.data import schema
from shards.plan import is_valid_key
from shards.files import file_sha256

EXPECTED_MEMBERS = {schema.MOTION_MEMBER, schema.META_MEMBER}


def verify_shards(shard_dir: Path) -> list[str]:
    shard_dir = Path(shard_dir)
    manifest = schema.load_manifest(shard_dir)
    problems: list[str] = []
    listed = set()
    for split, entry in manifest["splits"].items():
        samples = captions = 0
        for shard in entry["shards"]:
            listed.add(shard["path"])
            problems += _verify_shard(shard_dir / shard["path"], shard, split, manifest)
            samples += shard["samples"]
            captions += shard["captions"]
        if (samples, captions) != (entry["motions"], entry["captions"]):
            problems.append(f"{split}: shards list {samples} samples / {captions} captions, "
                            f"the split says {entry['motions']} / {entry['captions']}")
    for stray in sorted(p.name for p in shard_dir.glob("*.tar")):
        if stray not in listed:
            problems.append(f"{stray}: a tar the manifest does not list (mixed shard sets?)")
    return problems


def _verify_shard(path: Path, shard: dict[str, Any], split: str,
                  manifest: dict[str, Any]) -> list[str]:
    name = shard["path"]
    if not path.is_file():
        return [f"{name}: missing"]
    problems = []
    digest = file_sha256(path)
    if digest != shard["sha256"]:
        problems.append(f"{name}: sha256 {digest[:12]}... differs from the manifest's "
                        f"{shard['sha256'][:12]}... (altered or truncated)")
    try:
        samples = _read_samples(path)
    except (tarfile.TarError, OSError, EOFError) as err:
        return problems + [f"{name}: unreadable tar ({type(err).__name__}: {err})"]
    captions = 0
    previous = ""
    for key, members in samples:
        where = f"{name}/{key}"
        if not is_valid_key(key):
            problems.append(f"{where}: key is not a valid shard key (dots or other characters)")
        if set(members) != EXPECTED_MEMBERS:
            problems.append(f"{where}: members {sorted(members)}, expected "
                            f"{sorted(EXPECTED_MEMBERS)}")
            continue
        if key <= previous:
            problems.append(f"{where}: keys out of order or repeated")
        previous = key
        problems += _verify_sample(where, key, members, split, manifest)
        captions += len(schema.decode_meta(members[schema.META_MEMBER]).get("captions", []))
    if len(samples) != shard["samples"]:
        problems.append(f"{name}: {len(samples)} samples, the manifest says {shard['samples']}")
    if captions != shard["captions"]:
        problems.append(f"{name}: {captions} captions, the manifest says {shard['captions']}")
    return problems


def _read_samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """Members grouped by key (the part of the name before the first dot), in tar order."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                raise tarfile.TarError(f"member {member.name} is not a regular file")
            key, _, suffix = member.name.partition(".")
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][suffix] = tar.extractfile(member).read()
    return samples


def _verify_sample(where: str, key: str, members: dict[str, bytes], split: str,
                   manifest: dict[str, Any]) -> list[str]:
    try:
        motion = schema.decode_motion(members[schema.MOTION_MEMBER])
        meta = schema.decode_meta(members[schema.META_MEMBER])
    except (ValueError, UnicodeDecodeError, EOFError) as err:
        return [f"{where}: cannot decode ({type(err).__name__}: {err})"]
    problems = []
    if motion.ndim != 2 or motion.shape[0] == 0 or motion.shape[1] != manifest["feature_dim"]:
        problems.append(f"{where}: motion shape {motion.shape}, expected "
                        f"(T>0, {manifest['feature_dim']})")
    if motion.dtype != np.dtype(manifest["dtype"]):
        problems.append(f"{where}: dtype {motion.dtype}, expected {manifest['dtype']}")
    if meta.get("id") != key or meta.get("split") != split:
        problems.append(f"{where}: json says id {meta.get('id')!r} split {meta.get('split')!r}")
    if meta.get("frames") != motion.shape[0]:
        problems.append(f"{where}: json says {meta.get('frames')} frames, motion has "
                        f"{motion.shape[0]}")
    if not meta.get("captions"):
        problems.append(f"{where}: no captions")
    return problems
