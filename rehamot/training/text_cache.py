"""Frozen-LM text features, computed once per distinct training caption and reused every step.

With a frozen language model, `TextEncoder.features()` is a pure function of the caption, so
training needs only the projection head on the text side. `load_or_build`
returns a `TextFeatureCache` that maps each caption text of a training split to its pooled
backbone features (float32, what the head takes).

The file: one safetensors file `text-features-<key>.safetensors` holding `features` (N, H)
float32 and the texts as UTF-8 bytes + offsets (no pickle, no header-size limit). Its metadata
carries the key, the identity it was built from and a sha256 of the tensors' bytes and of the
rest of the metadata, verified on every load: a corrupt or truncated file is reported by
name, removed and rebuilt.

The key hashes what determines the features: the LM's content fingerprint (weights, config,
tokenizer files, pooling, layers kept, max length; see TextEncoder.fingerprint) and the
tokenizer class, the max token length, and the split's captions. The captions are identified
by the manifest's shard records (path, counts, sha256, and the sha256 of the shard's index,
which holds a digest of every sample's JSON member), so a start with a cache costs no shard
reading; without them (hand-made manifests) by the texts themselves (then every start reads
the split's JSON members).

The cache is checked against the captions it serves through those digests: a build encodes
only captions whose JSON member matches its index (others are bad samples, digest_mismatch),
and the training stream checks every sample against the same index before serving it. So a
caption edited in a shard after sharding is never looked up: it is refused where it is read,
naming shard and sample (strict), or skipped and counted; and re-sharded captions give new
index checksums, hence a new key and a new cache. A lookup that misses anyway is an error
naming the caption, its sample and its shard.

Built in parallel, with only a barrier (no torch.distributed here): rank r reads the JSON
members of shards r::W, the ranks agree on the sorted union through part files, rank r encodes
encode batches r::W, rank 0 merges and writes the file atomically, every rank loads it. The
encode batches are the same whatever W is, so the features do not depend on the world size.
Every rank must see the cache and parts folders (a shared filesystem, like the run dir).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rehamot.data.collate import Tokenizer, tokenize
from rehamot.data.reading import (
    BadSampleError,
    RateLimitedWarning,
    is_url,
    load_indexes,
    member_url,
    read_manifest,
    split_shards,
)
from rehamot.progress import track

log = logging.getLogger("rehamot.training.text_cache")

CACHE_FORMAT = "rehamot-text-features"
CACHE_VERSION = 2  # bump when the file layout or what the features mean changes
FILE_PREFIX = "text-features-"
ENCODE_BATCH = 256  # captions per LM forward while building


def cache_enabled(text_cache: bool, finetune_lm: bool) -> bool:
    """On exactly when the LM is frozen for the whole run (its features never change)."""
    return bool(text_cache) and not finetune_lm


def default_cache_dir(shards: str, run_root: str | Path) -> Path:
    """Beside the shards when they are a local writable folder (the cache follows the corpus),
    else in the run root."""
    if not is_url(shards) and os.path.isdir(shards) and os.access(shards, os.W_OK):
        return Path(shards) / "text-cache"
    return Path(run_root) / "text-cache"


# -- the split's captions -----------------------------------------------------------------------
@dataclass
class CaptionScan:
    texts: set[str] = field(default_factory=set)
    bad: int = 0  # samples (or lost shard tails) whose captions could not be read


def scan_captions(shards: str, split: str, shard_numbers: Iterable[int] | None = None,
                  strict: bool = False) -> CaptionScan:
    """Distinct caption texts of a split's shards (all, or the given positions in the manifest),
    from the shard indexes' captions (their sha256 is the manifest's: no tar is read). A sample
    whose captions are unusable is counted and warned about by shard and key (strict:
    BadSampleError); every other caption is kept."""
    manifest = read_manifest(shards)
    records = split_shards(manifest, split)
    numbers = range(len(records)) if shard_numbers is None else list(shard_numbers)
    indexes = dict(zip(numbers, load_indexes(shards, [records[n] for n in numbers])))
    scan, warn = CaptionScan(), RateLimitedWarning(log)
    for number in numbers:
        url = member_url(shards, records[number]["path"])
        for key, texts in zip(indexes[number].keys, indexes[number].captions):
            if isinstance(texts, list):
                scan.texts.update(text for _, text in texts)
                continue
            message = f"text cache: unreadable captions in {url}, {key}: {texts}"
            if strict:
                raise BadSampleError(message)
            scan.bad += 1
            warn(message)
    return scan


def split_content(manifest: dict[str, Any], split: str) -> dict[str, Any] | None:
    """The split's identity from the manifest alone (the index checksums cover every caption's
    bytes), or None when a shard record has no index checksum."""
    records = split_shards(manifest, split)
    if not all(r.get("index_sha256") for r in records):
        return None
    return {"corpus": manifest.get("corpus"), "split": split,
            "shards": [[r["path"], int(r["samples"]), r.get("captions"), r.get("sha256"),
                        r["index_sha256"]] for r in records]}


def texts_digest(texts: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for text in sorted(texts):
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


def cache_identity(fingerprint: dict[str, Any], tokenizer: Tokenizer, max_text_len: int,
                   content: dict[str, Any]) -> dict[str, Any]:
    """What the key hashes. The model's location and name are left out on purpose: the
    fingerprint hashes its files' content, so a copied model keeps its cache."""
    model = {k: v for k, v in fingerprint.items() if k not in ("path", "model", "digest")}
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "model": model,
            "tokenizer_class": type(tokenizer).__name__, "max_text_len": int(max_text_len),
            "captions": content}


