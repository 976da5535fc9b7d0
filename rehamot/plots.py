"""PNG figures written into the run directory (matplotlib, no display needed)."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_training_curves(metrics_jsonl: Path, out: Path) -> None:
    train, val = [], []
    for line in Path(metrics_jsonl).read_text().splitlines():
        rec = json.loads(line)
        (val if any(k.startswith("val/") for k in rec) else train).append(rec)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
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
    plt.close(fig)


def plot_similarity(scores: np.ndarray, out: Path, limit: int = 64) -> None:
    """Heat-map of motion x caption cosine similarities of one batch (diagonal = positives)."""
    scores = scores[:limit, :limit]
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    im = ax.imshow(scores, cmap="viridis", vmin=-1, vmax=1)
    ax.set(title="batch similarity (motion rows, caption columns)", xlabel="caption", ylabel="motion")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
