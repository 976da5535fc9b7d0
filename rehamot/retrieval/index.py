"""The embedding index of a trained model: text -> top motions, motion -> top captions and motions.

`build_index` encodes every motion and caption of a split (or of every split) once with the
run's exported bundle and writes RUN_DIR/index/, or RUN_DIR/search-index-NAME/ beside it;
`build_folder_index` does the same for a folder of .npy motions without captions:

    motion_emb.npy, caption_emb.npy   float32 unit rows, memory-mappable
    joints.npy                        every motion's joint positions (metres, float32), the
                                      motions' full sharded frames one after another, so a page
                                      can draw them without the shards (absent when the feature
                                      width matches no known skeleton layout)
    index.json                        motion ids, each motion's captions, caption ids and frame
                                      count, the split, layout, fps, the bundle's text-model
                                      fingerprint

A text query is encoded with the bundle's text tower, a motion file with its motion tower
(normalised with the bundle's Mean/Std and cropped as at evaluation); the search itself is one
matrix-vector product over unit embeddings (cosine) and a partial sort. In Python:

    from rehamot.retrieval.index import SearchIndex
    index = SearchIndex.load("runs/demo")
    index.query_text("a person jumps twice", k=5)      # -> [MotionHit, ...]
    index.query_motion("000123", k=5)                  # -> [CaptionHit, ...]
    index.query_motion_id("000123", k=5)               # -> MotionQueryResult(motions, captions)
    index.query_motion_features(features, k=5)         # the same for raw (T, D) features

A SearchIndex may be shared between threads (the search page does): encoding is serialised.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

INDEX_DIR = "index"
NAMED_INDEX_PREFIX = "search-index-"  # RUN_DIR/search-index-NAME/: an index beside the run's own
_INDEX_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
ALL_SPLITS = "all"
MOTION_FILE = "motion_emb.npy"
CAPTION_FILE = "caption_emb.npy"
JOINTS_FILE = "joints.npy"
META_FILE = "index.json"
INDEX_FORMAT = "rehamot-index/2"  # 2: joints.npy, per-motion frame counts, layout and fps
MAX_QUERY_CHARS = 1000  # a caption-like description; the text tower truncates far sooner
SCORE_DECIMALS = 6  # in JSON: enough to rank, short to read
JOINT_DECIMALS = 4  # in JSON: 0.1 mm


class SearchError(ValueError):
    """A query the index cannot answer (empty text, unknown id, bad motion file, stale or missing index)."""


@dataclass(frozen=True)
class MotionHit:
    rank: int  # 1 = best
    motion_id: str
    score: float  # cosine similarity
    captions: list[str]


@dataclass(frozen=True)
class CaptionHit:
    rank: int
    caption_id: str
    motion_id: str  # the motion this caption describes
    text: str
    score: float
    own: bool  # a caption of the query motion itself


@dataclass(frozen=True)
class MotionQueryResult:
    """What a motion query finds: the closest motions ("more like this") and captions."""

    motions: list[MotionHit]
    captions: list[CaptionHit]


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, best first; equal scores in ascending index order
    (the same as a stable descending argsort, at O(N) instead of O(N log N))."""
    n = scores.shape[0]
    k = min(k, n)
    if k <= 0:
        return np.empty(0, dtype=np.intp)
    if k < n:
        kth = scores[np.argpartition(scores, n - k)[n - k]]  # the k-th largest value
        candidates = np.flatnonzero(scores >= kth)  # every tie at the boundary, then cut
    else:
        candidates = np.arange(n)
    order = np.lexsort((candidates, -scores[candidates]))
    return candidates[order[:k]]


def layout_for_feature_dim(feature_dim: int) -> str | None:
    """The skeleton layout whose features are `feature_dim` wide (263: humanml3d, which the demo
    corpus uses too; 251: kitml), or None for a corpus of another layout."""
    from rehamot.motion.kinematics import LAYOUTS

    return next((name for name, spec in LAYOUTS.items() if spec.feature_dim == int(feature_dim)), None)


