"""Train motions that duplicate a val or test motion, within one shard set and across several.

A duplicate (README, "No leaks across corpora"):
1. **Provenance**: both samples name the same `source.file` (a joints source's provenance) with
   overlapping spans (start == end == 0: the whole file).
2. **Content**: after turning both to face Z+ at the origin at the first frame they share, the
   mean joint error over that overlap is under MAX_ERROR_M, and the overlap covers at least
   MIN_OVERLAP of the shorter motion (so a crop of half a motion or more is found); the mirror
   (left/right swapped, x negated) counts too.

The check reads no motion: it works on the coarse keys the sharding script stores beside each
manifest (KEYS_NAME, listed in the manifest with its sha256): per sample, KEY_JOINTS sampled
at KEY_FPS, as poses in the body's own facing frame (float16) plus the root's path on the floor
and its heading (float32). Candidates come from k-d trees of every other frame's pose: the
middle frame of each motion (and of its mirror), the next one and the poses half-way, are looked
up among the frames of the other side (train against val/test and back), because an overlap of
at least half of the shorter motion holds its middle; each hit names an offset, a cheap pose
comparison on a few frames keeps the promising ones, and those are verified over the whole
overlap, half and then quarter key frames apart (crops need not start on a key frame).

Numpy and scipy only: the training start-up and `shards/make_shards.py hygiene` share it.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rehamot.data import locations, schema

KEYS_NAME = "leak-keys.npz"
KEYS_FORMAT = "rehamot-leak-keys"
KEYS_VERSION = 1
KEY_FPS = 10.0  # every other frame of a 20 fps corpus: a crop starts on a key frame or half-way
KEY_JOINTS = ("pelvis", "head", "l_wrist", "r_wrist", "l_ankle", "r_ankle")
MIRROR = [0, 1, 3, 2, 5, 4]  # KEY_JOINTS with left and right swapped
MAX_ERROR_M = 0.05  # mean joint error of a duplicate (docs/benchmarks.md: why 5 cm)
MIN_OVERLAP = 0.5  # of the shorter motion
PHASES = ((0.0, 0.5, -0.5), (0.25, -0.25))  # key frames around a candidate offset (20 fps: halves)
VERIFY_CHUNK = 1024
NEIGHBOURS = 16  # frames looked up per query
CROWDED_M = 0.03  # k neighbours all nearer than this: every frame as near is taken (up to MAX_CROWD)
MAX_CROWD = 4096
TREE_EPS = 1.0  # approximate search: a neighbour within twice the true k-th distance may stand in for it
CANDIDATE_RADIUS_M = 0.12  # pose distance (all key joints together) of a frame worth verifying
TREE_STRIDE = 2  # the k-d trees hold every other key frame (half the memory); queries look up two
PREFILTER = 3.0  # a candidate goes on to the full check if its poses differ by under this x the max error
PREFILTER_FRAMES = 8
OFFSETS_CHECKED = 2  # per (train, eval, mirror) pair: the offsets with the best cheap error
MAX_IDS = 5  # examples per pair in printed reports
LEAKS_FILE = "leaks.json"


class LeakKeysError(ValueError):
    """A shard set's keys are missing, altered or malformed (one line, naming the file)."""


@dataclass
class KeySet:
    """The keys of one shard set: per sample its id, split, parent motion and key frames."""

    name: str
    ids: list[str]
    splits: list[str]
    parents: list[str]
    offsets: np.ndarray  # (n + 1,) int64: sample i's key frames are [offsets[i], offsets[i+1])
    pose: np.ndarray  # (frames, J, 3) float32: joints in the body's facing frame (root x, z = 0)
    root: np.ndarray  # (frames, 2) float32: root x, z on the floor
    heading: np.ndarray  # (frames,) float32: facing angle (radians, unwrapped)
    provenance: dict[str, tuple[str, float, float]] = field(default_factory=dict)  # parent -> span
    sha256: str | None = None  # of the keys file

    def __len__(self) -> int:
        return len(self.ids)


