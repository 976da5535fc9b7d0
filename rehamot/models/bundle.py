"""The exported model bundle: what evaluation and search load, with no pickle anywhere.

RUN_DIR/<name>/  (name = "best" for the checkpoint chosen on val, "final" for the last step)
    model.safetensors   every weight of the two towers (the language model included)
    config.yaml         the run's resolved config (reloads under rehamot.config's schema)
    bundle.json         Mean/Std of the motion features, feature dim, fps, the text model's
                        name/path, weights hash and pooling, the step and val metrics
Bundles can be handed to others: loading one reads only safetensors, YAML and JSON.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rehamot.checksums import IntegrityError, sha256_file, verify_checksums, write_checksums
from rehamot.config import Config, load_config, to_yaml
from rehamot.models import TwoTower
from rehamot.models.factory import build_model

BUNDLE_FILE = "bundle.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"


def export_bundle(
    out_dir: str | Path,
    state_dict: dict[str, torch.Tensor],
    text_fingerprint: dict[str, Any],
    cfg: Config,
    manifest: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write atomically: a sibling temp folder, then a rename over the old bundle."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in state_dict.items()}
    save_file(state, str(tmp / WEIGHTS_FILE))
    (tmp / CONFIG_FILE).write_text(to_yaml(cfg))
    info = {
        "format": "rehamot-bundle/1",
        "feature_dim": int(manifest["feature_dim"]),
        "fps": float(manifest["fps"]),
        "corpus": manifest.get("corpus"),
        "mean": [float(x) for x in manifest["mean"]],
        "std": [float(x) for x in manifest["std"]],
        "text_model": text_fingerprint,
        **(extra or {}),
    }
    (tmp / BUNDLE_FILE).write_text(json.dumps(info, indent=1))
    write_checksums(tmp)  # last; rewritten when a model card or FID statistics are added
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    return out_dir


class BundleError(IntegrityError):
    """A bundle whose files do not match its checksums; the message names the file."""


def load_bundle(bundle_dir: str | Path, device: str | torch.device = "cpu") -> tuple[TwoTower, Config, dict[str, Any]]:
    """Model (eval mode), its config and bundle.json; weights via safetensors only, after every
    file of the bundle matched its checksum."""
    bundle_dir = Path(bundle_dir)
    if not (bundle_dir / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{bundle_dir} holds no {WEIGHTS_FILE}: not an exported rehamot bundle")
    verify_checksums(bundle_dir, "bundle", BundleError)
    cfg = load_config(bundle_dir / CONFIG_FILE)
    info = json.loads((bundle_dir / BUNDLE_FILE).read_text())
    model = build_model(cfg, feature_dim=int(info["feature_dim"]))
    missing, unexpected = model.load_state_dict(load_file(str(bundle_dir / WEIGHTS_FILE)), strict=False)
    if missing or unexpected:
        raise ValueError(f"{bundle_dir}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.to(device).eval()
    return model, cfg, info


def bundle_mean_std(info: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(info["mean"], np.float32), np.asarray(info["std"], np.float32)


def bundle_identity(bundle_dir: str | Path, info: dict[str, Any]) -> dict[str, Any]:
    """What identifies a bundle's towers: its step, the text model's fingerprint and the sha256
    of its weights file (content only, so a copied bundle keeps its identity). Results computed
    with a bundle (a search index, generation scores, FID statistics) record it."""
    return {"step": info.get("step"), "text_model": info.get("text_model"),
            "weights_sha256": sha256_file(Path(bundle_dir) / WEIGHTS_FILE)}


def find_bundle(run_dir: str | Path) -> Path:
    """A run dir's best bundle, else its final one; or the folder itself if it is a bundle."""
    run_dir = Path(run_dir)
    for candidate in (run_dir, run_dir / "best", run_dir / "final"):
        if (candidate / WEIGHTS_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"no exported bundle in {run_dir} (expected best/ or final/ with {WEIGHTS_FILE})")