def index_folder(run_dir: str | Path, name: str | None = None) -> Path:
    """RUN_DIR/index/, or RUN_DIR/search-index-NAME/ for a named index."""
    if name is None:
        return Path(run_dir) / INDEX_DIR
    if not _INDEX_NAME.fullmatch(name):
        raise SearchError(f"index name {name!r}: use letters, digits, '.', '_' and '-' "
                          "(at most 100, not starting with '.')")
    return Path(run_dir) / f"{NAMED_INDEX_PREFIX}{name}"


def default_index_name(folder: str | Path) -> str:
    """A folder's name as an index name (characters outside the allowed ones become '_')."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(folder).resolve().name).lstrip("._-")
    return name[:100] or "motions"


def _index_command(run_dir: str | Path, name: str | None) -> str:
    return f"rehamot-search index {run_dir}" + (f" ... --name {name}" if name else "")


def read_features_file(path: str | Path) -> np.ndarray:
    """The array of a .npy file, never unpickled: its header is checked first (a plain dtype
    whose shape accounts for exactly the bytes in the file), so no header makes us allocate
    what is not there. A one-line SearchError for anything else."""
    from rehamot.data.schema import NpyHeaderError, check_npy_header

    try:
        with open(path, "rb") as stream:
            if stream.read(6) != b"\x93NUMPY":  # else numpy's complaint is about pickles
                raise SearchError(f"{path}: not a .npy file (no NumPy header)")
            stream.seek(0)
            check_npy_header(stream, os.fstat(stream.fileno()).st_size)
        array = np.load(path, allow_pickle=False)
    except SearchError:
        raise
    except NpyHeaderError as err:
        raise SearchError(f"{path}: not a readable .npy file ({err})") from None
    except Exception as err:  # whatever a missing or malformed file raises
        reason = " ".join(str(err).split()) or type(err).__name__
        raise SearchError(f"{path}: not a readable .npy file ({reason})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        raise SearchError(f"{path}: not a single .npy array")
    return array


# --------------------------------------------------------------------------- building


def read_split_joints(shards: str, split: str, ids: Sequence[str], layout: str) -> list[np.ndarray]:
    """Joint positions (T, J, 3) float32 of each motion in `ids`, in that order, from the
    motions' full features as sharded (not the evaluation crop: a page shows the whole clip)."""
    from rehamot.data.reading import read_raw_motions
    from rehamot.motion.kinematics import features_to_joints

    joints = {motion_id: features_to_joints(features, layout).astype(np.float32)
              for motion_id, features in read_raw_motions(shards, split, ids).items()}
    missing = [motion_id for motion_id in ids if motion_id not in joints]
    if missing:
        raise ValueError(f"split {split!r}: no motion member for {len(missing)} samples (e.g. {missing[0]})")
    return [joints[motion_id] for motion_id in ids]


def build_index(run_dir: str | Path, shards: str | None = None, split: str = "test",
                batch_size: int = 128, name: str | None = None) -> Path:
    """Encode the split (`all`: every split) with the run's bundle and write RUN_DIR/index/, or
    RUN_DIR/search-index-NAME/ (rank 0; atomic). Motions are normalised with the bundle's
    Mean/Std; an id in several splits becomes ID@SPLIT in each."""
    import torch.distributed as dist

    from rehamot.config import eval_shards
    from rehamot.data import schema
    from rehamot.data.reading import read_manifest
    from rehamot.distributed import init_distributed, local_device
    from rehamot.evaluation.retrieval_eval import bundle_eval_set, encode_split
    from rehamot.models.bundle import CONFIG_FILE, find_bundle, load_bundle
    from rehamot.models.factory import build_tokenizer

    run_dir = Path(run_dir)
    out = index_folder(run_dir, name)
    world = init_distributed()
    device = local_device()
    bundle = find_bundle(run_dir)
    model, cfg, info = load_bundle(bundle, device)
    if shards:
        cfg.data.shards = shards
    else:  # the eval source's shards; the bundle's config may come from anyone: its location must run nothing
        cfg.data.shards = schema.shared_location(eval_shards(cfg.data), str(bundle / CONFIG_FILE))
    splits = list(read_manifest(str(cfg.data.shards))["splits"]) if split == ALL_SPLITS else [split]
    tokenizer = build_tokenizer(cfg)
    encoded = [encode_split(model, bundle_eval_set(cfg, info, s, tokenizer, world.rank, world.world_size),
                            device, batch_size) for s in splits]
    if world.rank == 0:
        layout = layout_for_feature_dim(info["feature_dim"])
        motions, joints = [], []
        for s, enc in zip(splits, encoded):
            motions += _split_motions(s, enc)
            if layout:
                joints += read_split_joints(str(cfg.data.shards), s, enc["motion_ids"], layout)
        _label_shared_ids(motions)
        _write_index(out, run_dir, bundle, info, motions,
                     np.concatenate([enc["motion_emb"] for enc in encoded]),
                     np.concatenate([enc["caption_emb"] for enc in encoded]),
                     joints if layout else None,
                     {"split": split, "shards": str(cfg.data.shards), "name": name})
    if dist.is_initialized():
        dist.barrier()
    return out