# -- computing keys (at sharding time) -----------------------------------------------------------
def motion_key(joints: np.ndarray, heading: np.ndarray, fps: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pose, root, heading) key frames at KEY_FPS from joints (T, len(KEY_JOINTS), 3) in the
    motion's frame (y up, frame 0 at the origin facing Z+; joint 0 the root) and the root's
    heading (T,) per frame (world = yaw_rotate(local, heading) + root)."""
    joints, heading = np.asarray(joints, np.float64), np.asarray(heading, np.float64)
    frames = len(joints)
    positions = np.arange(0.0, frames - 1 + 1e-9, fps / KEY_FPS) if frames > 1 else np.zeros(1)
    low = np.minimum(np.floor(positions).astype(int), frames - 1)
    high = np.minimum(low + 1, frames - 1)
    w = positions - low
    sampled = joints[low] * (1 - w)[:, None, None] + joints[high] * w[:, None, None]
    angle = heading[low] * (1 - w) + heading[high] * w
    root = sampled[:, 0, [0, 2]]
    local = sampled.copy()
    local[..., 0] -= root[:, None, 0]
    local[..., 2] -= root[:, None, 1]
    pose = _yaw(local, -angle)
    return pose.astype(np.float16), root.astype(np.float32), angle.astype(np.float32)


def encode_keys(ids: Sequence[str], splits: Sequence[str], parents: Sequence[str],
                keys: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray] | None]) -> bytes:
    """The keys file's bytes (.npz, no pickle); a None key: a sample without content keys."""
    lengths = [0 if k is None else len(k[0]) for k in keys]
    joints = len(KEY_JOINTS)
    pose = [k[0] for k in keys if k is not None] or [np.zeros((0, joints, 3), np.float16)]
    root = [k[1] for k in keys if k is not None] or [np.zeros((0, 2), np.float32)]
    heading = [k[2] for k in keys if k is not None] or [np.zeros(0, np.float32)]
    header = {"format": KEYS_FORMAT, "version": KEYS_VERSION, "fps": KEY_FPS, "joints": list(KEY_JOINTS)}
    arrays = {"header": np.array(json.dumps(header)), "ids": np.array(list(ids), dtype=str),
              "splits": np.array(list(splits), dtype=str), "parents": np.array(list(parents), dtype=str),
              "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
              "pose": np.concatenate(pose).astype(np.float16), "root": np.concatenate(root).astype(np.float32),
              "heading": np.concatenate(heading).astype(np.float32)}
    # np.savez stamps each member with the time: a fixed date keeps the file (and the manifest's
    # sha256) the same for the same shards
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            with archive.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w") as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    return buffer.getvalue()


# -- reading keys --------------------------------------------------------------------------------
def has_keys(manifest: dict[str, Any]) -> bool:
    return isinstance(manifest.get("leak_keys"), dict)


