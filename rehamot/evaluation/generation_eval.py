"""A trained retrieval model as the evaluator of text-to-motion generation (Guo et al., CVPR 2022).

Generation papers score generated motions with a pretrained text/motion embedding pair: how
often a prompt retrieves its own generated motion among 32 (R-precision), how far the
generated set lies from the real one (FID), how spread out it is (diversity) and how much the
generations of one prompt differ (multimodality). Any rehamot bundle can play the evaluator:

    from rehamot import Evaluator
    ev = Evaluator.load("runs/demo-20261126-222833")        # a run dir or a bundle folder
    scores = ev.score(captions, generated, real_motions=real, repeats=20)
    scores["generated"]["fid"], scores["generated"]["r_precision_top3_ci95"]

Guo's replications, as here: each of `repeats` replications draws one caption per motion and
shuffles the order, both seeded by (seed, replication index). The real row (the real motions
on the same ids) and the generated row use the same draws and order, so real motions passed
as generated reproduce the real row exactly. Per replication: R-precision top-1/2/3 and the
matching score over consecutive groups of `batch_size` in the shuffled order (the last
incomplete group dropped), diversity (300 random pairs, seeded by the replication), and with
repeated generations multimodality (10 pairs among each prompt's generations). The values
are the mean and 95% confidence half-width over replications (`mean_ci95`).

Where a fixed set of generated files differs from Guo's loop: Guo regenerates the motions in
each replication; here the motion sets are fixed, so FID (which does not depend on the
caption draws or the order) is computed once and its CI is 0. FID and diversity use every
motion, not only those in full R-precision groups (Guo's loader drops the last incomplete
batch for them too; on HumanML3D's 4,384 test motions no batch is incomplete).

FID's reference is the real motions' embeddings when they are given, else the statistics
(mean, covariance) of the split's real motion embeddings saved in the bundle
(`fid_stats-<split>.safetensors`, written at the end of training and by
`evaluate_generation.py`), so a bundle copied anywhere can score without the shards.

What an embedding pooled over frames misses (per-frame noise barely moves R-precision or
FID) is scored on the joints: jitter, foot skating, penetration and floating
(`rehamot.motion.physics`), in both rows as the mean over the set's motions, and per
generated motion under "per_motion" so the worst can be found. They depend on neither the
caption draws nor the order: like FID, their CI is 0.

The replication logic (`score_embeddings`) is numpy only; torch is imported when an
`Evaluator` is loaded.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rehamot.evaluation import generation_metrics as gm
from rehamot.evaluation.generation_metrics import (
    GUO_BATCH_SIZE,
    GUO_DIVERSITY_TIMES,
    GUO_MULTIMODALITY_TIMES,
    matching_score,
    mean_ci95,
    multimodality,
    r_precision,
)
from rehamot.evaluation.generation_metrics import diversity as diversity_metric
from rehamot.motion import physics

TOP_K = 3
METRICS = ("r_precision_top1", "r_precision_top2", "r_precision_top3", "fid", "matching_score",
           "diversity", "multimodality") + physics.MEASURES
FID_STATS_FORMAT = "rehamot-fid-stats/1"
DEFAULT_REPEATS = 20


def fid_stats_file(split: str) -> str:
    return f"fid_stats-{split}.safetensors"


# --------------------------------------------------------------------------- FID statistics


@dataclass(frozen=True)
class FidStats:
    """Mean (D,) and covariance (D, D), float64, of a set of motion embeddings."""

    mu: np.ndarray
    sigma: np.ndarray
    num_motions: int

    @classmethod
    def of(cls, emb: np.ndarray) -> FidStats:
        """np.mean / np.cov(rowvar=False), as generation_metrics.frechet_distance fits them."""
        emb = np.asarray(emb, dtype=np.float64)
        if emb.ndim != 2 or emb.shape[0] < 2:
            raise ValueError(f"FID statistics need at least 2 embeddings (N, D), got shape {emb.shape}")
        if not np.isfinite(emb).all():
            raise ValueError("embeddings contain NaN or inf")
        return cls(emb.mean(axis=0), np.atleast_2d(np.cov(emb, rowvar=False)), emb.shape[0])


def frechet_from_stats(a: FidStats, b: FidStats) -> float:
    """`generation_metrics.frechet_distance` from fitted statistics (the same formula and the
    same eps fallback), so a saved reference needs no embeddings."""
    return gm.frechet_distance_of_gaussians(a.mu, a.sigma, b.mu, b.sigma)


def save_fid_stats(bundle_dir: str | Path, stats: FidStats, split: str, weights_sha256: str) -> Path:
    """BUNDLE/fid_stats-<split>.safetensors (float64 mu, sigma), atomically; the metadata names
    the bundle weights it was computed with, so a stale file is refused on load."""
    import os

    from safetensors.numpy import save_file

    from rehamot.checksums import write_checksums

    path = Path(bundle_dir) / fid_stats_file(split)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"mu": np.ascontiguousarray(stats.mu, np.float64), "sigma": np.ascontiguousarray(stats.sigma, np.float64)},
              str(tmp), metadata={"format": FID_STATS_FORMAT, "split": split, "num_motions": str(stats.num_motions),
                                  "weights_sha256": weights_sha256})
    os.replace(tmp, path)
    write_checksums(path.parent)  # the bundle's checksums cover its statistics
    return path


def load_fid_stats(bundle_dir: str | Path, split: str, weights_sha256: str | None = None) -> FidStats | None:
    """The bundle's saved statistics of `split`, or None when it has none."""
    from safetensors import safe_open

    path = Path(bundle_dir) / fid_stats_file(split)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="np") as handle:
        meta = handle.metadata() or {}
        mu, sigma = handle.get_tensor("mu"), handle.get_tensor("sigma")
    if meta.get("format") != FID_STATS_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, this rehamot reads {FID_STATS_FORMAT}")
    if weights_sha256 is not None and meta.get("weights_sha256") != weights_sha256:
        raise ValueError(f"{path} was computed with other weights than this bundle's; delete it "
                         "(evaluate_generation.py with the shards writes it again)")
    return FidStats(mu.astype(np.float64), sigma.astype(np.float64), int(meta.get("num_motions", 0)))


