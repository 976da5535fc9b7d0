"""Train a motion<->text retrieval model.

    rehamot-train [CONFIG.yaml] [key=value ...]
    accelerate launch [--config_file F] rehamot/train.py [CONFIG.yaml] [key=value ...]
    torchrun --nproc_per_node N rehamot/train.py [CONFIG.yaml] [key=value ...]
    python -m rehamot.train [CONFIG.yaml] [key=value ...]

With no CONFIG.yaml, configs/demo.yaml is used. See README.md and docs/cluster.md.
"""
from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

from rehamot.config import DEFAULT_CONFIG, DEMO_SHARDS, ConfigError, data_sources, eval_shards, load_config, options_help

# Tests that run training in a subprocess may set this to "module:function"; it is read once,
# here, and the function is called with the Trainer before the loop (fault injection).
TEST_HOOK_ENV = "REHAMOT_TEST_HOOK"


def split_argv(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    config_path, overrides = None, []
    for arg in argv:
        if "=" not in arg and arg.endswith((".yaml", ".yml")) and config_path is None:
            config_path = arg
        else:
            overrides.append(arg)
    return config_path, overrides


def _collective_failure(err: RuntimeError) -> bool:
    """A collective that timed out or lost its peer (gloo / NCCL), as opposed to a bug."""
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err).lower()
    return any(sign in text for sign in ("timed out", "timeout", "connection closed", "connection reset", "gloo", "nccl"))


def refuse(message: str, code: int = 2) -> int:
    """One line on stderr, from the main process only: under torchrun / accelerate launch every
    rank refuses alike, and the user reads it once (the launcher adds its own summary)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"rehamot: {message}", file=sys.stderr, flush=True)
    return code


def usage() -> str:
    return f"{__doc__.strip()}\n\nConfig keys (key=default, then what it does):\n{options_help()}\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(usage())
        return 0
    config_path, overrides = split_argv(argv)
    try:
        cfg = load_config(config_path or DEFAULT_CONFIG, overrides)
    except ConfigError as err:
        return refuse(str(err))
    from rehamot.data.schema import ShardSetError

    try:
        manifests = load_sources(cfg)
    except FileNotFoundError as err:
        # only the demo's own folder is worth building where it is looked for
        demo = "; `make demo` builds the demo shards there and trains" if cfg.data.shards == DEMO_SHARDS else ""
        return refuse(f"{err}{demo}")
    except (ShardSetError, ConfigError) as err:
        return refuse(str(err))
    from rehamot.models import check_text_model

    try:  # before the run dir exists: a missing model leaves nothing half-made behind
        check_text_model(cfg.model.text_model)
    except OSError as err:
        return refuse(str(err))
    for shards, manifest in manifests.items():  # every source trains; the eval source is evaluated too
        keys = ("train_split", "val_split", "test_split") if shards == eval_shards(cfg.data) else ("train_split",)
        empty = [f"data.{key}={getattr(cfg.data, key)}" for key in keys
                 if not manifest["splits"].get(getattr(cfg.data, key), {}).get("motions")]
        if empty:
            return refuse(f"{', '.join(empty)}: no samples in {shards}/manifest.json (splits there: "
                          f"{', '.join(k for k, v in manifest['splits'].items() if v.get('motions'))}); "
                          "point each at a split with samples")
    return run_training(cfg, training_manifest(cfg, manifests))


# What makes two shard sets' samples the same kind of input to one model.
REPRESENTATION_KEYS = ("feature_dim", "fps", "layout")


def representation(manifest: dict) -> dict:
    layout = (manifest.get("representation") or {}).get("layout")
    return {"feature_dim": manifest.get("feature_dim"), "fps": manifest.get("fps"), "layout": layout}


def load_sources(cfg) -> dict:
    """{shards: manifest} of every source, files checked; sources of different representations
    (feature dimension, fps, layout) are refused, naming both."""
    from rehamot.data.schema import ShardSetError, check_shard_files, load_manifest

    manifests, first = {}, None
    for source in data_sources(cfg.data):
        manifest = load_manifest(source.shards)
        check_shard_files(source.shards, manifest)
        manifests[source.shards] = manifest
        if first is None:
            first = source, representation(manifest)
            continue
        other = representation(manifest)
        differ = [key for key in REPRESENTATION_KEYS if other[key] != first[1][key]]
        if differ:
            said = ", ".join(f"{key} {first[1][key]} vs {other[key]}" for key in differ)
            raise ShardSetError(f"data.sources {first[0].name!r} ({first[0].shards}) and {source.name!r} "
                                f"({source.shards}) hold different representations ({said}); one model "
                                "trains on one representation")
    return manifests


def training_manifest(cfg, manifests: dict) -> dict:
    """The manifest the run's bundles describe: the eval source's, with a mixture's one Mean/Std
    (schema.mixture_mean_std) and its sources recorded."""
    from rehamot.data.schema import mixture_mean_std

    manifest = manifests[eval_shards(cfg.data)]
    if not cfg.data.sources:
        return manifest
    sources = data_sources(cfg.data)
    mean, std = mixture_mean_std([manifests[s.shards] for s in sources], [s.weight for s in sources],
                                 cfg.data.train_split)
    listed = [{"name": s.name, "shards": s.shards, "weight": s.weight, "corpus": manifests[s.shards].get("corpus"),
               "train_motions": manifests[s.shards]["splits"][cfg.data.train_split]["motions"]} for s in sources]
    return {**manifest, "mean": mean.tolist(), "std": std.tolist(), "sources": listed,
            "mean_std_source": "mixture of " + " + ".join(f"{s.name} (weight {s.weight:g})" for s in sources),
            "eval_source": cfg.data.eval_source or sources[0].name}


def run_training(cfg, manifest) -> int:
    """Build the trainer and run it; every refusal is one line and the lock is always released."""
    from rehamot.data.schema import ShardSetError
    from rehamot.training.checkpoint import CheckpointError
    from rehamot.training.run_dir import RunRefused
    from rehamot.training.run_lock import RunDirLocked
    from rehamot.training.trainer import Trainer  # the heavy stack, after the cheap checks

    trainer = None
    try:
        trainer = Trainer(cfg, manifest)
        hook = os.environ.get(TEST_HOOK_ENV)
        if hook:
            module, function = hook.split(":")
            getattr(importlib.import_module(module), function)(trainer)
        return trainer.run()
    except RunRefused as err:
        return 2 if err.said else refuse(str(err))
    except (CheckpointError, RunDirLocked, ShardSetError) as err:
        return refuse(str(err))
    except KeyboardInterrupt:  # outside the training loop (start-up, final evaluation): nothing to save
        where = f" ({trainer.run_dir}: resume=latest continues from its last checkpoint)" if trainer else ""
        return refuse(f"interrupted (Ctrl-C){where}", 130)
    except RuntimeError as err:
        if not _collective_failure(err):
            raise
        rank = os.environ.get("RANK", "0")
        print(f"rehamot: rank {rank}: a collective with the other ranks failed after waiting up to "
              f"train.collective_timeout_s={cfg.train.collective_timeout_s} s: another rank died or hangs "
              f"(its log says which and why) ({str(err).splitlines()[0][:160]})", file=sys.stderr)
        return 3
    except OSError as err:
        if err.filename is None:  # not about a file: a real failure, keep its traceback
            raise
        # possibly one rank's only: every rank that meets it says so
        print(f"rehamot: {err.filename}: {err.strerror or err} (is the run directory writable, the disk full?)",
              file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.release_lock()