def load_keys(location: str, manifest: dict[str, Any], name: str) -> KeySet:
    """The keys a manifest lists, checked against its sha256; LeakKeysError (one line) otherwise."""
    entry = manifest.get("leak_keys")
    where = locations.join(str(location), KEYS_NAME)
    if not isinstance(entry, dict):
        raise LeakKeysError(f"{locations.join(str(location), schema.MANIFEST_NAME)} lists no leak keys: "
                            f"re-shard it, or remove that manifest and run make_shards.py index on the folder")
    try:
        file_name = schema.check_file_name(entry.get("path"), where)
        where = locations.join(str(location), file_name)
        data = locations.read_bytes(where)
    except (OSError, schema.ShardSetError) as err:
        raise LeakKeysError(f"{where}: cannot read the leak keys ({str(err)[:200]}); copy the whole "
                            f"shard folder again, or {schema.RESHARD}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.get("sha256"):
        raise LeakKeysError(f"{where}: sha256 differs from the manifest's (the keys were altered or belong "
                            f"to another build); {schema.RESHARD}")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            header = json.loads(str(npz["header"]))
            if header.get("format") != KEYS_FORMAT or header.get("version") != KEYS_VERSION \
                    or header.get("joints") != list(KEY_JOINTS) or header.get("fps") != KEY_FPS:
                raise ValueError(f"not version {KEYS_VERSION} of {KEYS_FORMAT} ({KEY_FPS:g} fps, "
                                 f"{', '.join(KEY_JOINTS)})")
            keys = KeySet(name, npz["ids"].tolist(), npz["splits"].tolist(), npz["parents"].tolist(),
                          npz["offsets"].astype(np.int64), npz["pose"].astype(np.float32),
                          npz["root"].astype(np.float32), npz["heading"].astype(np.float32), sha256=digest)
        _check_shapes(keys)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as err:
        raise LeakKeysError(f"{where}: not a leak keys file ({str(err)[:200]}); {schema.RESHARD}") from None
    keys.provenance = _provenance(manifest.get("provenance") or {})
    return keys


def _check_shapes(keys: KeySet) -> None:
    n, frames = len(keys.ids), len(keys.pose)
    offsets = keys.offsets
    if len(keys.splits) != n or len(keys.parents) != n or offsets.shape != (n + 1,) or offsets[0] != 0 \
            or offsets[-1] != frames or np.any(np.diff(offsets) < 0) or keys.pose.shape[1:] != (len(KEY_JOINTS), 3) \
            or keys.root.shape != (frames, 2) or keys.heading.shape != (frames,) \
            or not (np.isfinite(keys.pose).all() and np.isfinite(keys.root).all() and np.isfinite(keys.heading).all()):
        raise ValueError("inconsistent arrays")


def _provenance(records: dict[str, Any]) -> dict[str, tuple[str, float, float]]:
    spans = {}
    for motion_id, source in records.items():
        if isinstance(source, dict) and isinstance(source.get("file"), str):
            spans[motion_id] = (source["file"], float(source.get("start", 0.0)), float(source.get("end", 0.0)))
    return spans


# -- geometry ------------------------------------------------------------------------------------
def _yaw(points: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Rotate (..., [J,] 3) about +y by angle (...) (rehamot.motion.kinematics.yaw_rotate's sense)."""
    shape = angle.shape + (1,) * (points.ndim - angle.ndim - 1)
    cos, sin = np.cos(angle).reshape(shape), np.sin(angle).reshape(shape)
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    return np.stack([cos * x + sin * z, y, cos * z - sin * x], axis=-1)


def mirrored(pose: np.ndarray, root: np.ndarray, heading: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The left/right mirror of key frames: x negated, left and right joints swapped."""
    pose = pose[..., MIRROR, :] * np.array([-1.0, 1.0, 1.0], pose.dtype)
    return pose, root * np.array([-1.0, 1.0], root.dtype), -heading


def _canonical(pose: np.ndarray, root: np.ndarray, heading: np.ndarray) -> np.ndarray:
    """Joints of key frames (..., L, J, 3) turned to face Z+ at the origin at frame 0 of L."""
    turn = heading - heading[..., :1]
    path = root - root[..., :1, :]
    step = np.zeros(path.shape[:-1] + (3,), path.dtype)
    step[..., 0], step[..., 2] = path[..., 0], path[..., 1]
    step = _yaw(step, -np.broadcast_to(heading[..., :1], heading.shape))
    return _yaw(pose, turn) + step[..., None, :]


def _interpolate(array: np.ndarray, index: np.ndarray, last: np.ndarray) -> np.ndarray:
    """array at fractional frame positions `index` (clipped to [0, last] per row)."""
    index = np.clip(index, 0, last)
    low = np.floor(index).astype(np.int64)
    high = np.minimum(low + 1, last.astype(np.int64))
    w = (index - low).reshape(index.shape + (1,) * (array.ndim - 1)).astype(array.dtype)
    return array[low] * (1 - w) + array[high] * w


def overlap_errors(keys: KeySet, a: np.ndarray, b: np.ndarray, offset: np.ndarray, mirror: np.ndarray,
                   other: KeySet | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mean joint error in metres, overlap in frames of the shorter) of sample a[i] (mirrored
    where mirror[i]) against sample b[i] of `other` (default `keys`), frame t of a lying at
    t + offset[i] of b; inf where the overlap is under MIN_OVERLAP of the shorter."""
    other = keys if other is None else other
    a, b, offset = np.asarray(a), np.asarray(b), np.asarray(offset, np.float64)
    la = keys.offsets[a + 1] - keys.offsets[a]
    lb = other.offsets[b + 1] - other.offsets[b]
    first = np.ceil(np.maximum(0.0, -offset)).astype(np.int64)
    last = np.floor(np.minimum(la - 1, lb - 1 - offset)).astype(np.int64)
    length = last - first + 1
    shorter = np.minimum(la, lb)
    enough = (length >= 1) & (length * 2 >= MIN_OVERLAP * 2 * shorter - 1)  # half a key frame of slack
    errors = np.full(len(a), np.inf)
    fraction = np.where(shorter > 0, length / np.maximum(shorter, 1), 0.0)
    if not enough.any():
        return errors, fraction
    rows = np.flatnonzero(enough)
    width = int(length[rows].max())
    steps = np.arange(width)
    valid = steps[None, :] < length[rows, None]
    ta = keys.offsets[a[rows], None] + np.minimum(first[rows, None] + steps[None, :], la[rows, None] - 1)
    pose_a, root_a, head_a = keys.pose[ta], keys.root[ta], keys.heading[ta]
    flip = mirror[rows]
    if flip.any():
        pose_a[flip], root_a[flip], head_a[flip] = mirrored(pose_a[flip], root_a[flip], head_a[flip])
    position = first[rows, None] + steps[None, :] + offset[rows, None]
    base, end = other.offsets[b[rows], None].astype(np.float64), (lb[rows, None] - 1).astype(np.float64)
    index = base + np.clip(position, 0, end)
    lastrow = base + end
    pose_b = _interpolate(other.pose, index, lastrow)
    root_b = _interpolate(other.root, index, lastrow)
    head_b = _interpolate(other.heading, index, lastrow)
    gap = np.linalg.norm(_canonical(pose_a, root_a, head_a) - _canonical(pose_b, root_b, head_b), axis=-1).mean(-1)
    errors[rows] = (gap * valid).sum(1) / length[rows]
    return errors, fraction


# -- the check -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Match:
    train_set: int
    train: int  # sample index in its set
    other_set: int
    other: int
    kind: str  # provenance | copy | mirror
    error_m: float | None


def find_leaks(sets: Sequence[KeySet], *, train_split: str = "train",
               eval_splits: Sequence[str] = ("val", "test"), max_error: float = MAX_ERROR_M) -> dict[str, Any]:
    """Every train sample of every set that duplicates a val/test sample of any set (the module
    docstring's definition), as a JSON-able report: per (train set, eval set) pair the count and
    ids, per set the ids to drop, the definition and the time taken."""
    started = time.perf_counter()
    merged = _merge(sets, train_split, eval_splits)
    is_train = merged.split_code == 0
    is_eval = merged.split_code == 1
    found: dict[tuple[int, int], Match] = {}

    def keep(match: Match) -> None:
        key = (merged.flat(match.train_set, match.train), match.other_set)
        old = found.get(key)
        if old is None or _better(match, old):
            found[key] = match

    for match in _provenance_matches(sets, train_split, set(eval_splits)):
        keep(match)
    for match in _content_matches(merged, is_train, is_eval, max_error):
        keep(match)
    return _report(sets, found, train_split, eval_splits, max_error, time.perf_counter() - started,
                   merged)


def _better(new: Match, old: Match) -> bool:
    rank = {"provenance": 0, "copy": 1, "mirror": 1}
    if rank[new.kind] != rank[old.kind]:
        return rank[new.kind] < rank[old.kind]
    return (new.error_m or 0.0) < (old.error_m or 0.0)


@dataclass
class _Merged:
    """Every set's samples in one numbering (sets one after the other)."""

    keys: KeySet
    set_of: np.ndarray
    index_in_set: np.ndarray
    starts: np.ndarray  # first flat index of each set
    split_code: np.ndarray  # 0 train, 1 eval, 2 other

    def flat(self, set_index: int, sample: int) -> int:
        return int(self.starts[set_index] + sample)


def _merge(sets: Sequence[KeySet], train_split: str = "train",
           eval_splits: Sequence[str] = ("val", "test")) -> _Merged:
    ids, splits, parents, offsets, set_of, index_in_set, starts = [], [], [], [np.zeros(1, np.int64)], [], [], []
    frames = 0
    for number, keys in enumerate(sets):
        starts.append(len(ids))
        ids += keys.ids
        splits += keys.splits
        parents += keys.parents
        offsets.append(keys.offsets[1:] + frames)
        frames += int(keys.offsets[-1])
        set_of.append(np.full(len(keys), number))
        index_in_set.append(np.arange(len(keys)))
    joints = len(KEY_JOINTS)
    keys = KeySet("all", ids, splits, parents, np.concatenate(offsets),
                  np.concatenate([k.pose for k in sets] or [np.zeros((0, joints, 3), np.float32)]),
                  np.concatenate([k.root for k in sets] or [np.zeros((0, 2), np.float32)]),
                  np.concatenate([k.heading for k in sets] or [np.zeros(0, np.float32)]))
    code = np.array([0 if s == train_split else 1 if s in eval_splits else 2 for s in splits], np.int64)
    return _Merged(keys, np.concatenate(set_of or [np.zeros(0, int)]), np.concatenate(index_in_set or [np.zeros(0, int)]),
                   np.array(starts, np.int64), code)


def _provenance_matches(sets: Sequence[KeySet], train_split: str, eval_splits: set[str]):
    by_file: dict[str, list[tuple[bool, int, int, float, float]]] = {}
    for number, keys in enumerate(sets):
        for i, (split, parent) in enumerate(zip(keys.splits, keys.parents)):
            span = keys.provenance.get(parent)
            if span is None or (split != train_split and split not in eval_splits):
                continue
            file, start, end = span
            by_file.setdefault(file, []).append((split == train_split, number, i, start, end))
    for entries in by_file.values():
        trains = [e for e in entries if e[0]]
        evals = [e for e in entries if not e[0]]
        for _, ts, ti, t0, t1 in trains:
            for _, es, ei, e0, e1 in evals:
                if _spans_overlap(t0, t1, e0, e1):
                    yield Match(ts, ti, es, ei, "provenance", None)


def _spans_overlap(s0: float, e0: float, s1: float, e1: float) -> bool:
    """Seconds; start == end == 0 is the whole file."""
    whole = (s0 == e0 == 0.0) or (s1 == e1 == 0.0)
    return whole or (max(s0, s1) < min(e0, e1))


def _pose_error(keys: KeySet, cand: np.ndarray) -> np.ndarray:
    """A cheap error of candidates (a, b, offset, mirror): the mean distance of the poses (in each
    body's own facing frame) on PREFILTER_FRAMES frames of the overlap; inf where the overlap is
    too short."""
    a, b, offset, flip = cand[:, 0], cand[:, 1], cand[:, 2], cand[:, 3].astype(bool)
    la, lb = keys.offsets[a + 1] - keys.offsets[a], keys.offsets[b + 1] - keys.offsets[b]
    first = np.maximum(0, -offset)
    length = np.minimum(la, lb - offset) - first
    ok = (length >= 1) & (length * 2 >= MIN_OVERLAP * 2 * np.minimum(la, lb) - 1)
    rows = np.flatnonzero(ok)
    steps = np.linspace(0.0, 1.0, PREFILTER_FRAMES)
    at = first[rows, None] + np.round(steps[None, :] * (length[rows, None] - 1)).astype(np.int64)
    pose_a = keys.pose[keys.offsets[a[rows], None] + at]
    if flip.any():
        pose_a[flip[rows]] = mirrored(pose_a[flip[rows]], np.zeros(pose_a[flip[rows]].shape[:-2] + (2,), np.float32),
                                      np.zeros(pose_a[flip[rows]].shape[:-2], np.float32))[0]
    pose_b = keys.pose[keys.offsets[b[rows], None] + at + offset[rows, None]]
    error = np.full(len(cand), np.inf)
    error[rows] = np.linalg.norm(pose_a - pose_b, axis=-1).mean((1, 2))
    return error


def _content_matches(merged: _Merged, is_train: np.ndarray, is_eval: np.ndarray, max_error: float):
    from scipy.spatial import cKDTree  # noqa: PLC0415 (only the check needs it)

    keys = merged.keys
    if not len(keys.pose):
        return
    lengths = np.diff(keys.offsets)
    frame_sample = np.repeat(np.arange(len(lengths)), lengths)
    desc = keys.pose.reshape(len(keys.pose), -1)
    mirror_desc = mirrored(keys.pose, keys.root, keys.heading)[0].reshape(len(keys.pose), -1)
    candidates = []
    for query_side, db_side in ((is_train, is_eval), (is_eval, is_train)):
        in_db = db_side[frame_sample] & ((np.arange(len(frame_sample)) - keys.offsets[frame_sample]) % TREE_STRIDE == 0) \
            if len(frame_sample) else np.zeros(0, bool)
        db_frames = np.flatnonzero(in_db)
        queries = np.flatnonzero(query_side & (lengths > 0))
        if not len(db_frames) or not len(queries):
            continue
        tree = cKDTree(desc[db_frames])
        # every TREE_STRIDE-th frame is in the tree: look up the middle frame and the next ones, and
        # the poses half-way between them (a crop of a 20 fps motion may start between key frames)
        for shift in np.arange(0.0, TREE_STRIDE, 0.5):
            at = np.minimum((lengths[queries] - 1) // 2 + shift, lengths[queries] - 1)
            middle = np.floor(at).astype(np.int64)
            w = (at - middle)[:, None].astype(np.float32)
            low = keys.offsets[queries] + middle
            high = keys.offsets[queries] + np.minimum(middle + 1, lengths[queries] - 1)
            for flip, table in ((False, desc), (True, mirror_desc)):
                looked_up = table[low] * (1 - w) + table[high] * w
                dist, hit = tree.query(looked_up, k=NEIGHBOURS, distance_upper_bound=CANDIDATE_RADIUS_M,
                                       eps=TREE_EPS, workers=-1)
                rows, cols = np.nonzero(np.isfinite(dist))
                found = hit[rows, cols]
                # near-identical frames of many motions (a rest pose) can fill the k nearest: then
                # every frame as near as the k-th is taken, so the copy among them is not lost
                crowded = np.flatnonzero(dist[:, -1] < CROWDED_M)
                if len(crowded):
                    balls = tree.query_ball_point(looked_up[crowded], r=dist[crowded, -1] + 1e-4, workers=-1)
                    counts = np.array([min(len(ball), MAX_CROWD) for ball in balls])
                    rows = np.concatenate([rows, np.repeat(crowded, counts)])
                    found = np.concatenate([found, *[np.asarray(ball[:MAX_CROWD], np.int64) for ball in balls]])
                frame = db_frames[found]
                other = frame_sample[frame]
                # a half-way pose gives an offset half a key frame off: verified at +-0.5 too
                offset = (frame - keys.offsets[other]) - middle[rows]
                sample = queries[rows]
                if query_side is is_train:  # train a's frame t lies at t + offset of eval b
                    candidates.append(np.stack([sample, other, offset, np.full(len(rows), flip)], 1))
                else:  # the eval motion was looked up: swap the roles, negate the offset
                    candidates.append(np.stack([other, sample, -offset, np.full(len(rows), flip)], 1))
    if not candidates:
        return
    cand = np.unique(np.concatenate(candidates).astype(np.int64), axis=0)
    rough = _pose_error(keys, cand)
    keep = rough < PREFILTER * max_error
    cand, rough = cand[keep], rough[keep]
    # the OFFSETS_CHECKED best offsets of each (a, b, mirror), by the cheap error
    order = np.lexsort((rough, cand[:, 3], cand[:, 1], cand[:, 0]))
    cand = cand[order]
    pair = cand[:, [0, 1, 3]]
    new_pair = np.ones(len(cand), bool)
    new_pair[1:] = np.any(pair[1:] != pair[:-1], axis=1)
    rank = np.arange(len(cand)) - np.maximum.accumulate(np.where(new_pair, np.arange(len(cand)), 0))
    cand, rough = cand[rank < OFFSETS_CHECKED], rough[order][rank < OFFSETS_CHECKED]
    # best first, and a train sample found against one set is not checked against it again
    cand = cand[np.argsort(rough, kind="stable")]
    found: set[tuple[int, int]] = set()
    for chunk in range(0, len(cand), VERIFY_CHUNK):
        part = cand[chunk:chunk + VERIFY_CHUNK]
        part = part[[(int(a), int(merged.set_of[b])) not in found for a, b in part[:, :2]]]
        best = np.full(len(part), np.inf)
        for phases in PHASES:  # the quarter phases only where the half phases found nothing
            rows = np.flatnonzero(best >= max_error)
            for phase in phases:
                errors, _ = overlap_errors(keys, part[rows, 0], part[rows, 1], part[rows, 2] + phase,
                                           part[rows, 3].astype(bool))
                best[rows] = np.minimum(best[rows], errors)
        for (a, b, _, flip), error in zip(part[best < max_error], best[best < max_error]):
            if (int(a), int(merged.set_of[b])) in found:
                continue
            found.add((int(a), int(merged.set_of[b])))
            yield Match(int(merged.set_of[a]), int(merged.index_in_set[a]), int(merged.set_of[b]),
                        int(merged.index_in_set[b]), "mirror" if flip else "copy", round(float(error), 4))


def _report(sets: Sequence[KeySet], found: dict[tuple[int, int], Match], train_split: str,
            eval_splits: Sequence[str], max_error: float, seconds: float, merged: _Merged) -> dict[str, Any]:
    pairs = []
    for t, train_set in enumerate(sets):
        for e, eval_set in enumerate(sets):
            matches = sorted((m for m in found.values() if m.train_set == t and m.other_set == e),
                             key=lambda m: train_set.ids[m.train])
            pairs.append({
                "train": train_set.name, "against": eval_set.name, "count": len(matches),
                "duplicates": [{"id": train_set.ids[m.train], "of": f"{eval_set.splits[m.other]}/{eval_set.ids[m.other]}",
                                "kind": m.kind, **({"error_m": m.error_m} if m.error_m is not None else {})}
                               for m in matches],
            })
    dropped = {keys.name: sorted({keys.ids[m.train] for m in found.values() if m.train_set == t})
               for t, keys in enumerate(sets)}
    return {
        "definition": {"provenance": "same source.file, overlapping spans",
                       "max_mean_joint_error_m": max_error, "min_overlap_of_shorter": MIN_OVERLAP,
                       "mirror": True, "key_fps": KEY_FPS, "key_joints": list(KEY_JOINTS),
                       "train_split": train_split, "eval_splits": list(eval_splits)},
        "sets": {keys.name: {"samples": len(keys), "train": int(sum(s == train_split for s in keys.splits)),
                             "eval": int(sum(s in eval_splits for s in keys.splits)),
                             "without_content_keys": int(np.sum(np.diff(keys.offsets) == 0)),
                             "keys_sha256": keys.sha256} for keys in sets},
        "pairs": pairs,
        "dropped": dropped,
        "seconds": round(seconds, 3),
    }


def report_lines(report: dict[str, Any]) -> list[str]:
    """One line per pair of sets: train duplicates of the other's val/test, with examples."""
    lines = []
    for pair in report["pairs"]:
        head = (f"{pair['train']} train vs {pair['against']} "
                f"{'/'.join(report['definition']['eval_splits'])}: {pair['count']} duplicate(s)")
        if pair["count"]:
            shown = "; ".join(f"{d['id']} ~ {d['of']} ({d['kind']}"
                              f"{', %.1f cm' % (100 * d['error_m']) if 'error_m' in d else ''})"
                              for d in pair["duplicates"][:MAX_IDS])
            head += f", e.g. {shown}"
        lines.append(head)
    return lines


# -- a training run's check ------------------------------------------------------------------------
def resolve_action(action: str, sources: int) -> str:
    """data.leaks with `auto` resolved: drop with several sources, off for one."""
    return ("drop" if sources > 1 else "off") if action == "auto" else action


def run_inputs(sources: Sequence[tuple[str, dict[str, Any]]], action: str, train_split: str,
               eval_splits: Sequence[str]) -> dict[str, Any]:
    """What a run's report depends on: the action, the splits and each source's keys (sha256 from
    its manifest; None: no keys). A resumed run reuses its report only if these are the same."""
    return {"action": action, "train_split": train_split, "eval_splits": list(eval_splits),
            "keys": {name: (m.get("leak_keys") or {}).get("sha256") for name, m in sources}}


def check_sources(sources: Sequence[tuple[str, str, dict[str, Any]]], *, train_split: str = "train",
                  eval_splits: Sequence[str] = ("val", "test"), require_keys: bool = True
                  ) -> tuple[dict[str, Any], list[str]]:
    """find_leaks over (name, location, manifest) shard sets; and the names of those skipped for
    lack of keys (LeakKeysError instead when require_keys)."""
    sets, skipped = [], []
    for name, location, manifest in sources:
        if not has_keys(manifest) and not require_keys:
            skipped.append(name)
            continue
        sets.append(load_keys(location, manifest, name))
    return find_leaks(sets, train_split=train_split, eval_splits=eval_splits), skipped