def encode_split_motions(model, eval_set, device, batch_size: int = 128) -> np.ndarray:
    """Unit embeddings (M, D) of every motion of an EvalSet (each rank encodes its share,
    like rehamot.evaluation.retrieval_eval.encode_split without the captions)."""
    import torch

    from rehamot import distributed as dist_utils

    was_training = model.training
    model.eval()
    emb = torch.zeros(eval_set.num_motions, model.motion.cfg.embed_dim, device=device)
    with torch.no_grad():
        for batch in eval_set.motion_batches(batch_size):
            out = model.encode_motion(batch["motion"].to(device), batch["motion_mask"].to(device))
            emb[batch["index"].to(device)] = out.float()
    model.train(was_training)
    return dist_utils.all_reduce_sum(emb).cpu().numpy()  # each row filled by one rank, zero elsewhere


def save_run_fid_stats(run_dir: str | Path, evaluated: Path, motion_emb: np.ndarray, eval_set, device,
                       batch_size: int = 128, write: bool = True) -> list[Path]:
    """The split's real motion statistics in the run's best/ and final/ bundles.

    `motion_emb` are the split's motion embeddings by the `evaluated` bundle; a bundle with
    other weights encodes the split again. Every rank calls it (encoding is a collective);
    only `write` ranks write.
    """
    from rehamot.models.bundle import WEIGHTS_FILE, bundle_identity, load_bundle

    written, computed = [], {}
    for name in ("best", "final"):
        folder = Path(run_dir) / name
        if not (folder / WEIGHTS_FILE).is_file():
            continue
        weights_sha256 = bundle_identity(folder, {})["weights_sha256"]
        if weights_sha256 not in computed:  # best/ and final/ hold the same weights when the last step was best
            if folder.resolve() == Path(evaluated).resolve():
                emb = motion_emb
            else:
                model, _, _ = load_bundle(folder, device=device)
                emb = encode_split_motions(model, eval_set, device, batch_size)
            computed[weights_sha256] = FidStats.of(emb)
        if write:
            written.append(save_fid_stats(folder, computed[weights_sha256], eval_set.cfg.split, weights_sha256))
    return written


# --------------------------------------------------------------------------- replications