def cache_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()


def cache_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / f"{FILE_PREFIX}{key[:32]}.safetensors"


# -- the cache file -----------------------------------------------------------------------------
class CorruptCache(Exception):
    """The file cannot be trusted (truncated, bytes changed, another key)."""


class CaptionNotCached(LookupError):
    """A caption the training stream served is not in the cache (its message names it)."""


@dataclass
class TextFeatureCache:
    path: Path
    key: str
    texts: list[str]
    features: torch.Tensor  # (N, H) float32, row i for texts[i]
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = {text: row for row, text in enumerate(self.texts)}

    def __len__(self) -> int:
        return len(self.texts)

    def lookup(self, texts: Sequence[str], ids: Sequence[str] | None = None,
               shards: Sequence[str | None] | None = None) -> torch.Tensor:
        """(B, H) features of the given captions; a caption not in the cache is CaptionNotCached
        naming it and, when given (a batch's `ids` and `shards`), its sample and shard."""
        rows = [self.index.get(text) for text in texts]
        if None in rows:
            at = rows.index(None)
            where = "".join(f" {label} {values[at]}" for label, values in
                            (("of sample", ids), ("in shard", shards)) if values is not None)
            raise CaptionNotCached(
                f"caption {texts[at]!r}{where} is not in the text cache {self.path}, built from "
                "the split's captions as the shard indexes describe them: check the shards "
                "(make_shards.py verify DIR), then delete the cache file (it is rebuilt) or set "
                "model.text_cache=false")
        return self.features[torch.tensor(rows, dtype=torch.int64)]


def merge_caches(caches: Sequence[TextFeatureCache]) -> TextFeatureCache:
    """Several sources' caches looked up as one (a caption's features depend on its text only,
    so a text in two caches has one row); one cache is returned as it is."""
    if len(caches) == 1:
        return caches[0]
    texts: list[str] = []
    seen: set[str] = set()
    parts = []
    for cache in caches:
        new = [row for row, text in enumerate(cache.texts) if text not in seen]
        seen.update(cache.texts)
        texts += [cache.texts[row] for row in new]
        parts.append(cache.features[torch.tensor(new, dtype=torch.int64)])
    features = torch.cat(parts)
    key = "+".join(cache.key for cache in caches)
    return TextFeatureCache(Path(" + ".join(str(cache.path) for cache in caches)), key, texts, features)


