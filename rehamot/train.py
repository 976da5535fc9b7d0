"""Train a motion<->text retrieval model.

    accelerate launch [--config_file F] rehamot/train.py [CONFIG.yaml] [key=value ...]
    torchrun --nproc_per_node N rehamot/train.py [CONFIG.yaml] [key=value ...]
    python rehamot/train.py [CONFIG.yaml] [key=value ...]

With no CONFIG.yaml, configs/demo.yaml is used. See README.md and docs/cluster.md.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import json
import math
import platform
import subprocess
import time
from datetime import datetime, timedelta
from importlib import metadata
from typing import Any, Sequence

import torch

from rehamot import checkpoint as ckpt
from rehamot import distributed as dist_utils
from rehamot import text_cache as feature_cache
from rehamot.config import DEFAULT_CONFIG, Config, ConfigError, load_config, to_yaml
from rehamot.data import DataConfig, EvalSet, TrainStream
from rehamot.data.schema import load_manifest
from rehamot.evaluate import encode_split, evaluate_encoded, evaluate_model, print_results, write_eval_figures
from rehamot.export import export_bundle
from rehamot.grad_cache import DEEPSPEED_REFUSAL, backward_through_cache, embed_without_grad
from rehamot.lr_schedule import gated, lr_multiplier
from rehamot.model_factory import build_model, build_tokenizer
from rehamot.objective import STATS_KEYS, GlobalBatchObjective, LossConfig, stats_vector, summarize_stats
from rehamot.run_log import NullLog, RunLog

PREEMPT_MARKER = "PREEMPT"
DONE_MARKER = "DONE"
INJECT_NAN_ENV = "REHAMOT_INJECT_NAN_STEP"  # fault injection for tests: NaN loss at this step


def split_argv(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    config_path, overrides = None, []
    for arg in argv:
        if "=" not in arg and arg.endswith((".yaml", ".yml")) and config_path is None:
            config_path = arg
        else:
            overrides.append(arg)
    return config_path, overrides


def build_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    if not cuda:  # accelerate imports deepspeed, which otherwise warns that it fell back to CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    timeout = timedelta(seconds=cfg.train.collective_timeout_s)
    # gloo on CPU; `cpu=True` makes several CPU processes really distributed (design.md), but
    # DeepSpeed must not get it (it would start one process and no process group).
    handler = InitProcessGroupKwargs(backend=None if cuda else "gloo", timeout=timeout)
    if deepspeed and not cuda and os.environ.get("REHAMOT_DS_SHM_COMM", "0") != "1":
        # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce at start-up (35-100 s, a C++
        # toolchain needed); gloo's all-reduce serves our small CPU runs. REHAMOT_DS_SHM_COMM=1 keeps it.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # A backend given to a single plain-python process would make accelerate expect a group.
    # step_scheduler_with_optimizer=False: otherwise accelerate steps a prepared scheduler
    # num_processes times per optimizer step (it assumes a schedule counted in single-process
    # batches); ours counts optimizer steps, so W ranks would run it W times too fast.
    accelerator = Accelerator(cpu=not cuda and not deepspeed, kwargs_handlers=[handler] if world > 1 else [],
                              step_scheduler_with_optimizer=False)
    if accelerator.num_processes != world:
        raise SystemExit(
            f"accelerate sees {accelerator.num_processes} process(es) but WORLD_SIZE={world}: every rank "
            "would train alone. On CPU launch with `accelerate launch --config_file "
            "configs/accelerate/cpu.yaml` or `torchrun --nproc_per_node N`."
        )
    if deepspeed:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
        ds["train_batch_size"] = cfg.train.batch_size * accelerator.num_processes * ds.get("gradient_accumulation_steps", 1)
        # Always ours: accelerate fills in gradient_clipping=1.0 when the config file names none,
        # which would clip DeepSpeed runs that asked for no clipping (0 disables it in DeepSpeed).
        ds["gradient_clipping"] = cfg.train.grad_clip
    return accelerator


def deepspeed_scalar_workaround(model: torch.nn.Module) -> None:
    """DeepSpeed 0.19 broadcasts every parameter as `p.data.view(torch.uint8)` (ZeRO-1/2 at
    engine start, ZeRO-3 when partitioning), which fails on a 0-d tensor. Our only 0-d
    parameter is the InfoNCE logit scale; when it is frozen (every loss but InfoNCE) it is
    turned into a buffer under the same name, so state dicts, exports and bundles keep
    their keys and shapes. A trainable one cannot be: refuse it clearly."""
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() != 0:
                continue
            if param.requires_grad:
                raise SystemExit(
                    f"DeepSpeed cannot broadcast the 0-d trainable parameter {module_name}.{name} "
                    "(InfoNCE's learnable temperature); train InfoNCE with DDP, or another loss with DeepSpeed."
                )
            delattr(module, name)
            module.register_buffer(name, param.detach().clone())


def choose_run_dir(cfg: Config, accelerator) -> Path:
    from accelerate.utils import broadcast_object_list

    chosen = [cfg.run.dir]
    if chosen[0] is None and accelerator.is_main_process:
        chosen[0] = str(Path(cfg.run.root) / f"{cfg.run.name}-{datetime.now():%Y%m%d-%H%M%S}")
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen, from_process=0)
    return Path(chosen[0])


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_files(run_dir: Path, cfg: Config, accelerator) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    versions = {}
    for pkg in ("torch", "accelerate", "deepspeed", "transformers", "webdataset", "numpy", "omegaconf"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    meta = {
        "command": [sys.executable, *sys.argv],
        "launcher_env": {k: os.environ[k] for k in ("ACCELERATE_CONFIG_FILE", "SLURM_JOB_ID", "MASTER_ADDR", "MASTER_PORT") if k in os.environ},
        "git_commit": git_commit(),
        "versions": versions,
        "python": platform.python_version(),
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": accelerator.mixed_precision,
        "started": datetime.now().isoformat(timespec="seconds"),
    }
    (run_dir / "meta.json").write_text(json.dumps(meta, indent=1))


def data_config(cfg: Config, split: str) -> DataConfig:
    d = cfg.data
    return DataConfig(
        shards=d.shards, split=split, batch_size=cfg.train.batch_size, num_workers=d.num_workers,
        min_len=d.min_len, max_len=d.max_len, shuffle_buffer=d.shuffle_buffer, seed=cfg.seed,
        strict=d.strict, max_text_len=d.max_text_len, length_buckets=d.length_buckets,
    )


def build_optimizer(model, cfg: Config, total_steps: int):
    t = cfg.train
    groups = model.param_groups(lr=t.lr, lm_lr=t.lm_lr, weight_decay=t.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, fused=t.fused_adamw or None)
    base = lr_multiplier(t.schedule, total_steps, t.lr_warmup_steps, t.decay_steps, t.decay_factor)
    lambdas = [gated(base, cfg.model.lm_unfreeze_step) if g["name"] == "lm" else base for g in groups]
    # An LM fine-tuned from step N is trainable from the start (DDP and ZeRO fix the trainable
    # set when they wrap the model) with lr 0 until N; AdamW's decoupled decay is lr * wd, so
    # the weights stay untouched until then.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    return optimizer, scheduler


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def main(argv: Sequence[str] | None = None) -> int:
    config_path, overrides = split_argv(sys.argv[1:] if argv is None else argv)
    if config_path is None:
        config_path = str(DEFAULT_CONFIG)
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as err:
        print(f"rehamot: {err}", file=sys.stderr)
        return 2
    try:
        manifest = load_manifest(cfg.data.shards)
    except FileNotFoundError as err:
        print(f"rehamot: {err}\n(or run `make demo`, which builds the demo shards and trains)", file=sys.stderr)
        return 2
    return Trainer(cfg, manifest).run()


class Trainer:
    def __init__(self, cfg: Config, manifest: dict[str, Any]):
        from accelerate.utils import set_seed

        self.cfg, self.manifest = cfg, manifest
        self.acc = build_accelerator(cfg)
        if cfg.train.micro_batches > 1 and self.acc.distributed_type.value == "DEEPSPEED":
            raise SystemExit(DEEPSPEED_REFUSAL)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        set_seed(cfg.seed)
        self.run_dir = choose_run_dir(cfg, self.acc)
        cfg.run.dir = str(self.run_dir)
        if self.acc.is_main_process:
            write_run_files(self.run_dir, cfg, self.acc)
        self.acc.wait_for_everyone()

        self.tokenizer = build_tokenizer(cfg)
        self.use_text_cache = feature_cache.cache_enabled(cfg.model.text_cache, cfg.model.finetune_lm)
        # with the text cache the loader does not tokenise: each caption's LM features are looked up
        self.stream = TrainStream(data_config(cfg, cfg.data.train_split),
                                  None if self.use_text_cache else self.tokenizer, self.rank, self.world)
        self.steps_per_epoch = self.stream.steps_per_epoch
        total = cfg.train.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
        model = build_model(cfg, feature_dim=int(manifest["feature_dim"]))
        if self.acc.distributed_type.value == "DEEPSPEED":
            deepspeed_scalar_workaround(model)
        optimizer, scheduler = build_optimizer(model, cfg, self.total_steps)
        self.model, self.optimizer, self.scheduler = self.acc.prepare(model, optimizer, scheduler)
        if self.acc.distributed_type.value == "DEEPSPEED":
            from transformers.integrations import unset_hf_deepspeed_config

            # accelerate registers the ZeRO config with transformers, whose from_pretrained then
            # partitions every model built later (ZeRO-3): evaluation copies and bundles must be plain.
            unset_hf_deepspeed_config()
        self.text_cache = self.load_text_cache() if self.use_text_cache else None
        self.objective = GlobalBatchObjective(
            LossConfig(
                name=cfg.loss.name, margin=cfg.loss.margin, threshold_motion=cfg.loss.threshold_motion,
                threshold_text=cfg.loss.threshold_text, threshold_mode=cfg.loss.threshold_mode,
                chunk_size=cfg.loss.chunk_size, warmup_steps=cfg.loss.warmup_steps,
                warmup_epochs=cfg.loss.warmup_epochs, warmup_loss=cfg.loss.warmup_loss,
            ),
        )
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.best_rsum = -math.inf
        self.inject_nan = int(os.environ.get(INJECT_NAN_ENV, "-1"))

    # -- checkpoints --------------------------------------------------------------------------
    def position(self) -> dict[str, Any]:
        return {
            "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "world_size": self.world, "seed": self.cfg.seed, "batch_size": self.cfg.train.batch_size,
            "num_workers": self.cfg.data.num_workers, "shards": self.cfg.data.shards,
            "best_rsum": self.best_rsum if math.isfinite(self.best_rsum) else None,
        }

    def save(self) -> Path:
        return ckpt.save_checkpoint(
            self.run_dir, self.step, self.position(), self.acc.save_state, self.acc.wait_for_everyone,
            self.acc.is_main_process, keep=self.cfg.train.keep_checkpoints,
        )

    def maybe_resume(self) -> None:
        path = ckpt.resolve_resume(self.cfg.resume, self.run_dir)
        if path is None:
            return
        pos = ckpt.read_position(path)
        now = {"world_size": self.world, "batch_size": self.cfg.train.batch_size,
               "num_workers": self.cfg.data.num_workers, "seed": self.cfg.seed}
        changed = {k: (pos.get(k), v) for k, v in now.items() if pos.get(k) != v}
        if changed:
            what = ", ".join(f"{k}={old} then, {new} now" for k, (old, new) in changed.items())
            raise SystemExit(
                f"resume from {path}: {what}. The data order and the global batch depend on the "
                "world size, batch size, loader workers and seed, so an exact resume needs the same "
                "values; relaunch with them (or start a new run from the exported bundle)."
            )
        self.acc.load_state(str(path))
        self.step, self.epoch, self.step_in_epoch = pos["step"], pos["epoch"], pos["step_in_epoch"]
        self.best_rsum = pos["best_rsum"] if pos["best_rsum"] is not None else -math.inf
        if self.acc.is_main_process:
            print(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.step_in_epoch})")

    # -- evaluation and export ----------------------------------------------------------------
    def export(self, name: str, extra: dict[str, Any]) -> None:
        state = self.acc.get_state_dict(self.model)  # gathers ZeRO-3 shards; call on every rank
        if self.acc.is_main_process:
            unwrapped = self.acc.unwrap_model(self.model)
            export_bundle(self.run_dir / name, state, unwrapped.text.fingerprint(), self.cfg, self.manifest, extra)
        self.acc.wait_for_everyone()

    def eval_model(self) -> torch.nn.Module:
        """The model to evaluate during training. Under ZeRO-3 every forward all-gathers
        partitioned weights, a collective: ranks encoding different numbers of eval batches
        would hang, and the hooks break nn.TransformerEncoder's nested-tensor fast path. So
        every rank evaluates a plain copy, refreshed from the gathered weights."""
        unwrapped = self.acc.unwrap_model(self.model)
        plugin = self.acc.state.deepspeed_plugin
        if plugin is None or plugin.zero_stage != 3:
            return unwrapped
        import deepspeed

        if getattr(self, "_zero3_eval_copy", None) is None:
            with torch.random.fork_rng(devices=[]):  # building it must not move the training RNG
                copy = build_model(self.cfg, feature_dim=int(self.manifest["feature_dim"]))
            self._zero3_eval_copy = copy.to(self.acc.device)
        with deepspeed.zero.GatheredParameters(list(unwrapped.parameters())):
            self._zero3_eval_copy.load_state_dict(unwrapped.state_dict())
        return self._zero3_eval_copy

    def validate(self) -> None:
        split = self.cfg.data.val_split
        if split not in self.manifest["splits"]:
            return
        eval_set = EvalSet(data_config(self.cfg, split), self.tokenizer, self.rank, self.world)
        results = evaluate_model(self.eval_model(), eval_set, self.acc.device,
                                 batch_size=self.cfg.train.eval_batch_size, protocols=("captions",))
        metrics = results["captions"]
        record = {"step": self.step, "epoch": self.epoch, **{f"val/{k}": v for k, v in metrics.items()}}
        self.log.write(record)
        if metrics["rsum"] > self.best_rsum:
            self.best_rsum = metrics["rsum"]
            self.export("best", {"step": self.step, "val": metrics})

    # -- frozen-LM text features -----------------------------------------------------------
    def load_text_cache(self) -> feature_cache.TextFeatureCache:
        """Every training caption's frozen-LM features, loaded, or built in parallel by all ranks."""
        cfg = self.cfg
        encoder = self.acc.unwrap_model(self.model).text
        plugin = self.acc.state.deepspeed_plugin
        if plugin is not None and plugin.zero_stage == 3:  # partitioned weights: a forward is a collective
            from rehamot.model_factory import text_config
            from rehamot.models import TextEncoder

            with torch.random.fork_rng(devices=[]):  # the copy must not move the training RNG
                encoder = TextEncoder(text_config(cfg)).to(self.acc.device)
        result = feature_cache.load_or_build(
            encoder, self.tokenizer, shards=cfg.data.shards, split=cfg.data.train_split,
            cache_dir=cfg.model.text_cache_dir or feature_cache.default_cache_dir(cfg.data.shards, cfg.run.root),
            max_text_len=cfg.data.max_text_len, rank=self.rank, world=self.world,
            barrier=self.acc.wait_for_everyone, parts_dir=self.run_dir / "text-cache-parts",
            device=self.acc.device, strict=cfg.data.strict,
        )
        if self.acc.is_main_process:
            print(f"text cache: {'built' if result.built else 'loaded'} {result.cache.path} "
                  f"({len(result.cache)} captions, {result.seconds:.1f} s)", flush=True)
        return result.cache

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch's tensors on the device; with the text cache, the captions' frozen-LM
        features (B, H) stand in for their token ids."""
        inputs = to_device(batch, self.acc.device)
        if self.text_cache is not None:
            inputs["text_features"] = self.text_cache.lookup(batch["texts"]).to(self.acc.device, non_blocking=True)
        return inputs

    # -- the loop -----------------------------------------------------------------------------
    def forward_towers(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        with self.acc.autocast():
            return self.model(inputs)

    def train_step(self, batch: dict[str, Any]) -> dict[str, float] | None:
        model = self.model
        inputs = self.model_inputs(batch)
        cached = None
        if self.cfg.train.micro_batches > 1:  # GradCache: embeddings now, the towers' graphs after the checks
            cached = embed_without_grad(self.forward_towers, inputs, self.cfg.train.micro_batches)
            motion_emb, text_emb = cached.motion, cached.text
        else:
            motion_emb, text_emb = self.forward_towers(inputs)
        unwrapped = self.acc.unwrap_model(model)
        out = self.objective(motion_emb.float(), text_emb.float(), inputs["motion_index"],
                             step=self.step, epoch=self.epoch, logit_scale=-torch.log(unwrapped.temperature()))
        loss = out.loss
        if unwrapped.logit_scale.requires_grad and out.loss_name != "infonce":
            loss = loss + 0.0 * unwrapped.logit_scale  # SH warm-up before InfoNCE: DDP needs every grad
        if self.step == self.inject_nan:
            loss = loss + float("nan")
        flags = torch.tensor([
            0.0 if torch.isfinite(loss.detach()) else 1.0,
            1.0 if (self.run_dir / PREEMPT_MARKER).exists() else 0.0,
            float(batch.get("bad_samples", 0)),
        ], dtype=torch.float64)
        # ONE all-reduce per step carries the loss statistics and the flags all ranks must agree on.
        summed = dist_utils.all_reduce_sum(torch.cat([stats_vector(out.stats), flags.to(self.acc.device)]))
        stats = summarize_stats(summed[:len(STATS_KEYS)])
        stats.update(zip(("nonfinite", "preempt", "bad_samples"), summed[len(STATS_KEYS):].tolist()))
        if stats["nonfinite"] > 0:
            if self.cfg.train.nonfinite == "stop":
                raise FloatingPointError(f"non-finite loss at step {self.step} on {stats['nonfinite']:.0f} rank(s); stopping (train.nonfinite=stop)")
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            return {**stats, "skipped": 1.0, "loss_name": out.loss_name}
        if cached is not None:
            backward_through_cache(cached, loss, self.forward_towers, backward=self.acc.backward,
                                   no_sync=lambda: self.acc.no_sync(model),
                                   loss_params=[p for p in (unwrapped.logit_scale,) if p.requires_grad])
        else:
            self.acc.backward(loss)
        if self.cfg.train.grad_clip > 0 and self.acc.sync_gradients and self.acc.distributed_type.value != "DEEPSPEED":
            self.acc.clip_grad_norm_(model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_embeddings = (motion_emb.detach().float(), text_emb.detach().float())
        return {**stats, "skipped": 0.0, "loss_name": out.loss_name}

    def run(self) -> int:
        cfg, acc = self.cfg, self.acc
        self.maybe_resume()
        self.skipped_steps = 0
        self.log = RunLog(self.run_dir, self.total_steps, self.step) if acc.is_main_process else NullLog()
        if cfg.train.micro_batches > 1:
            self.log.print(f"GradCache: {cfg.train.micro_batches} micro-batches of "
                           f"{cfg.train.batch_size // cfg.train.micro_batches} per step (batch {cfg.train.batch_size} per process)")
        val_every = cfg.train.val_every or self.steps_per_epoch
        save_every = cfg.train.save_every or self.steps_per_epoch
        window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
        preempted = False
        try:
            while self.step < self.total_steps and not preempted:
                loader = self.stream.loader(self.epoch, start_step=self.step_in_epoch)
                it = iter(loader)
                epoch_done = False
                while not epoch_done and self.step < self.total_steps:
                    t0 = time.perf_counter()
                    batch = next(it)
                    data_wait += time.perf_counter() - t0
                    stats = self.train_step(batch)
                    self.step += 1
                    self.step_in_epoch += 1
                    window_steps += 1
                    if self.step_in_epoch == self.steps_per_epoch:  # the position is the next batch's
                        self.epoch, self.step_in_epoch, epoch_done = self.epoch + 1, 0, True
                    record = None
                    if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                        elapsed = time.perf_counter() - window_start
                        record = self.record(stats, window_steps, elapsed, data_wait)
                        window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
                    self.log.step(self.step, record)
                    if stats["preempt"] > 0:
                        preempted = True
                        break
                    pause = time.perf_counter()
                    if self.step % val_every == 0:
                        self.validate()
                    if self.step % save_every == 0 and self.step < self.total_steps:
                        self.save()
                    window_start += time.perf_counter() - pause  # samples/s counts training only
                del it, loader
            final_ckpt = self.save()
            if preempted:
                self.log.print(f"preemption marker seen: saved {final_ckpt} at step {self.step}; exiting for requeue")
                return 0
            if self.step % val_every != 0:
                self.validate()
            self.export("final", {"step": self.step})
            self.finish()
        finally:
            self.log.close()
        return 0

    def record(self, stats: dict[str, Any], steps: int, elapsed: float, data_wait: float) -> dict[str, Any]:
        groups = {f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups}
        return {
            "step": self.step, "epoch": self.epoch,
            "loss": stats["loss"], "loss_name": stats["loss_name"],
            **groups,
            "samples_per_s": steps * self.cfg.train.batch_size * self.world / max(elapsed, 1e-9),
            "data_wait_s": data_wait / max(steps, 1),
            "global_batch": int(stats["global_batch"]),
            "dropped_negatives": stats["dropped"],
            "drop_rate": stats["drop_rate"],
            "skipped_steps": self.skipped_steps,
            "bad_samples": stats["bad_samples"],
        }

    def finish(self) -> None:
        """Test-split evaluation of the best bundle, plots, the DONE marker."""
        from rehamot.export import find_bundle, load_bundle

        cfg, acc = self.cfg, self.acc
        acc.wait_for_everyone()
        bundle = find_bundle(self.run_dir)
        model, _, info = load_bundle(bundle, device=acc.device)
        eval_set = EvalSet(data_config(cfg, cfg.data.test_split), self.tokenizer, self.rank, self.world)
        enc = encode_split(model, eval_set, acc.device, cfg.train.eval_batch_size)
        results = evaluate_encoded(enc, ("captions",))
        if acc.is_main_process:
            write_eval_figures(self.run_dir, enc, results, cfg.data.test_split)
            payload = {"split": cfg.data.test_split, "bundle": bundle.name, "step": info.get("step"), "protocols": results}
            (self.run_dir / f"eval-{cfg.data.test_split}.json").write_text(json.dumps(payload, indent=1))
            from rehamot.plots import plot_similarity, plot_training_curves

            plot_training_curves(self.run_dir / "metrics.jsonl", self.run_dir / "training_curves.png")
            if getattr(self, "last_embeddings", None) is not None:
                m, t = self.last_embeddings
                plot_similarity((m @ t.T).cpu().numpy(), self.run_dir / "batch_similarity.png")
            self.log.close()
            print_results(results, title=f"{cfg.data.test_split} split ({bundle.name} checkpoint, step {info.get('step')})")
            (self.run_dir / DONE_MARKER).write_text(f"{self.step}\n")
        acc.wait_for_everyone()


if __name__ == "__main__":
    sys.exit(main())