def replication_draws(caption_counts: Sequence[int], repeats: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each replication r: (caption choice (N,), order (N,)), from default_rng([seed, r]).

    choice[i] is the index, among motion i's captions, of the one drawn for it; order is the
    permutation the rows are taken in (the shuffled loader of Guo's evaluation).
    """
    counts = np.asarray(caption_counts, dtype=np.int64)
    if counts.ndim != 1 or counts.size == 0 or (counts < 1).any():
        raise ValueError("every motion needs at least one caption")
    draws = []
    for r in range(repeats):
        rng = np.random.default_rng([seed, r, 0])
        choice = rng.integers(0, counts)
        order = rng.permutation(counts.size)
        draws.append((choice, order))
    return draws


def _row(per_replication: dict[str, list], fid: float | None) -> dict[str, Any]:
    """Mean and CI95 of each metric over replications, flat keys (`fid`, `fid_ci95`, ...)."""
    row: dict[str, Any] = {}
    r_mean, r_ci = mean_ci95(per_replication["r_precision"])
    for k in range(TOP_K):
        row[f"r_precision_top{k + 1}"], row[f"r_precision_top{k + 1}_ci95"] = float(r_mean[k]), float(r_ci[k])
    if fid is None:
        row["fid"], row["fid_ci95"] = None, None
    else:
        row["fid"], row["fid_ci95"] = fid, 0.0  # fixed motion sets: the same in every replication
    for name in ("matching_score", "diversity", "multimodality"):
        values = per_replication.get(name)
        if values:
            row[name], row[f"{name}_ci95"] = mean_ci95(values)
        else:
            row[name], row[f"{name}_ci95"] = None, None
    for name in physics.MEASURES:  # measured on the joints, by the Evaluator (`with_physics`)
        row[name], row[f"{name}_ci95"] = None, None
    return row


def with_physics(row: dict[str, Any], means: dict[str, Any]) -> dict[str, Any]:
    """The row with the set's physical means; CI 0, as FID's: the motion set is fixed, so no
    replication changes them."""
    for name in physics.MEASURES:
        value = means.get(name)
        row[name], row[f"{name}_ci95"] = value, None if value is None else 0.0
    return row


def score_embeddings(caption_emb: np.ndarray, caption_counts: Sequence[int], generated_emb: np.ndarray,
                     real_emb: np.ndarray | None = None, reference: FidStats | None = None,
                     repeats: int = DEFAULT_REPEATS, batch_size: int = GUO_BATCH_SIZE, seed: int = 0,
                     generated_repeat_emb: np.ndarray | None = None) -> dict[str, Any]:
    """Guo's replications on embeddings: the rows of "real" and "generated", counts and notes.

    caption_emb (C, D) holds every caption, grouped by motion in motion order (caption_counts[i]
    rows for motion i); generated_emb and real_emb (N, D) are row-aligned with the motions.
    FID is against `reference`, or the statistics of real_emb when `reference` is None.
    generated_repeat_emb (M, R, D), R generations of each of M prompts, gives multimodality.
    Without real_emb the "real" row is None.
    """
    caption_emb = np.asarray(caption_emb, dtype=np.float64)
    generated_emb = np.asarray(generated_emb, dtype=np.float64)
    counts = np.asarray(caption_counts, dtype=np.int64)
    num = generated_emb.shape[0]
    if isinstance(repeats, bool) or int(repeats) != repeats or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    if counts.shape != (num,):
        raise ValueError(f"{counts.size} caption counts for {num} motions")
    if caption_emb.shape[0] != counts.sum():
        raise ValueError(f"{caption_emb.shape[0]} caption embeddings, the counts add up to {counts.sum()}")
    if num < batch_size:
        raise ValueError(f"{num} motions is fewer than one R-precision batch of {batch_size}")
    if real_emb is not None:
        real_emb = np.asarray(real_emb, dtype=np.float64)
        if real_emb.shape != generated_emb.shape:
            raise ValueError(f"real embeddings {real_emb.shape} and generated {generated_emb.shape} differ in shape")
    if reference is None:
        if real_emb is None:
            raise ValueError("FID needs a reference: real motions, or FID statistics saved in the bundle")
        reference = FidStats.of(real_emb)

    notes: list[str] = []
    div_pairs = gm.pairs_to_draw(num, GUO_DIVERSITY_TIMES)
    if div_pairs < GUO_DIVERSITY_TIMES:
        notes.append(f"diversity: {num} motions is not more than {GUO_DIVERSITY_TIMES} pairs; "
                     f"used {div_pairs} pairs per replication")
    mm_pairs = 0
    if generated_repeat_emb is not None:
        generated_repeat_emb = np.asarray(generated_repeat_emb, dtype=np.float64)
        if generated_repeat_emb.ndim != 3 or generated_repeat_emb.shape[1] < 2:
            raise ValueError(f"multimodality needs (prompts, generations >= 2, D) embeddings, "
                             f"got shape {generated_repeat_emb.shape}")
        mm_pairs = gm.pairs_to_draw(generated_repeat_emb.shape[1], GUO_MULTIMODALITY_TIMES)
        if mm_pairs < GUO_MULTIMODALITY_TIMES:
            notes.append(f"multimodality: {generated_repeat_emb.shape[1]} generations per prompt is not more "
                         f"than {GUO_MULTIMODALITY_TIMES} pairs; used {mm_pairs} pairs per replication")

    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rows = {"generated": generated_emb, "real": real_emb}
    values: dict[str, dict[str, list]] = {name: {"r_precision": [], "matching_score": [], "diversity": []}
                                          for name, emb in rows.items() if emb is not None}
    for r, (choice, order) in enumerate(replication_draws(counts, repeats, seed)):
        texts = caption_emb[offsets[order] + choice[order]]
        for name in values:
            motions = rows[name][order]
            values[name]["r_precision"].append(r_precision(texts, motions, batch_size, TOP_K))
            values[name]["matching_score"].append(matching_score(texts, motions, batch_size))
            values[name]["diversity"].append(diversity_metric(motions, div_pairs, seed=[seed, r, 1]))
        if generated_repeat_emb is not None:
            values["generated"].setdefault("multimodality", []).append(
                multimodality(generated_repeat_emb, mm_pairs, seed=[seed, r, 2]))

    result: dict[str, Any] = {
        "real": _row(values["real"], frechet_from_stats(FidStats.of(real_emb), reference)) if real_emb is not None else None,
        "generated": _row(values["generated"], frechet_from_stats(FidStats.of(generated_emb), reference)),
        "counts": {
            "motions": num, "captions": int(counts.sum()), "repeats": int(repeats), "batch_size": int(batch_size),
            "rows_per_replication": num - num % batch_size, "diversity_pairs": div_pairs,
            "multimodality_prompts": 0 if generated_repeat_emb is None else int(generated_repeat_emb.shape[0]),
            "multimodality_generations": 0 if generated_repeat_emb is None else int(generated_repeat_emb.shape[1]),
            "multimodality_pairs": mm_pairs,
        },
        "seed": seed,
        "notes": notes,
    }
    if real_emb is None:
        notes.append("no real motions given: the real row is empty")
    if generated_repeat_emb is None:
        notes.append("no repeated generations: multimodality is not computed")
    return result


# --------------------------------------------------------------------------- the evaluator


def _caption_lists(texts: Sequence[str | Sequence[str]]) -> list[list[str]]:
    """Each motion's captions: a string is one caption, a sequence several."""
    lists = []
    for i, item in enumerate(texts):
        captions = [item] if isinstance(item, str) else list(item)
        if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
            raise ValueError(f"motion {i}: needs at least one non-empty caption, got {item!r}")
        lists.append(captions)
    return lists


def check_motion(motion: Any, feature_dim: int, what: str = "motion") -> np.ndarray:
    """A (T >= 1, F) finite real array, or ValueError saying what is wrong with it."""
    array = np.asarray(motion)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] != feature_dim:
        raise ValueError(f"{what}: shape {array.shape}, expected (frames >= 1, {feature_dim})")
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{what}: dtype {array.dtype}, expected float")
    if not np.isfinite(array).all():
        raise ValueError(f"{what}: contains NaN or inf")
    return array


class Evaluator:
    """A bundle's two towers as a generation evaluator (embeddings, Guo's metrics).

    Motions are raw features in the corpus's layout (T, F); they are cropped to the first
    `data.max_len` frames and normalised with the bundle's Mean/Std (floored as for training),
    exactly as the evaluation set feeds them.
    """

    def __init__(self, model, cfg, info: dict[str, Any], bundle_dir: Path, device) -> None:
        from rehamot.data.schema import STD_FLOOR
        from rehamot.models.bundle import bundle_mean_std
        from rehamot.models.factory import build_tokenizer

        self.model, self.cfg, self.info, self.bundle_dir, self.device = model, cfg, info, Path(bundle_dir), device
        mean, std = bundle_mean_std(info)
        self.mean, self.std = mean, np.maximum(std, STD_FLOOR)  # as rehamot.data.schema.mean_std
        self.feature_dim = int(info["feature_dim"])
        self.layout = physics.layout_for_width(self.feature_dim)  # None: no joints, no physical measures
        self.fps = float(info["fps"]) if info.get("fps") else None
        self.max_len = int(cfg.data.max_len)
        self.tokenizer = build_tokenizer(cfg)
        self._identity: dict[str, Any] | None = None

    @classmethod
    def load(cls, bundle_or_run_dir: str | Path, device=None) -> Evaluator:
        """A run dir (its best/, else final/ bundle) or a bundle folder, copied anywhere."""
        from rehamot.distributed import local_device
        from rehamot.models.bundle import find_bundle, load_bundle

        bundle = find_bundle(bundle_or_run_dir)
        device = device if device is not None else local_device()
        model, cfg, info = load_bundle(bundle, device)
        return cls(model, cfg, info, bundle, device)

    @property
    def identity(self) -> dict[str, Any]:
        """The bundle's step, text-model fingerprint and weights sha256 (computed once)."""
        if self._identity is None:
            from rehamot.models.bundle import bundle_identity

            self._identity = {"path": str(self.bundle_dir), **bundle_identity(self.bundle_dir, self.info)}
        return self._identity

    # -- embeddings ---------------------------------------------------------------------------
    def check_motion(self, motion: Any, what: str = "motion") -> np.ndarray:
        return check_motion(motion, self.feature_dim, what)

    def embed_motions(self, motions: Sequence[np.ndarray], batch_size: int | None = None) -> np.ndarray:
        """Unit embeddings (N, D) of raw motions, in batches, in the given order."""
        import torch

        from rehamot.data.collate import pad_motions
        from rehamot.data.motion import eval_crop, normalize

        batch_size = batch_size or self.cfg.train.eval_batch_size
        windows = [normalize(eval_crop(self.check_motion(m, f"motion {i}"), self.max_len), self.mean, self.std)
                   for i, m in enumerate(motions)]
        out = np.zeros((len(windows), self.model.motion.cfg.embed_dim), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, len(windows), batch_size):
                batch = pad_motions(windows[start:start + batch_size])
                emb = self.model.encode_motion(batch["motion"].to(self.device), batch["motion_mask"].to(self.device))
                out[start:start + len(emb)] = emb.float().cpu().numpy()
        return out

    def embed_texts(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Unit embeddings (N, D) of texts; each distinct text is encoded once."""
        import torch

        from rehamot.data.collate import tokenize

        batch_size = batch_size or self.cfg.train.eval_batch_size
        unique = list(dict.fromkeys(texts))
        emb = np.zeros((len(unique), self.model.text.cfg.embed_dim), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, len(unique), batch_size):
                tokens = tokenize(self.tokenizer, unique[start:start + batch_size], self.cfg.data.max_text_len)
                out = self.model.encode_text(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))
                emb[start:start + len(out)] = out.float().cpu().numpy()
        position = {text: i for i, text in enumerate(unique)}
        return emb[[position[t] for t in texts]] if texts else emb

    # -- physical measures --------------------------------------------------------------------
    def physics(self, motions: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> dict[str, Any]:
        """Jitter, foot skating, penetration and floating of raw (un-normalised) motions in the
        bundle's layout, a dict id -> (T, F) or a list (ids "0", "1", ...): each measure's mean
        over the set, and "per_motion": {id: {measure: value}} (None where a motion is too
        short for it). The whole motion counts, not only the window the towers see."""
        if self.layout is None:
            raise ValueError(f"physical measures need joints: {self.feature_dim}-wide features match no known "
                             f"skeleton layout (263: humanml3d, 251: kitml)")
        items = motions.items() if isinstance(motions, Mapping) else enumerate(motions)
        checked = {str(key): self.check_motion(m, f"motion {key}") for key, m in items}
        return physics.measure_motions(checked, self.layout, self.fps)

    # -- FID statistics -----------------------------------------------------------------------
    def fid_stats(self, split: str = "test") -> FidStats | None:
        """The real `split` motions' statistics saved in the bundle, or None."""
        return load_fid_stats(self.bundle_dir, split, self.identity["weights_sha256"])

    def save_fid_stats(self, real_motions: Sequence[np.ndarray], split: str = "test") -> Path:
        """Embed the split's real motions (all of them) and save their statistics into the bundle."""
        stats = FidStats.of(self.embed_motions(real_motions))
        return save_fid_stats(self.bundle_dir, stats, split, self.identity["weights_sha256"])

    # -- scoring ------------------------------------------------------------------------------
    def score(self, texts: Sequence[str | Sequence[str]], generated_motions: Sequence[np.ndarray],
              real_motions: Sequence[np.ndarray] | None = None, repeats: int = DEFAULT_REPEATS,
              batch_size: int = GUO_BATCH_SIZE, seed: int = 0,
              generated_repeats: Sequence[Sequence[np.ndarray]] | None = None, split: str = "test",
              ids: Sequence[str] | None = None) -> dict[str, Any]:
        """Guo's metrics of the generated motions, and of the real ones on the same prompts.

        texts[i] is motion i's caption, or its list of captions (one is drawn per replication);
        generated_motions[i] (and real_motions[i]) are raw (T, F) motions for it.
        generated_repeats: for multimodality, several generations of each of some prompts
        (trimmed to the smallest count, with a note). Without real motions, FID is against the
        bundle's saved statistics of `split`, and the "real" row is None.
        Both rows carry the physical measures (see `physics`); "per_motion" has each generated
        motion's, under ids[i] (default "0", "1", ...).
        Returns {"real", "generated", "counts", "notes", "bundle", "split", "fid_reference", "seed",
        "per_motion"}.
        """
        captions = _caption_lists(texts)
        num = len(captions)
        if len(generated_motions) != num:
            raise ValueError(f"{len(generated_motions)} generated motions for {num} texts")
        if real_motions is not None and len(real_motions) != num:
            raise ValueError(f"{len(real_motions)} real motions for {num} texts")
        if num < batch_size:  # before any encoding: a doomed call fails at once
            raise ValueError(f"{num} motions is fewer than one R-precision batch of {batch_size}")
        ids = [str(i) for i in range(num)] if ids is None else [str(i) for i in ids]
        if len(ids) != num or len(set(ids)) != num:
            raise ValueError(f"ids: {len(set(ids))} distinct ids for {num} motions")
        reference = None
        if real_motions is None:
            reference = self.fid_stats(split)
            if reference is None:
                raise ValueError(f"the bundle {self.bundle_dir} has no FID statistics of the {split!r} split "
                                 f"({fid_stats_file(split)}); give real motions, or run evaluate_generation.py "
                                 "with the shards once to save them")
        repeat_emb, trimmed = None, None
        if generated_repeats is not None:
            usable = [list(g) for g in generated_repeats if len(g) >= 2]
            if not usable:
                raise ValueError("generated_repeats: multimodality needs at least 2 generations of a prompt")
            per_prompt = min(len(g) for g in usable)
            trimmed = sum(len(g) > per_prompt for g in usable)
            flat = [m for g in usable for m in g[:per_prompt]]
            repeat_emb = self.embed_motions(flat).reshape(len(usable), per_prompt, -1)

        flat_captions = [c for group in captions for c in group]
        result = score_embeddings(
            self.embed_texts(flat_captions), [len(c) for c in captions], self.embed_motions(generated_motions),
            None if real_motions is None else self.embed_motions(real_motions), reference,
            repeats=repeats, batch_size=batch_size, seed=seed, generated_repeat_emb=repeat_emb)
        cropped = sum(np.shape(m)[0] > self.max_len for m in generated_motions)
        if cropped:
            result["notes"].append(f"{cropped} generated motions longer than {self.max_len} frames were cropped "
                                   f"to their first {self.max_len} (as the evaluator sees real ones)")
        if trimmed:
            result["notes"].append(f"multimodality: {trimmed} prompts with more than {repeat_emb.shape[1]} "
                                   f"generations used their first {repeat_emb.shape[1]}")
        self._add_physics(result, ids, generated_motions, real_motions)
        result["fid_reference"] = (
            {"source": "real motions", "motions": num} if reference is None else
            {"source": "bundle", "file": fid_stats_file(split), "motions": reference.num_motions})
        return {"bundle": self.identity, "split": split, **result}

    def _add_physics(self, result: dict[str, Any], ids: list[str], generated: Sequence[np.ndarray],
                     real: Sequence[np.ndarray] | None) -> None:
        """The physical measures into both rows and "per_motion" (or a note why there are none)."""
        if self.layout is None:
            result["per_motion"] = {}
            result["notes"].append(f"no physical measures: {self.feature_dim}-wide features match no known "
                                   "skeleton layout")
            return
        measured = self.physics(dict(zip(ids, generated)))
        with_physics(result["generated"], measured)
        if real is not None:
            with_physics(result["real"], self.physics(dict(zip(ids, real))))
        result["per_motion"] = measured["per_motion"]


# --------------------------------------------------------------------------- real motions from shards


def read_split(shards: str, split: str) -> tuple[list[str], dict[str, list[str]], dict[str, np.ndarray]]:
    """(ids, captions per id, raw motion per id) of a shard split, every sample checked."""
    from rehamot.data import EvalSet
    from rehamot.data.pipeline import DataConfig
    from rehamot.data.reading import read_raw_motions

    eval_set = EvalSet(DataConfig(shards=shards, split=split))
    captions: dict[str, list[str]] = {sample_id: [] for sample_id in eval_set.ids}
    for caption in eval_set.captions:
        captions[eval_set.ids[caption.motion]].append(caption.text)
    motions = read_raw_motions(shards, split, eval_set.ids)
    missing = [i for i in eval_set.ids if i not in motions]
    if missing:
        raise ValueError(f"split {split!r}: {len(missing)} motions missing from the shards, e.g. {missing[:3]}")
    return eval_set.ids, captions, motions


# --------------------------------------------------------------------------- tables


_COLUMNS = (("R@1", "r_precision_top1"), ("R@2", "r_precision_top2"), ("R@3", "r_precision_top3"),
            ("FID", "fid"), ("MM dist", "matching_score"), ("diversity", "diversity"), ("MModality", "multimodality"))
# (label, key, factor): heights in cm on screen, where 3 decimals of a metre hide the mm
_PHYSICS_COLUMNS = (("jitter m/s³", "jitter", 1.0), ("skating", "foot_skating", 1.0), ("penetr. cm", "penetration", 100.0),
                    ("float cm", "floating", 100.0))


def _number(value: float, mean: bool = True) -> str:
    """3 decimals; a mean below 0.001 (the FID of close sets) in 2 significant digits rather
    than 0.000. A round-off negative FID of identical sets (see frechet_distance) shows as 0."""
    if -1e-6 < value < 0:
        value = 0.0
    return f"{value:.1e}" if mean and 0 < abs(value) < 0.001 else f"{value:.3f}"


def format_scores(result: dict[str, Any], title: str | None = None):
    """A rich table: rows real / generated, columns the metrics as mean ± CI95 (3 decimals), and
    the physical measures when the rows have them (heights in cm; the JSON keeps metres)."""
    from rich.table import Table

    rows = [result.get(name) for name in ("real", "generated")]
    measured = any(row and row.get(key) is not None for row in rows for _, key, _ in _PHYSICS_COLUMNS)
    columns = tuple((label, key, 1.0) for label, key in _COLUMNS) + (_PHYSICS_COLUMNS if measured else ())
    table = Table(title=title)
    table.add_column("motions", no_wrap=True)
    for label, _, _ in columns:
        table.add_column(label, justify="right", no_wrap=True)
    for name, row in zip(("real", "generated"), rows):
        if row is None:
            table.add_row(name, *["-"] * len(columns))
            continue
        cells = []
        for _, key, factor in columns:
            value, ci = row.get(key), row.get(f"{key}_ci95")
            cells.append("-" if value is None else f"{_number(value * factor)} ± {_number(ci * factor, mean=False)}")
        table.add_row(name, *cells)
    return table
