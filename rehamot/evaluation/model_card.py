"""The model card: a README.md inside each exported bundle, written after the test evaluation.

A bundle is meant to be handed to others (evaluation, search, scoring generated motions), so
it says, in the folder itself, what it was trained on (corpus, shard checksums, splits), what
it is (towers, text encoder), how it was trained (key settings), what it scores (every
protocol of eval-<test split>.json, one table each, never mixed) and how to use it.

Plain reading of JSON/YAML/safetensors headers: no torch, so it can be regenerated anywhere:

    from rehamot.evaluation.model_card import write_model_card
    write_model_card("runs/demo-20261126-222833/best")
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rehamot.checksums import write_checksums
from rehamot.config import Config, eval_shards, load_config

CARD_FILE = "README.md"
# rehamot.models.bundle's BUNDLE_FILE / CONFIG_FILE / WEIGHTS_FILE, not imported: export imports torch
BUNDLE_FILE, CONFIG_FILE, WEIGHTS_FILE = "bundle.json", "config.yaml", "model.safetensors"
_DIRECTIONS = (("t2m", "text→motion"), ("m2t", "motion→text"))


def shards_digest(manifest: Mapping[str, Any]) -> tuple[int, str | None]:
    """(number of shards, one sha256 over every shard's path and sha256 in manifest order);
    None when some shard has no checksum."""
    records = [r for split in manifest.get("splits", {}).values() for r in split.get("shards", [])]
    if not records or not all(r.get("sha256") for r in records):
        return len(records), None
    digest = hashlib.sha256()
    for record in records:
        digest.update(f"{record['path']}\0{record['sha256']}\n".encode())
    return len(records), digest.hexdigest()


def _parameters(weights: Path) -> int | None:
    """Tensor elements in the safetensors file, from its header (nothing loaded)."""
    try:
        with weights.open("rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    except (OSError, ValueError):
        return None
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for size in entry["shape"]:
            count *= int(size)
        total += count
    return total


def _count(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return "-" if value is None else str(value)


def protocol_table(metrics: Mapping[str, float]) -> str:
    """One protocol's metrics as a markdown table: a row per direction, a column per metric."""
    columns: list[str] = []
    for key in metrics:
        if "/" in key and key.split("/", 1)[1] not in columns:
            columns.append(key.split("/", 1)[1])
    columns.sort(key=lambda c: (c == "MedR", int(c[2:]) if c.startswith("R@") and c[2:].isdigit() else 0))
    lines = ["| direction | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for direction, label in _DIRECTIONS:
        cells = [_number(metrics.get(f"{direction}/{c}")) for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    extra = {k: v for k, v in metrics.items() if "/" not in k}
    if extra:
        lines.append("")
        lines.append(", ".join(f"{k}: {_number(v)}" for k, v in extra.items()))
    return "\n".join(lines)


def _data_section(manifest: Mapping[str, Any] | None, cfg: Config) -> list[str]:
    lines = ["## Data", ""]
    if manifest is None:
        return lines + [f"The shard manifest ({eval_shards(cfg.data)}) was not readable when this card was written.", ""]
    count, digest = shards_digest(manifest)
    lines += [
        f"- corpus: `{manifest.get('corpus')}`, {manifest.get('feature_dim')} features per frame at "
        f"{manifest.get('fps')} fps ({manifest.get('dtype', 'float32')}); Mean/Std from "
        f"{manifest.get('mean_std_source', 'the corpus')} (stored in `bundle.json`)",
        f"- shards: {count} tar files; sha256 over the manifest's shard checksums: "
        + (f"`{digest}`" if digest else "not available (a shard has no sha256)"),
        f"- trained on `{cfg.data.train_split}`, best checkpoint chosen on `{cfg.data.val_split}`, "
        f"tested on `{cfg.data.test_split}`",
        *([f"- trained on a mixture; each source's `{cfg.data.train_split}` visited weight times per epoch: "
           + ", ".join(f"`{s['name']}` ({s.get('corpus')}, {s.get('train_motions')} motions, weight {s['weight']:g})"
                       for s in manifest["sources"])
           + "; the table and the evaluation are the eval source's"] if manifest.get("sources") else []),
        "",
        "| split | motions | captions | shards |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, split in manifest.get("splits", {}).items():
        lines.append(f"| {name} | {split.get('motions')} | {split.get('captions')} | {len(split.get('shards', []))} |")
    return lines + [""]


def _model_section(info: Mapping[str, Any], cfg: Config, parameters: int | None) -> list[str]:
    m, text = cfg.model, info.get("text_model") or {}
    layers = text.get("num_layers")
    lines = [
        "## Model",
        "",
        f"- motion tower: transformer, {m.layers} layers, width {m.d_model}, {m.heads} heads, feed-forward {m.ff}, "
        f"dropout {m.dropout}; sees the first {cfg.data.max_len} frames of a motion",
        f"- text encoder: `{text.get('model', m.text_model)}` ({text.get('model_type', '?')}, "
        f"{layers if layers is not None else '?'} layers, hidden {text.get('hidden_size', '?')}, "
        f"{text.get('pooling', m.pooling)} pooling, up to {cfg.data.max_text_len} tokens), "
        + ("fine-tuned" if m.finetune_lm else "frozen") + f"; fingerprint `{text.get('digest', '?')}`",
        f"- joint space: {m.embed_dim} dimensions, unit vectors (cosine similarity)",
    ]
    if parameters is not None:
        lines.append(f"- {parameters:,} parameters in `model.safetensors` (the language model included)")
    return lines + [""]


def _training_section(cfg: Config, info: Mapping[str, Any], meta: Mapping[str, Any] | None) -> list[str]:
    t, loss = cfg.train, cfg.loss
    warmup = (f"{loss.warmup_loss} for {_count(loss.warmup_steps, 'step')}" if loss.warmup_steps else
              f"{loss.warmup_loss} for {_count(loss.warmup_epochs, 'epoch')}" if loss.warmup_epochs else "none")
    world = (meta or {}).get("world_size")
    lines = [
        "## Training",
        "",
        f"- loss: `{loss.name}` (margin {loss.margin}; warm-up: {warmup}"
        + (f"; drop thresholds motion {loss.threshold_motion}, text {loss.threshold_text}, {loss.threshold_mode}"
           if loss.name == "droptriple" else "") + ")",
        f"- {_count(t.epochs, 'epoch')}" + (f", at most {_count(t.max_steps, 'step')}" if t.max_steps else "")
        + f", batch {t.batch_size} per process" + (f" × {_count(world, 'process', 'processes')}" if world else "")
        + f"; lr {t.lr} ({t.schedule} schedule, {t.lr_warmup_steps} warm-up steps)"
        + (f", LM lr {t.lm_lr}" if cfg.model.finetune_lm else "") + f", weight decay {t.weight_decay}; seed {cfg.seed}",
        f"- this bundle: step {info.get('step')}",
    ]
    val = info.get("val")
    if val:
        lines.append(f"- validation (`{cfg.data.val_split}`, captions protocol) at that step: "
                     + ", ".join(f"{k} {_number(v)}" for k, v in val.items()))
    if meta and meta.get("git_commit"):
        lines.append(f"- rehamot commit `{meta['git_commit']}`")
    return lines + ["", "The full resolved config is `config.yaml` next to this file.", ""]


def _evaluation_section(evaluation: Mapping[str, Any] | None, bundle_name: str, split: str) -> list[str]:
    lines = ["## Evaluation", ""]
    if not evaluation or not evaluation.get("protocols"):
        return lines + [f"No `eval-{split}.json` was found for this run.", ""]
    evaluated = evaluation.get("bundle")
    lines.append(f"Split `{evaluation.get('split', split)}`"
                 + (f" ({evaluation['motions']} motions, {evaluation['captions']} captions)" if "motions" in evaluation else "")
                 + f", bundle `{evaluated}` (step {evaluation.get('step')}). Recalls in %.")
    if evaluated and evaluated != bundle_name:
        lines.append(f"These numbers are those of `{evaluated}/`, not of this `{bundle_name}/` bundle.")
    lines.append("Each protocol is its own table; their numbers are not comparable with each other.")
    for protocol, metrics in evaluation["protocols"].items():
        lines += ["", f"### {protocol}", "", protocol_table(metrics)]
    for protocol, reason in (evaluation.get("skipped") or {}).items():
        lines += ["", f"`{protocol}` skipped: {reason}"]
    return lines + [""]


def _usage_section(bundle_name: str, split: str, has_fid_stats: bool) -> list[str]:
    return [
        "## Use",
        "",
        "Load it (safetensors, YAML and JSON only; the folder can be copied anywhere):",
        "",
        "```python",
        "from rehamot import load_bundle",
        f'model, cfg, info = load_bundle("{bundle_name}")   # this folder',
        "```",
        "",
        "Evaluate, search (`RUN_DIR` is the folder holding this one):",
        "",
        "```bash",
        "rehamot-eval RUN_DIR --protocol every",
        "rehamot-search index RUN_DIR && rehamot-search query RUN_DIR \"a person jumps twice\"",
        "```",
        "",
        "As the evaluator of text-to-motion generation (Guo et al.'s R-precision, FID, matching score, "
        "diversity, multimodality): `DIR` holds one `<motion_id>.npy` of raw features per "
        f"`{split}` motion (and optionally `DIR/repeats/<motion_id>/<r>.npy`):",
        "",
        "```bash",
        f"rehamot-eval-generation RUN_DIR --generated DIR --split {split} --json scores.json",
        "```",
        "",
        "```python",
        "from rehamot import Evaluator",
        f'ev = Evaluator.load("{bundle_name}")',
        "scores = ev.score(captions, generated_motions)   # lists, one entry per prompt",
        "```",
        "",
        (f"Without real motions, FID uses the real `{split}` statistics saved here "
         f"(`fid_stats-{split}.safetensors`)." if has_fid_stats else
         f"This bundle has no saved `{split}` FID statistics yet: give real motions, or run "
         "`rehamot-eval-generation` with the shards once."),
        "",
    ]


def model_card(bundle_dir: str | Path, manifest: Mapping[str, Any] | None = None,
               evaluation: Mapping[str, Any] | None = None, meta: Mapping[str, Any] | None = None) -> str:
    """The card's markdown for one bundle folder (its bundle.json and config.yaml are read)."""
    bundle_dir = Path(bundle_dir)
    info = json.loads((bundle_dir / BUNDLE_FILE).read_text())
    cfg = load_config(bundle_dir / CONFIG_FILE)
    split = cfg.data.test_split
    title = f"# rehamot motion↔text model: {cfg.run.name}, `{bundle_dir.name}` bundle"
    lines = [
        title,
        "",
        f"A two-tower motion↔text retrieval model trained with rehamot on the `{info.get('corpus')}` corpus: "
        "a motion transformer and a Hugging Face language model embed motions and captions into one space.",
        f"This folder (`{bundle_dir.name}/`: "
        + ("the checkpoint with the best validation rsum" if bundle_dir.name == "best" else
           "the last training step" if bundle_dir.name == "final" else "an exported bundle")
        + ") holds everything needed to use it: `model.safetensors`, `config.yaml`, `bundle.json` "
        "(Mean/Std of the features, the text model's fingerprint)"
        + (f", `fid_stats-{split}.safetensors`" if (bundle_dir / f"fid_stats-{split}.safetensors").is_file() else "")
        + ". No pickle anywhere.",
        "",
    ]
    lines += _data_section(manifest, cfg)
    lines += _model_section(info, cfg, _parameters(bundle_dir / WEIGHTS_FILE))
    lines += _training_section(cfg, info, meta)
    lines += _evaluation_section(evaluation, bundle_dir.name, split)
    lines += _usage_section(bundle_dir.name, split, (bundle_dir / f"fid_stats-{split}.safetensors").is_file())
    return "\n".join(lines)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_model_card(bundle_dir: str | Path, manifest: Mapping[str, Any] | None = None,
                     run_dir: str | Path | None = None) -> Path:
    """BUNDLE/README.md; the evaluation and meta.json come from the run dir (default: the
    bundle's parent), the manifest from the config's shards when not given."""
    bundle_dir = Path(bundle_dir)
    run_dir = Path(run_dir) if run_dir is not None else bundle_dir.parent
    cfg = load_config(bundle_dir / CONFIG_FILE)
    if manifest is None:
        from rehamot.data.schema import load_manifest

        try:
            manifest = load_manifest(eval_shards(cfg.data))
        except (OSError, ValueError):
            manifest = None
    evaluation = _read_json(run_dir / f"eval-{cfg.data.test_split}.json")
    meta = _read_json(run_dir / "meta.json")
    out = bundle_dir / CARD_FILE
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(model_card(bundle_dir, manifest, evaluation, meta), encoding="utf-8")
    tmp.replace(out)
    write_checksums(bundle_dir)  # the bundle's checksums cover its card
    return out