def _split_motions(split: str, enc: dict[str, Any]) -> list[dict[str, Any]]:
    """The index's motion records of one encoded split: id, split and captions."""
    motions: list[dict[str, Any]] = [{"id": motion_id, "split": split, "captions": []}
                                     for motion_id in enc["motion_ids"]]
    for owner, caption_id, text in zip(enc["caption_motion"], enc["caption_ids"], enc["texts"]):
        motions[int(owner)]["captions"].append({"id": caption_id, "text": text})
    return motions


def _label_shared_ids(motions: list[dict[str, Any]]) -> None:
    """An id found in several splits names a different motion in each: ID@SPLIT tells them apart."""
    counts: dict[str, int] = {}
    for motion in motions:
        counts[motion["id"]] = counts.get(motion["id"], 0) + 1
    for motion in motions:
        if counts[motion["id"]] > 1:
            motion["id"] = f"{motion['id']}@{motion['split']}"


def _write_index(out: Path, run_dir: Path, bundle: Path, info: dict[str, Any], motions: list[dict[str, Any]],
                 motion_emb: np.ndarray, caption_emb: np.ndarray, joints: list[np.ndarray] | None,
                 source: dict[str, Any]) -> None:
    """index.json and the arrays into a sibling temp folder, then a rename over `out`."""
    from rehamot.models.bundle import bundle_identity

    for motion, positions in zip(motions, joints or []):
        motion["frames"] = int(positions.shape[0])
    meta = {"format": INDEX_FORMAT, **source,
            "num_motions": len(motions), "num_captions": int(caption_emb.shape[0]),
            "dim": int(motion_emb.shape[1]),
            "feature_dim": int(info["feature_dim"]), "fps": float(info["fps"]),
            "layout": layout_for_feature_dim(info["feature_dim"]) if joints is not None else None,
            "corpus": info.get("corpus"),
            "bundle": os.path.relpath(bundle, run_dir),  # "best", "final", or "." for a bundle folder
            **bundle_identity(bundle, info), "motions": motions}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / MOTION_FILE, np.ascontiguousarray(motion_emb, dtype=np.float32), allow_pickle=False)
    np.save(tmp / CAPTION_FILE, np.ascontiguousarray(caption_emb, dtype=np.float32), allow_pickle=False)
    if joints is not None:
        np.save(tmp / JOINTS_FILE, np.concatenate(joints), allow_pickle=False)
    (tmp / META_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


@dataclass(frozen=True)
class SkippedFile:
    file: str
    reason: str


def build_folder_index(run_dir: str | Path, motions_dir: str | Path, name: str | None = None,
                       batch_size: int = 128) -> tuple[Path, list[SkippedFile]]:
    """Encode every MOTION_ID.npy of a folder (raw features in the bundle's layout, as a
    generator writes them) into RUN_DIR/search-index-NAME/ (default NAME: the folder's name),
    without sharding them. The motions have no captions; files that are not such motions are
    skipped and returned with the reason."""
    import torch

    from rehamot.data import eval_crop, normalize, pad_motions, schema
    from rehamot.models.bundle import find_bundle, load_bundle

    folder = Path(motions_dir)
    if not folder.is_dir():
        raise SearchError(f"--motions {folder}: not a folder")
    out = index_folder(run_dir, name or default_index_name(folder))
    bundle = find_bundle(run_dir)
    model, cfg, info = load_bundle(bundle)
    layout = layout_for_feature_dim(info["feature_dim"])
    ids, features, skipped = [], [], []
    for path in sorted(folder.glob("*.npy")):
        try:
            features.append(checked_features(read_features_file(path), info["feature_dim"], layout, path.name))
        except SearchError as err:
            reason = str(err).removeprefix(f"{path}: ").removeprefix(f"{path.name}: ")
            skipped.append(SkippedFile(path.name, reason))
            continue
        ids.append(path.stem)
    if not ids:
        raise SearchError(f"--motions {folder}: no readable MOTION_ID.npy motion of (frames, "
                          f"{info['feature_dim']}) features ({len(skipped)} .npy files skipped)")
    mean, std = schema.mean_std(info)
    embeddings = []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            windows = [normalize(eval_crop(f, cfg.data.max_len), mean, std)
                       for f in features[start:start + batch_size]]
            batch = pad_motions(windows)
            embeddings.append(model.encode_motion(batch["motion"], batch["motion_mask"]).float().numpy())
    joints = None
    if layout:
        from rehamot.motion.kinematics import features_to_joints

        joints = [features_to_joints(f, layout).astype(np.float32) for f in features]
    motions = [{"id": motion_id, "captions": []} for motion_id in ids]
    _write_index(out, Path(run_dir), bundle, info, motions, np.concatenate(embeddings),
                 np.zeros((0, embeddings[0].shape[1]), np.float32), joints,
                 {"split": None, "motions_dir": str(folder), "name": out.name.removeprefix(NAMED_INDEX_PREFIX),
                  "skipped": [{"file": s.file, "reason": s.reason} for s in skipped]})
    return out, skipped


# --------------------------------------------------------------------------- searching


@dataclass(frozen=True)
class _Towers:
    """The bundle's model and what encoding a query needs besides it."""

    model: Any
    tokenizer: Any
    max_text_len: int
    max_len: int  # the evaluation crop, in frames
    mean: np.ndarray
    std: np.ndarray


class SearchIndex:
    """Unit motion and caption embeddings with their ids, captions and joints; answers top-k queries.

    Build one with `SearchIndex.load(run_dir)` (what `search.py index` wrote) or directly from
    arrays. Text and motion-file queries need the model: `load` uses the run's bundle, loaded
    on the first such query (or by `warm_up`).
    """

    def __init__(self, motion_emb: np.ndarray, caption_emb: np.ndarray, motions: Sequence[dict[str, Any]],
                 meta: dict[str, Any] | None = None, bundle_dir: Path | None = None,
                 joints: np.ndarray | None = None) -> None:
        if motion_emb.ndim != 2 or caption_emb.ndim != 2 or motion_emb.shape[1] != caption_emb.shape[1]:
            raise SearchError(f"embeddings must be (N, D) with one D, got {motion_emb.shape} and {caption_emb.shape}")
        if len(motions) != motion_emb.shape[0]:
            raise SearchError(f"{len(motions)} motions in the metadata, {motion_emb.shape[0]} embeddings")
        self.motion_emb, self.caption_emb = motion_emb, caption_emb
        self.meta = meta or {}
        self.motion_ids = [str(m["id"]) for m in motions]
        self.motion_captions = [[c["text"] for c in m["captions"]] for m in motions]
        self.caption_ids = [str(c["id"]) for m in motions for c in m["captions"]]
        self.caption_texts = [text for texts in self.motion_captions for text in texts]
        self.caption_motion = np.repeat(np.arange(len(motions)), [len(m["captions"]) for m in motions])
        if len(self.caption_ids) != caption_emb.shape[0]:
            raise SearchError(f"{len(self.caption_ids)} captions in the metadata, {caption_emb.shape[0]} embeddings")
        self.position = {motion_id: i for i, motion_id in enumerate(self.motion_ids)}
        self.joints = joints
        self.joint_offsets: np.ndarray | None = None
        if joints is not None:
            frames = [int(m.get("frames", 0)) for m in motions]
            self.joint_offsets = np.concatenate([[0], np.cumsum(frames)]).astype(np.int64)
            if self.joint_offsets[-1] != joints.shape[0] or min(frames, default=1) < 1:
                raise SearchError(f"the motions' frame counts add up to {self.joint_offsets[-1]}, "
                                  f"{joints.shape[0]} frames of joints")
        self.bundle_dir = bundle_dir
        self._towers: _Towers | None = None
        self._encode_lock = threading.Lock()  # one query at a time through the model (tokenizers are not reentrant)

    @classmethod
    def load(cls, run_dir: str | Path, mmap: bool = True, name: str | None = None) -> SearchIndex:
        """RUN_DIR/index/ (or the index NAME) as written by `search.py index`; arrays
        memory-mapped by default."""
        folder = index_folder(run_dir, name)
        if not (folder / META_FILE).is_file():
            which = f"no search index named {name!r}" if name else "no search index"
            raise SearchError(f"{which} in {run_dir}: build it with `{_index_command(run_dir, name)}`")
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != INDEX_FORMAT:
            raise SearchError(f"{folder} has index format {meta.get('format')!r}, this rehamot reads "
                              f"{INDEX_FORMAT}: rebuild it with `{_index_command(run_dir, name)}`")
        mode = "r" if mmap else None
        motion_emb = np.load(folder / MOTION_FILE, mmap_mode=mode, allow_pickle=False)
        caption_emb = np.load(folder / CAPTION_FILE, mmap_mode=mode, allow_pickle=False)
        joints = np.load(folder / JOINTS_FILE, mmap_mode=mode, allow_pickle=False) if meta.get("layout") else None
        return cls(motion_emb, caption_emb, meta["motions"], meta, bundle_dir=Path(run_dir) / meta["bundle"],
                   joints=joints)

    @property
    def num_motions(self) -> int:
        return len(self.motion_ids)

    # -- the model ----------------------------------------------------------------------------
    def _model(self) -> _Towers:
        if self._towers is None:
            if self.bundle_dir is None:
                raise SearchError("this index has no bundle to encode queries with: pass embeddings "
                                  "to search_motions instead")
            from rehamot.data import schema
            from rehamot.models.bundle import bundle_identity, load_bundle
            from rehamot.models.factory import build_tokenizer

            model, cfg, info = load_bundle(self.bundle_dir)
            identity = bundle_identity(self.bundle_dir, info)
            for key in ("text_model", "weights_sha256"):
                if identity[key] != self.meta.get(key):
                    raise SearchError(f"the index was built with another {self.bundle_dir.name} bundle "
                                      f"({key} differs): rebuild it with `rehamot-search index`")
            mean, std = schema.mean_std(info)  # floored as when the shards are read
            self._towers = _Towers(model, build_tokenizer(cfg), cfg.data.max_text_len, cfg.data.max_len, mean, std)
        return self._towers

    def warm_up(self) -> None:
        """Load the model now rather than on the first query (a server answers its first query fast)."""
        with self._encode_lock:
            self._model()

    def encode_text(self, text: str) -> np.ndarray:
        """The query's unit embedding (D,) from the bundle's text tower."""
        import torch

        from rehamot.data import tokenize

        text = checked_text(text)
        with self._encode_lock:
            towers = self._model()
            tokens = tokenize(towers.tokenizer, [text], towers.max_text_len)
            with torch.no_grad():
                emb = towers.model.encode_text(tokens["input_ids"], tokens["attention_mask"])
        return emb[0].float().numpy()

    def encode_motion(self, features: np.ndarray) -> np.ndarray:
        """The unit embedding (D,) of raw, un-normalised motion features (T, feature_dim) in the
        bundle's layout: normalised with the bundle's Mean/Std and cropped to the first max_len
        frames, exactly as the index's own motions were encoded."""
        import torch

        from rehamot.data import eval_crop, normalize

        features = self.checked_features(features)
        with self._encode_lock:
            towers = self._model()
            window = normalize(eval_crop(features, towers.max_len), towers.mean, towers.std)
            motion = torch.from_numpy(np.ascontiguousarray(window))[None]
            mask = torch.ones(motion.shape[:2], dtype=torch.bool)
            with torch.no_grad():
                emb = towers.model.encode_motion(motion, mask)
        return emb[0].float().numpy()

    def checked_features(self, features: Any, source: str = "motion") -> np.ndarray:
        """`features` as a finite float32 (T, feature_dim) array, or a one-line SearchError
        naming `source` (a file name) and what is wrong."""
        return checked_features(features, self.meta.get("feature_dim"), self.meta.get("layout"), source)

    def read_motion_file(self, path: str | Path) -> np.ndarray:
        """Raw features from a .npy file (never unpickled), checked as `checked_features`."""
        return self.checked_features(read_features_file(path), source=str(path))

    # -- queries ------------------------------------------------------------------------------
    def search_motions(self, query_emb: np.ndarray, k: int = 5, exclude: int | None = None) -> list[MotionHit]:
        """Top-k motions for a unit query embedding (D,), leaving out the motion at `exclude`."""
        k = checked_k(k)
        scores = self.motion_emb @ np.asarray(query_emb, dtype=self.motion_emb.dtype)
        if exclude is not None:
            scores[exclude] = -np.inf
            k = min(k, self.num_motions - 1)
        return [MotionHit(rank, self.motion_ids[i], float(scores[i]), self.motion_captions[i])
                for rank, i in enumerate(top_k(scores, k), start=1)]

    def search_captions(self, query_emb: np.ndarray, k: int = 5, own: int | None = None) -> list[CaptionHit]:
        """Top-k captions for a unit motion embedding (D,); `own` marks the captions of motion `own`."""
        k = checked_k(k)
        scores = self.caption_emb @ np.asarray(query_emb, dtype=self.caption_emb.dtype)
        return [CaptionHit(rank, self.caption_ids[i], self.motion_ids[self.caption_motion[i]],
                           self.caption_texts[i], float(scores[i]), bool(self.caption_motion[i] == own))
                for rank, i in enumerate(top_k(scores, k), start=1)]

    def motion_position(self, motion_id: str) -> int:
        """The row of `motion_id`, or a SearchError naming a few ids that exist."""
        if motion_id not in self.position:
            split = f" {self.meta['split']}-split" if "split" in self.meta else ""
            raise SearchError(f"unknown motion id {motion_id!r}: the index holds {self.num_motions}{split} "
                              f"motions (e.g. {', '.join(self.motion_ids[:3])})")
        return self.position[motion_id]

    def query_text(self, text: str, k: int = 5) -> list[MotionHit]:
        """Top-k motions for a caption-like text."""
        checked_k(k)
        return self.search_motions(self.encode_text(text), k)

    def query_motion(self, motion_id: str, k: int = 5) -> list[CaptionHit]:
        """Top-k captions of the index for one of its motions; `own` marks its own captions."""
        k = checked_k(k)
        motion = self.motion_position(motion_id)
        return self.search_captions(np.asarray(self.motion_emb[motion]), k, own=motion)

    def similar_motions(self, motion_id: str, k: int = 5) -> list[MotionHit]:
        """The k motions nearest to one of the index's motions, itself left out ("more like this")."""
        k = checked_k(k)
        motion = self.motion_position(motion_id)
        return self.search_motions(np.asarray(self.motion_emb[motion]), k, exclude=motion)

    def query_motion_id(self, motion_id: str, k: int = 5) -> MotionQueryResult:
        """The nearest other motions and the top captions for one of the index's motions."""
        return MotionQueryResult(self.similar_motions(motion_id, k), self.query_motion(motion_id, k))

    def query_motion_features(self, features: np.ndarray, k: int = 5) -> MotionQueryResult:
        """The nearest motions and the top captions for raw motion features (T, feature_dim)."""
        k = checked_k(k)
        emb = self.encode_motion(features)
        return MotionQueryResult(self.search_motions(emb, k), self.search_captions(emb, k))

    def motion_joints(self, motion_id: str) -> np.ndarray:
        """Joint positions (T, J, 3) in metres of one of the index's motions (all its frames)."""
        motion = self.motion_position(motion_id)
        if self.joints is None or self.joint_offsets is None:
            raise SearchError(f"this index stores no joints: its feature width "
                              f"{self.meta.get('feature_dim')} matches no known skeleton layout")
        return np.asarray(self.joints[self.joint_offsets[motion]:self.joint_offsets[motion + 1]])


def checked_features(features: Any, expected: int | None, layout: str | None,
                     source: str = "motion") -> np.ndarray:
    """`features` as a finite float32 (T, expected) array in `layout`, or a one-line SearchError
    naming `source` (a file name) and what is wrong."""
    shape = f"(frames, {expected})" + (f", the {layout} layout" if layout else "")
    array = np.asarray(features)
    if array.dtype.kind not in "fiu":
        raise SearchError(f"{source}: expected real numbers, got dtype {array.dtype}")
    if array.ndim != 2 or (expected is not None and array.shape[1] != int(expected)):
        raise SearchError(f"{source}: features of shape {array.shape}, this model reads {shape}")
    if array.shape[0] < 1:
        raise SearchError(f"{source}: the motion has no frames")
    if not np.isfinite(array).all():
        raise SearchError(f"{source}: the features contain NaN or infinite values")
    return array.astype(np.float32, copy=False)


def checked_text(text: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise SearchError("empty query: give a description to search for, e.g. \"a person jumps twice\"")
    if len(text) > MAX_QUERY_CHARS:
        raise SearchError(f"query of {len(text)} characters: at most {MAX_QUERY_CHARS}")
    try:
        text.encode("utf-8")  # bytes that were not UTF-8 reach us as lone surrogates (argv)
    except UnicodeEncodeError:
        raise SearchError("the query is not valid UTF-8 text") from None
    return text.strip()


def checked_k(k: int) -> int:
    if int(k) < 1:
        raise SearchError(f"top-k must be at least 1, got {k}")
    return int(k)


# --------------------------------------------------------------------------- JSON


def motion_hit_json(hit: MotionHit) -> dict[str, Any]:
    return {"rank": hit.rank, "motion_id": hit.motion_id, "score": round(hit.score, SCORE_DECIMALS),
            "captions": list(hit.captions)}


def caption_hit_json(hit: CaptionHit) -> dict[str, Any]:
    return {"rank": hit.rank, "caption_id": hit.caption_id, "motion_id": hit.motion_id, "text": hit.text,
            "score": round(hit.score, SCORE_DECIMALS)}


def text_query_json(text: str, hits: Sequence[MotionHit]) -> dict[str, Any]:
    """`query --json` and the page's /api/search: {"query", "hits": [{rank, motion_id, score, captions}]}."""
    return {"query": checked_text(text), "hits": [motion_hit_json(hit) for hit in hits]}


def motion_query_json(query: dict[str, Any], result: MotionQueryResult) -> dict[str, Any]:
    """`query --motion/--motion-file --json` and /api/similar: {"query", "motions", "captions"}.
    A caption of the query motion itself has its `motion_id`."""
    return {"query": query, "motions": [motion_hit_json(hit) for hit in result.motions],
            "captions": [caption_hit_json(hit) for hit in result.captions]}


def motion_json(index: SearchIndex, motion_id: str) -> dict[str, Any]:
    """One motion for drawing: {"motion_id", "fps", "layout", "joints" (T x J x [x, y, z] metres), "captions"}."""
    joints = index.motion_joints(motion_id)
    return {"motion_id": motion_id, "fps": index.meta.get("fps"), "layout": index.meta.get("layout"),
            "joints": np.round(joints.astype(np.float64), JOINT_DECIMALS).tolist(),
            "captions": list(index.motion_captions[index.position[motion_id]])}
