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

from rehamot.config import DEFAULT_CONFIG, ConfigError, DataSection, load_config, options_help

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
    from rehamot.data.schema import ShardSetError, check_shard_files, load_manifest

    try:
        manifest = load_manifest(cfg.data.shards)
        check_shard_files(cfg.data.shards, manifest)
    except FileNotFoundError as err:
        # only the demo's own folder is worth building where it is looked for
        demo = "; `make demo` builds the demo shards there and trains" if cfg.data.shards == DataSection.shards else ""
        return refuse(f"{err}{demo}")
    except ShardSetError as err:
        return refuse(str(err))
    from rehamot.models import check_text_model

    try:  # before the run dir exists: a missing model leaves nothing half-made behind
        check_text_model(cfg.model.text_model)
    except OSError as err:
        return refuse(str(err))
    empty = [f"data.{key}={getattr(cfg.data, key)}" for key in ("train_split", "val_split", "test_split")
             if not manifest["splits"].get(getattr(cfg.data, key), {}).get("motions")]
    if empty:
        return refuse(f"{', '.join(empty)}: no samples in {cfg.data.shards}/manifest.json (splits there: "
                      f"{', '.join(k for k, v in manifest['splits'].items() if v.get('motions'))}); "
                      "point each at a split with samples")
    return run_training(cfg, manifest)


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
