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

from rehamot.config import DEFAULT_CONFIG, ConfigError, load_config, options_help

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
        print(f"rehamot: {err}", file=sys.stderr)
        return 2
    from rehamot.data.schema import ShardSetError, check_shard_files, load_manifest

    try:
        manifest = load_manifest(cfg.data.shards)
        check_shard_files(cfg.data.shards, manifest)
    except FileNotFoundError as err:
        print(f"rehamot: {err}\n(or run `make demo`, which builds the demo shards and trains)", file=sys.stderr)
        return 2
    except ShardSetError as err:
        print(f"rehamot: {err}", file=sys.stderr)
        return 2
    from rehamot.models import check_text_model

    try:  # before the run dir exists: a missing model leaves nothing half-made behind
        check_text_model(cfg.model.text_model)
    except OSError as err:
        print(f"rehamot: {err}", file=sys.stderr)
        return 2
    empty = [f"data.{key}={getattr(cfg.data, key)}" for key in ("train_split", "val_split", "test_split")
             if not manifest["splits"].get(getattr(cfg.data, key), {}).get("motions")]
    if empty:
        print(f"rehamot: {', '.join(empty)}: no samples in {cfg.data.shards}/manifest.json (splits there: "
              f"{', '.join(k for k, v in manifest['splits'].items() if v.get('motions'))}); "
              "point each at a split with samples", file=sys.stderr)
        return 2
    from rehamot.training.checkpoint import CheckpointError
    from rehamot.training.run_lock import RunDirLocked
    from rehamot.training.trainer import Trainer  # the heavy stack, after the cheap checks

    try:
        trainer = Trainer(cfg, manifest)
        hook = os.environ.get(TEST_HOOK_ENV)
        if hook:
            module, function = hook.split(":")
            getattr(importlib.import_module(module), function)(trainer)
        return trainer.run()
    except (CheckpointError, RunDirLocked, ShardSetError) as err:
        print(f"rehamot: {err}", file=sys.stderr)
        return 2
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
        print(f"rehamot: {err.filename}: {err.strerror or err} (is the run directory writable, the disk full?)",
              file=sys.stderr)
        return 2