def _pack_texts(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [t.encode("utf-8") for t in texts]
    offsets = torch.zeros(len(encoded) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor([len(b) for b in encoded], dtype=torch.int64).cumsum(0)
    data = torch.frombuffer(bytearray(b"".join(encoded)), dtype=torch.uint8) if offsets[-1] else \
        torch.zeros(0, dtype=torch.uint8)
    return data, offsets


def _unpack_texts(data: torch.Tensor, offsets: torch.Tensor) -> list[str]:
    raw, bounds = data.numpy().tobytes(), offsets.tolist()
    return [raw[a:b].decode("utf-8") for a, b in zip(bounds[:-1], bounds[1:])]


def _checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 of every tensor (name, dtype, shape, bytes) and of the metadata but itself."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != "sha256"},
                                       sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomic: written beside, then renamed (a crash leaves no half file under the final name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={**metadata, "sha256": _checksum(tensors, metadata)})
    os.replace(tmp, path)


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exn:  # safetensors raises its own error types for a damaged header
        raise CorruptCache(f"unreadable: {exn}") from exn
    if metadata.get("sha256") != _checksum(tensors, metadata):
        raise CorruptCache("checksum mismatch (bytes changed or truncated)")
    return tensors, metadata


def save_cache(path: Path, key: str, texts: Sequence[str], features: torch.Tensor,
               identity: dict[str, Any]) -> None:
    if features.dtype != torch.float32 or features.shape[0] != len(texts):
        raise ValueError(f"features {tuple(features.shape)} {features.dtype} for {len(texts)} texts")
    data, offsets = _pack_texts(texts)
    _save_tensors(path, {"features": features.cpu(), "text_utf8": data, "text_offsets": offsets},
                  {"format": CACHE_FORMAT, "version": str(CACHE_VERSION), "key": key,
                   "identity": json.dumps(identity, sort_keys=True), "count": str(len(texts))})


def load_cache(path: Path, key: str) -> TextFeatureCache:
    """The verified cache at `path`; CorruptCache if it cannot be trusted."""
    tensors, metadata = _load_tensors(path)
    if metadata.get("format") != CACHE_FORMAT or metadata.get("version") != str(CACHE_VERSION):
        raise CorruptCache(f"not a version-{CACHE_VERSION} {CACHE_FORMAT} file")
    if metadata.get("key") != key:
        raise CorruptCache(f"built for key {metadata.get('key')!r}, not {key}")
    try:
        texts = _unpack_texts(tensors["text_utf8"], tensors["text_offsets"])
        features = tensors["features"]
    except (KeyError, UnicodeDecodeError, ValueError) as exn:
        raise CorruptCache(f"malformed contents: {exn!r}") from exn
    if features.dtype != torch.float32 or features.dim() != 2 or features.shape[0] != len(texts) \
            or len(set(texts)) != len(texts):
        raise CorruptCache(f"features {tuple(features.shape)} do not match {len(texts)} distinct texts")
    return TextFeatureCache(path, key, texts, features)


# -- encoding -----------------------------------------------------------------------------------
def encode_order(texts: Iterable[str]) -> list[str]:
    """Sorted by length then text: batches of similar length pad little; the order is fixed."""
    return sorted(set(texts), key=lambda t: (len(t), t))


def encode_batches(count: int, batch_size: int) -> list[range]:
    return [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


def encode_texts(encoder: torch.nn.Module, tokenizer: Tokenizer, texts: Sequence[str],
                 max_text_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Pooled LM features (len(texts), H) float32, as the frozen LM computes them in training:
    eval mode (no dropout), no grad, the training tokenizer settings."""
    if getattr(encoder, "finetune", False):
        raise ValueError("the text cache needs a frozen LM; this one is being fine-tuned")
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            tokens = tokenize(tokenizer, texts, max_text_len)
            features = encoder.features(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
    finally:
        encoder.train(was_training)
    return features.float().cpu()


# -- building, in parallel ----------------------------------------------------------------------
@dataclass
class CacheResult:
    cache: TextFeatureCache
    built: bool  # False: loaded from an existing file
    encoded: int  # captions this rank ran through the LM
    seconds: float
    bad_samples: int = 0  # samples whose captions could not be read (all ranks, when built)


def load_or_build(
    encoder: torch.nn.Module,
    tokenizer: Tokenizer,
    *,
    shards: str,
    split: str,
    cache_dir: str | Path,
    max_text_len: int,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] | None = None,
    parts_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = ENCODE_BATCH,
    strict: bool = False,
) -> CacheResult:
    """Every rank calls this at the same point with the same arguments (except rank).

    `encoder` is a frozen TextEncoder (features(), fingerprint()); `parts_dir` is a scratch
    folder all ranks share for the part files of a parallel build (default: beside the cache,
    named by the key); use one per run when several runs may build the same cache at once.
    """
    if world > 1 and barrier is None:
        raise ValueError("a parallel build needs a barrier")
    sync = barrier if world > 1 else (lambda: None)
    started = time.perf_counter()
    texts: list[str] | None = None
    bad = 0
    content = split_content(read_manifest(shards), split)
    if content is None:  # no shard checksums: the captions themselves identify the split
        scan = scan_captions(shards, split, strict=strict)
        texts, bad = encode_order(scan.texts), scan.bad
        content = {"split": split, "texts_sha256": texts_digest(texts), "count": len(texts)}
    identity = cache_identity(encoder.fingerprint(), tokenizer, max_text_len, content)
    key = cache_key(identity)
    path = cache_path(cache_dir, key)

    cache = _load_or_discard(path, key) if rank == 0 else None
    sync()  # rank 0 has removed a corrupt file: it exists now only if it is valid
    if path.is_file():
        if cache is None:
            cache = _load_on_other_rank(path, key)
        return CacheResult(cache, built=False, encoded=0, seconds=time.perf_counter() - started,
                           bad_samples=bad)

    parts = Path(parts_dir) if parts_dir is not None else Path(cache_dir) / f"{FILE_PREFIX}{key[:32]}.parts"
    if world > 1:
        parts.mkdir(parents=True, exist_ok=True)
    if texts is None:
        texts, bad = _gather_texts(shards, split, strict, rank, world, parts, sync)
    if rank == 0 and bad:
        log.warning(f"text cache: {bad} sample(s) of split {split!r} had unreadable captions; "
                    "the training stream skips them too")
    batches = encode_batches(len(texts), batch_size)
    share = batches[rank::world]
    mine = [encode_texts(encoder, tokenizer, [texts[i] for i in rows], max_text_len, device)
            for rows in track(share, len(share), f"text cache: encoding {len(texts)} captions with the frozen LM",
                              enabled=rank == 0)]
    encoded = sum(len(rows) for rows in batches[rank::world])
    hidden = int(encoder.hidden_size)
    local = torch.cat(mine) if mine else torch.zeros(0, hidden)
    if world == 1:
        features = local
    else:
        _save_tensors(parts / f"features-{rank}.safetensors", {"features": local}, {"key": key})
        sync()
        features = _merge_parts(parts, key, world, batches, hidden) if rank == 0 else None
    if rank == 0:
        save_cache(path, key, texts, features, identity)
        if world > 1:
            shutil.rmtree(parts, ignore_errors=True)
    sync()
    cache = TextFeatureCache(path, key, texts, features) if rank == 0 else _load_on_other_rank(path, key)
    return CacheResult(cache, built=True, encoded=encoded, seconds=time.perf_counter() - started,
                       bad_samples=bad)


def _load_or_discard(path: Path, key: str) -> TextFeatureCache | None:
    if not path.is_file():
        return None
    try:
        return load_cache(path, key)
    except CorruptCache as exn:
        log.warning(f"text cache {path} is corrupt ({exn}); removing it and building it again")
        path.unlink(missing_ok=True)
        return None


def _load_on_other_rank(path: Path, key: str) -> TextFeatureCache:
    try:
        return load_cache(path, key)
    except (CorruptCache, FileNotFoundError) as exn:
        raise RuntimeError(f"text cache {path}: rank 0 wrote or checked it, but this rank cannot read "
                           f"it ({exn}). Is {path.parent} on a filesystem every rank shares? "
                           "Set model.text_cache_dir to one.") from exn


def _gather_texts(shards: str, split: str, strict: bool, rank: int, world: int, parts: Path,
                  sync: Callable[[], None]) -> tuple[list[str], int]:
    """Rank r reads shards r::W; the ranks exchange their distinct texts through part files."""
    count = len(split_shards(read_manifest(shards), split))
    scan = scan_captions(shards, split, range(rank, count, world), strict=strict)
    if world == 1:
        return encode_order(scan.texts), scan.bad
    part = parts / f"texts-{rank}.json"
    tmp = part.with_name(part.name + ".tmp")
    tmp.write_text(json.dumps({"texts": sorted(scan.texts), "bad": scan.bad}, ensure_ascii=False),
                   encoding="utf-8")
    os.replace(tmp, part)
    sync()
    union: set[str] = set()
    bad = 0
    for other in range(world):
        payload = json.loads((parts / f"texts-{other}.json").read_text(encoding="utf-8"))
        union.update(payload["texts"])
        bad += int(payload["bad"])
    return encode_order(union), bad


def _merge_parts(parts: Path, key: str, world: int, batches: list[range], hidden: int) -> torch.Tensor:
    """Rank r's part holds the rows of batches r, r+W, ... in that order."""
    local = []
    for other in range(world):
        tensors, metadata = _load_tensors(parts / f"features-{other}.safetensors")
        if metadata.get("key") != key:
            raise CorruptCache(f"{parts}: rank {other}'s part is for another cache")
        local.append(tensors["features"])
    features = torch.empty(batches[-1].stop if batches else 0, hidden, dtype=torch.float32)
    cursor = [0] * world
    for number, rows in enumerate(batches):
        owner = number % world
        features[rows.start:rows.stop] = local[owner][cursor[owner]:cursor[owner] + len(rows)]
        cursor[owner] += len(rows)
    if any(c != len(p) for c, p in zip(cursor, local)):
        raise CorruptCache(f"{parts}: part sizes {[len(p) for p in local]} do not match the batches")
    return features
