"""PNG figures written into the run directory (matplotlib, no display needed)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global backend to choose, nothing to close


def plot_training_curves(metrics_jsonl: Path, out: Path) -> None:
    train, val = [], []
    for line in Path(metrics_jsonl).read_text().splitlines():
        rec = json.loads(line)
        # a record is a training step (it has a loss), a validation, or another kind (a warning)
        if any(k.startswith("val/") for k in rec):
            val.append(rec)
        elif "loss" in rec:
            train.append(rec)
    fig = Figure(figsize=(14, 3.8))
    axes = fig.subplots(1, 3)
    if train:
        steps = [r["step"] for r in train]
        axes[0].plot(steps, [r["loss"] for r in train])
        axes[0].set(title="training loss", xlabel="step")
        axes[1].plot(steps, [r["dropped_negatives"] for r in train])
        axes[1].set(title="dropped negatives per step (global)", xlabel="step")
    if val:
        steps = [r["step"] for r in val]
        for key in ("val/t2m/R@10", "val/m2t/R@10", "val/t2m/R@1", "val/m2t/R@1"):
            if key in val[0]:
                axes[2].plot(steps, [r[key] for r in val], marker="o", label=key[4:])
        axes[2].set(title="validation recall (%)", xlabel="step")
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def plot_similarity(scores: np.ndarray, out: Path, limit: int = 64) -> None:
    """Heat-map of motion x caption cosine similarities of one batch (diagonal = positives)."""
    scores = scores[:limit, :limit]
    fig = Figure(figsize=(5.5, 4.8))
    ax = fig.subplots()
    im = ax.imshow(scores, cmap="viridis", vmin=-1, vmax=1)
    ax.set(title="batch similarity (motion rows, caption columns)", xlabel="caption", ylabel="motion")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


@dataclass(frozen=True)
class RetrievedMotion:
    motion_id: str
    score: float
    caption: str  # one caption of the retrieved motion, to judge the hit by eye
    correct: bool


@dataclass(frozen=True)
class RetrievalExample:
    query: str
    target_id: str  # the query caption's own motion
    hits: Sequence[RetrievedMotion]


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def plot_retrieval_examples(examples: Sequence[RetrievalExample], out: Path, title: str = "") -> None:
    """Each query caption, then its top motions (rank, id, score, a caption) in green (its own
    motion) or red. Text only: a motion is judged by its captions here, not rendered."""
    lines: list[tuple[str, str, str]] = []  # (text, colour, weight)
    for example in examples:
        lines.append((f'query: "{_clip(example.query, 90)}"   (its motion: {example.target_id})', "black", "bold"))
        for rank, hit in enumerate(example.hits, start=1):
            mark = "✓" if hit.correct else "✗"
            text = f"  {mark} {rank}. {hit.motion_id:<14} {hit.score:+.3f}  {_clip(hit.caption, 80)}"
            lines.append((text, "#1a7f37" if hit.correct else "#c62828", "normal"))
        lines.append(("", "black", "normal"))
    height = 0.6 + 0.22 * len(lines)
    fig = Figure(figsize=(11, height))
    if title:
        fig.suptitle(title, x=0.01, y=1 - 0.15 / height, ha="left", fontsize=11)
    top = 1 - 0.5 / height
    for i, (text, colour, weight) in enumerate(lines):
        fig.text(0.01, top - i * 0.22 / height, text, color=colour, weight=weight, family="monospace",
                 fontsize=8.5, va="top")
    fig.savefig(out, dpi=90)


# 1-based rank bins: one per rank up to 5, then widening (capped bins keep the tail readable)
RANK_BIN_EDGES = (1, 2, 3, 4, 5, 6, 11, 21, 51, 101, 201, 501, 1001, 10001)


def _rank_bins(top: int) -> tuple[list[int], list[str]]:
    edges = [e for e in RANK_BIN_EDGES if e <= top]
    edges.append(top + 1 if top + 1 < RANK_BIN_EDGES[-1] else np.iinfo(np.int64).max)
    labels = []
    for low, high in zip(edges[:-1], edges[1:]):
        if high == np.iinfo(np.int64).max:
            labels.append(f"≥{low}")
        else:
            labels.append(str(low) if high - low == 1 else f"{low}–{high - 1}")
    return edges, labels


def plot_rank_histograms(t2m_ranks: np.ndarray, m2t_ranks: np.ndarray, out: Path, title: str = "") -> None:
    """Bar charts of the 1-based rank of the correct item (0-based rank + 1), on capped bins
    (1, 2, .., 5, 6-10, 11-20, 21-50, ...), each panel titled with its R@1/5/10 and MedR."""
    fig = Figure(figsize=(11, 3.8))
    axes = fig.subplots(1, 2)
    for ax, ranks, label in ((axes[0], t2m_ranks, "text→motion, one query per caption"),
                             (axes[1], m2t_ranks, "motion→text, one query per motion")):
        positions = np.asarray(ranks, dtype=np.int64) + 1
        edges, labels = _rank_bins(int(positions.max()))
        counts, _ = np.histogram(positions, bins=np.asarray(edges, dtype=np.float64))
        colours = ["#1a7f37" if high <= 11 else "#4c72b0" for high in edges[1:]]  # inside R@10: green
        bars = ax.bar(range(len(counts)), counts, color=colours)
        ax.bar_label(bars, fontsize=7)
        ax.set_xticks(range(len(counts)), labels, rotation=45, fontsize=8)
        recalls = ", ".join(f"R@{k} {100 * float(np.mean(positions <= k)):.1f}" for k in (1, 5, 10))
        medr = float(np.floor(np.median(positions - 1)) + 1)
        ax.set_title(f"{label}\n{recalls}, MedR {medr:g}", fontsize=9)
        ax.set(xlabel="rank of the correct item (1 = top)", ylabel="queries")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def plot_score_matrix(values: np.ndarray, rows: Sequence[str], columns: Sequence[str], out: Path,
                      title: str = "", label: str = "rsum") -> None:
    """Heat map of one score per (row, column), e.g. the rsum of each run (rows) on each test
    set (columns), each cell written in; NaN cells are left blank."""
    values = np.asarray(values, dtype=np.float64)
    fig = Figure(figsize=(2.0 + 1.4 * len(columns), 1.6 + 0.6 * len(rows)))
    ax = fig.subplots()
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), labels=list(columns), rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels=list(rows))
    ax.set(title=title, xlabel="test set", ylabel="run")
    middle = np.nanmean(values) if np.isfinite(values).any() else 0.0
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):  # dark text on light cells, light on dark
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=9,
                    color="black" if value > middle else "white")
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
