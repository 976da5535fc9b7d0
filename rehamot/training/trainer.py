"""The training loop: one optimizer step over the global batch, validation, checkpoints, export.

Read top to bottom: `Trainer.__init__` builds everything (data, model, optimizer, objective)
and resumes; `train_step` is one optimizer step; `run` is the loop; `finish` evaluates the
best bundle on the test split. Accelerate/DeepSpeed specifics live in `rehamot.training.accelerator`.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from rehamot import distributed as dist_utils
from rehamot.config import Config, data_sources
from rehamot.data import EvalSet, TrainStream, data_config
from rehamot.evaluation.retrieval_eval import encode_split, evaluate_encoded, evaluate_model, print_results, write_eval_figures
from rehamot.loss.grad_cache import DEEPSPEED_REFUSAL, backward_through_cache, embed_without_grad
from rehamot.loss.objective import STATS_KEYS, GlobalBatchObjective, stats_vector, summarize_stats
from rehamot.models import TextEncoder
from rehamot.models.bundle import WEIGHTS_FILE, export_bundle, find_bundle, load_bundle
from rehamot.models.factory import build_model, build_tokenizer, text_config
from rehamot.training import accelerator as accel
from rehamot.training import checkpoint as ckpt
from rehamot.training import text_cache as feature_cache
from rehamot.training.cpu_threads import choose_threads
from rehamot.training.health import TrainingHealth, check_bad_samples
from rehamot.training.leak_check import LeakCheck
from rehamot.training.lr_schedule import gated, lr_multiplier
from rehamot.training.run_dir import (
    RunRefused,
    check_reuse,
    choose_run_dir,
    clear_run,
    resume_command,
    run_state,
    write_run_files,
)
from rehamot.training.run_lock import RunDirLocked, RunLock
from rehamot.training.run_log import NullLog, RunLog

PREEMPT_MARKER = "PREEMPT"  # a file in the run dir: save at the next step and exit (SLURM requeue)
DONE_MARKER = "DONE"


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


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of torch's generators for one rank's training step `step` (0-based)."""
    return random.Random(f"rehamot/step/{seed}/{step}/{rank}").getrandbits(63)


def _comparable(value: Any) -> Any:
    """A local shard folder by its real path (data/demo and ./data/demo are one); else as is."""
    if isinstance(value, str) and "://" not in value:
        return os.path.realpath(value)
    return value


def run_end(train, steps_per_epoch: int) -> tuple[int, str, str]:
    """The step that ends the run, the setting that puts it there (for the user) and the key to
    raise for more."""
    by_epochs = train.epochs * steps_per_epoch
    if train.max_steps and train.max_steps <= by_epochs:
        return train.max_steps, f"train.max_steps={train.max_steps}", "train.max_steps"
    later = f"; train.max_steps={train.max_steps} comes later" if train.max_steps else ""
    return by_epochs, f"train.epochs={train.epochs} of {steps_per_epoch} steps{later}", "train.epochs"


class CtrlC:
    """SIGINT during the loop: the first asks for a checkpoint and a stop at the next step
    boundary, a second exits at once. Launchers (torchrun, accelerate launch) forward the
    terminal's Ctrl-C to workers that got it from the terminal already: a copy within
    SAME_PRESS_S of the first is that same press, not a second one."""

    SAME_PRESS_S = 2.0

    def __init__(self, on_second) -> None:
        self.first: float | None = None
        self.on_second, self.pid, self.previous = on_second, os.getpid(), None

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None

    def handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.pid:  # a loader worker forked while installed: the trainer decides
            return
        now = time.monotonic()
        if self.first is None:
            self.first = now
        elif now - self.first > self.SAME_PRESS_S:
            self.on_second()

    @property
    def requested(self) -> bool:
        return self.first is not None


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


class Trainer:
    def __init__(self, cfg: Config, manifest: dict[str, Any]):
        self.cfg, self.manifest = cfg, manifest
        self.acc = accel.build_accelerator(cfg)
        if cfg.train.micro_batches > 1 and accel.is_deepspeed(self.acc):
            raise SystemExit(DEEPSPEED_REFUSAL)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        threads, threads_from = choose_threads(cfg.train.threads, cfg.data.num_workers)
        torch.set_num_threads(threads)
        accel.set_seed(cfg.seed)
        run_dir, why = choose_run_dir(cfg) if self.acc.is_main_process else (None, None)
        if why:
            print(why, flush=True)
        self.run_dir_was_looked_up = why is not None  # resume=latest without run.dir: said where
        self.run_dir = Path(accel.broadcast_from_main(str(run_dir), self.acc))
        cfg.run.dir = str(self.run_dir)
        self.lock = self.lock_run_dir()
        self.ctrl_c = CtrlC(self.exit_now)
        try:  # from here on, every way out of start-up releases the lock
            self.start_up(f"{threads} ({threads_from})")
        except BaseException:
            self.release_lock()
            raise

    def start_up(self, threads: str) -> None:
        """Every check that can refuse the run, then the run files, then the model and the resume."""
        cfg, manifest = self.cfg, self.manifest
        # data: with the text cache the loader does not tokenise, each caption's LM features are looked up
        self.tokenizer = build_tokenizer(cfg)
        self.use_text_cache = feature_cache.cache_enabled(cfg.model.text_cache, cfg.model.finetune_lm)
        self.leak_check = LeakCheck(cfg, self.run_dir)  # data.leaks: train samples that duplicate val/test ones
        dropped = self.on_main(self.leak_check.run)
        try:  # too few shards or samples for this world size: the same answer on every rank
            self.stream = TrainStream(data_config(cfg, cfg.data.train_split),
                                      None if self.use_text_cache else self.tokenizer, self.rank, self.world,
                                      dropped=dropped)
        except ValueError as err:
            self.refuse(str(err))
        self.steps_per_epoch = self.stream.steps_per_epoch
        self.total_steps, self.ends_by, self.limit_key = run_end(cfg.train, self.steps_per_epoch)
        self.resume_point = self.on_main(self.prepare_run_dir)  # a bad resume fails in seconds
        if self.acc.is_main_process:
            print(f"run directory: {self.run_dir}", flush=True)
            print(f"CPU threads per process: {threads}", flush=True)
            print(f"the run ends at step {self.total_steps} ({self.ends_by})", flush=True)
            write_run_files(self.run_dir, cfg, {
                "world_size": self.world, "distributed_type": str(self.acc.distributed_type),
                "mixed_precision": self.acc.mixed_precision,
                **({key: manifest[key] for key in ("sources", "mean_std_source", "mean", "std")}
                   if "sources" in manifest else {}),  # a mixture's one normalisation
            })
            self.leak_check.write()
        self.acc.wait_for_everyone()

        # model, optimizer, objective
        model = build_model(cfg, feature_dim=int(manifest["feature_dim"]))
        optimizer, scheduler = build_optimizer(model, cfg, self.total_steps)
        self.model, self.optimizer, self.scheduler = accel.prepare(self.acc, model, optimizer, scheduler)
        self.eval_model = accel.PlainModel(self.acc, lambda: build_model(cfg, feature_dim=int(manifest["feature_dim"])))
        self.text_cache = self.load_text_cache() if self.use_text_cache else None
        self.objective = GlobalBatchObjective(cfg.loss)

        # position (the next batch's), counters, and the resume that may move them
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.best_rsum = -math.inf
        self.skipped_steps = 0
        self.bad_samples = 0  # samples the loaders skipped, all ranks, whole run
        self.source_names = [source.name for source in self.stream.sources]
        self.source_samples = [0] * len(self.source_names)  # drawn from each source, all ranks, whole run
        self.health = TrainingHealth()
        self.last_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None  # for batch_similarity.png
        if self.resume_point is not None:
            self.restore(*self.resume_point)
        self.log = (RunLog(self.run_dir, self.total_steps, self.step, loss_name=cfg.loss.name,
                           resumed=bool(cfg.resume))
                    if self.acc.is_main_process else NullLog())

    # -- checkpoints --------------------------------------------------------------------------
    def position(self) -> dict[str, Any]:
        return {
            "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "world_size": self.world, "seed": self.cfg.seed, "batch_size": self.cfg.train.batch_size,
            "num_workers": self.cfg.data.num_workers, "shards": self.cfg.data.shards,
            "sources": self.sources_setting(),
            "best_rsum": self.best_rsum if math.isfinite(self.best_rsum) else None,
            "bad_samples": self.bad_samples,
            "source_samples": dict(zip(self.source_names, self.source_samples)),
        }

    def sources_setting(self) -> list[list[Any]] | None:
        """data.sources as the data order depends on them (name, real shard path, weight)."""
        if not self.cfg.data.sources:
            return None
        return [[s.name, _comparable(s.shards), s.weight] for s in data_sources(self.cfg.data)]

    def save(self) -> Path:
        bad = [name for name, p in self.acc.unwrap_model(self.model).named_parameters() if not torch.isfinite(p).all()]
        if bad:  # never write (nor let retention keep in place of a good one) a checkpoint of NaNs
            raise FloatingPointError(f"non-finite parameters at step {self.step} ({', '.join(bad[:3])}"
                                     f"{', ...' if len(bad) > 3 else ''}); not saving a checkpoint of them")
        return ckpt.save_checkpoint(
            self.run_dir, self.step, self.position(), self.acc.save_state, self.acc.wait_for_everyone,
            self.acc.is_main_process, keep=self.cfg.train.keep_checkpoints,
        )

    def on_main(self, check):
        """`check()` run on the main process, its result on every rank; its refusal stops every
        rank (the main process prints it, see cli.py)."""
        result, refusal = None, None
        if self.acc.is_main_process:
            try:
                result = check()
            except (RunRefused, ckpt.CheckpointError) as err:
                refusal = str(err)
            except BaseException:
                accel.broadcast_from_main((None, None, True), self.acc)
                raise  # the main process says what failed; the others end quietly
        result, refusal, failed = accel.broadcast_from_main((result, refusal, False), self.acc)
        if failed:
            raise SystemExit(1)
        if refusal:
            self.refuse(refusal)
        return result

    def refuse(self, message: str) -> None:
        """Stop every rank with one line, which the main process prints before the others exit:
        a launcher stops the other ranks as soon as one has exited."""
        if self.acc.is_main_process:
            print(f"rehamot: {message}", file=sys.stderr, flush=True)
        self.acc.wait_for_everyone()
        raise RunRefused(message, said=True)

    def prepare_run_dir(self) -> tuple[Path, dict[str, Any]] | None:
        """The resume point, once the run dir is known to hold this run only (main process)."""
        cfg = self.cfg
        state = run_state(self.run_dir)
        point = self.find_resume_point()
        check_reuse(self.run_dir, state, cfg.resume, point and point[0], cfg.run.overwrite)
        if state and cfg.run.overwrite:
            print(f"run.overwrite=true: deleted {', '.join(clear_run(self.run_dir))} of the earlier run in "
                  f"{self.run_dir}", flush=True)
        if point is None and cfg.resume == "latest" and not self.run_dir_was_looked_up:
            print(f"resume=latest: no checkpoint in {self.run_dir} yet; starting fresh", flush=True)
        if point is not None:
            self.check_left_to_do(*point)
        return point

    def check_left_to_do(self, path: Path, pos: dict[str, Any]) -> None:
        """Refuse a resume the limits leave nothing to train for. A checkpoint of this run at its
        last step, without DONE, still has the export and the test evaluation to do."""
        step = int(pos["step"])
        unfinished_end = (step == self.total_steps and path.resolve().parent.parent == self.run_dir.resolve()
                          and not (self.run_dir / DONE_MARKER).exists())
        if step >= self.total_steps and not unfinished_end:
            raise RunRefused(f"resume from {path}: it is at step {step}, and the run ends at step {self.total_steps} "
                             f"({self.ends_by}): nothing left to train; raise {self.limit_key}")

    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def exit_now(self) -> None:
        """A second Ctrl-C: stop at once, without a checkpoint (the lock goes, the last one stays)."""
        if self.acc.is_main_process:
            last = ckpt.latest_checkpoint(self.run_dir)
            then = (f"the last checkpoint, {last}, is kept; continue with: {resume_command(self.run_dir)}" if last
                    else f"no checkpoint was saved; start over with: {resume_command(self.run_dir, start_over=True)}")
            print(f"rehamot: second Ctrl-C: stopped at step {self.step} without saving; {then}",
                  file=sys.stderr, flush=True)
        self.release_lock()
        os._exit(130)

    def lock_run_dir(self) -> RunLock | None:
        """The main process takes the run dir's lock; every rank stops if another run holds it."""
        lock, refusal = None, None
        if self.acc.is_main_process:
            try:
                lock = RunLock.acquire(self.run_dir)
                if lock.note:
                    print(lock.note, flush=True)
            except RunDirLocked as err:
                refusal = str(err)
        refusal = accel.broadcast_from_main(refusal, self.acc)
        if refusal:
            self.refuse(refusal)
        return lock

    def find_resume_point(self) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint to resume from and its position, or None; refuses a position
        written under other settings than the data order needs."""
        path = ckpt.resolve_resume(self.cfg.resume, self.run_dir)
        if path is None:
            return None
        pos = ckpt.read_position(path, required=("step", "epoch", "step_in_epoch", "best_rsum"))
        now = {"world_size": self.world, "batch_size": self.cfg.train.batch_size,
               "num_workers": self.cfg.data.num_workers, "seed": self.cfg.seed, "shards": self.cfg.data.shards,
               "sources": self.sources_setting()}
        changed = {k: (pos.get(k), v) for k, v in now.items() if _comparable(pos.get(k)) != _comparable(v)}
        if changed:
            what = ", ".join(f"{k}={old} then, {new} now" for k, (old, new) in changed.items())
            raise ckpt.CheckpointError(
                f"resume from {path}: {what}. The data order and the global batch depend on the "
                "world size, batch size, loader workers, seed and shards (or sources), so an exact resume needs the same "
                "values; relaunch with them (or start a new run from the exported bundle)."
            )
        return path, pos

    def restore(self, path: Path, pos: dict[str, Any]) -> None:
        # load_state also restores the RNG states it saved (and only logs when it cannot): they
        # are not needed, since every step seeds torch from (seed, step, rank) (see `run`).
        self.acc.load_state(str(path))
        self.step, self.epoch, self.step_in_epoch = pos["step"], pos["epoch"], pos["step_in_epoch"]
        self.best_rsum = pos["best_rsum"] if pos["best_rsum"] is not None else -math.inf
        self.bad_samples = int(pos.get("bad_samples", 0))
        drawn = pos.get("source_samples") or {}
        self.source_samples = [int(drawn.get(name, 0)) for name in self.source_names]
        if self.acc.is_main_process:
            print(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.step_in_epoch})")

    # -- evaluation and export ----------------------------------------------------------------
    def export(self, name: str, extra: dict[str, Any]) -> None:
        state = self.acc.get_state_dict(self.model)  # gathers ZeRO-3 shards; call on every rank
        if self.acc.is_main_process:
            unwrapped = self.acc.unwrap_model(self.model)
            export_bundle(self.run_dir / name, state, unwrapped.text.fingerprint(), self.cfg, self.manifest, extra)
        self.acc.wait_for_everyone()

    def eval_set(self, split: str) -> EvalSet:
        """A split of the eval source (data.eval_source), normalised as training normalises (a
        mixture's one Mean/Std, which the bundles carry)."""
        return EvalSet(data_config(self.cfg, split), self.tokenizer, self.rank, self.world,
                       mean_std=(self.stream.mean, self.stream.std))

    def validate(self) -> None:
        split = self.cfg.data.val_split
        if split not in self.manifest["splits"]:
            return
        eval_set = self.eval_set(split)
        results = evaluate_model(self.eval_model(self.model), eval_set, self.acc.device,
                                 batch_size=self.cfg.train.eval_batch_size, protocols=("captions",))
        metrics = results["captions"]
        self.log.write({"step": self.step, "epoch": self.epoch, **{f"val/{k}": v for k, v in metrics.items()}})
        self.say(f"val step {self.step}: t2m R@1 {metrics['t2m/R@1']:.1f} R@10 {metrics['t2m/R@10']:.1f} | "
                 f"m2t R@1 {metrics['m2t/R@1']:.1f} R@10 {metrics['m2t/R@10']:.1f} | rsum {metrics['rsum']:.1f} "
                 f"(best {max(self.best_rsum, metrics['rsum']):.1f})")
        if metrics["rsum"] > self.best_rsum:
            self.best_rsum = metrics["rsum"]
            self.export("best", {"step": self.step, "val": metrics})

    # -- frozen-LM text features -----------------------------------------------------------
    def load_text_cache(self) -> feature_cache.TextFeatureCache:
        """Every training caption's frozen-LM features, loaded, or built in parallel by all ranks:
        one cache per source (beside its shards, keyed by its captions), looked up as one."""
        cfg = self.cfg
        encoder = accel.frozen_for_inference(self.acc, self.acc.unwrap_model(self.model).text,
                                             lambda: TextEncoder(text_config(cfg)))
        sources = self.stream.sources
        caches = []
        for source in sources:
            parts = self.run_dir / "text-cache-parts"
            result = feature_cache.load_or_build(
                encoder, self.tokenizer, shards=source.shards, split=cfg.data.train_split,
                cache_dir=cfg.model.text_cache_dir or feature_cache.default_cache_dir(source.shards, cfg.run.root),
                max_text_len=cfg.data.max_text_len, rank=self.rank, world=self.world,
                barrier=self.acc.wait_for_everyone, parts_dir=parts / source.name if len(sources) > 1 else parts,
                device=self.acc.device, strict=cfg.data.strict,
            )
            if self.acc.is_main_process:
                print(f"text cache: {'built' if result.built else 'loaded'} {result.cache.path} "
                      f"({len(result.cache)} captions, {result.seconds:.1f} s)", flush=True)
            caches.append(result.cache)
        return feature_cache.merge_caches(caches)

    # -- one optimizer step -------------------------------------------------------------------
    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch's tensors on the device; with the text cache, the captions' frozen-LM
        features (B, H) stand in for their token ids."""
        # a mixture's per-source counts are for the log, not the towers
        inputs = to_device({k: v for k, v in batch.items() if k != "source_samples"}, self.acc.device)
        if self.text_cache is not None:
            features = self.text_cache.lookup(batch["texts"], batch["ids"], batch.get("shards"))
            inputs["text_features"] = features.to(self.acc.device, non_blocking=True)
        return inputs

    def forward_towers(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        with self.acc.autocast():
            return self.model(inputs)

    def logs_step(self, step: int) -> bool:
        """Whether the step that ends at `step` writes a metrics record."""
        return step % self.cfg.train.log_every == 0 or step == self.total_steps

    def drawn_per_source(self, batch: dict[str, Any]) -> list[float]:
        """This rank's batch's samples per source (a mixture's batches count them; one source's
        batch is all its own)."""
        if "source_samples" in batch:
            return [float(n) for n in batch["source_samples"].tolist()]
        return [float(len(batch["texts"]))]

    def train_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        model = self.model
        inputs = self.model_inputs(batch)
        cached = None
        if self.cfg.train.micro_batches > 1:  # GradCache: embeddings now, the towers' graphs after the checks
            cached = embed_without_grad(self.forward_towers, inputs, self.cfg.train.micro_batches)
            motion_emb, text_emb = cached.motion, cached.text
        else:
            motion_emb, text_emb = self.forward_towers(inputs)
        unwrapped = self.acc.unwrap_model(model)
        # every dropped pair is counted only on a step that logs it (it costs intra-modal products)
        out = self.objective(motion_emb.float(), text_emb.float(), inputs["motion_index"],
                             step=self.step, epoch=self.epoch, logit_scale=-torch.log(unwrapped.temperature()),
                             count_drops=self.logs_step(self.step + 1))
        loss = out.loss
        if unwrapped.logit_scale.requires_grad and out.loss_name != "infonce":
            loss = loss + 0.0 * unwrapped.logit_scale  # SH warm-up before InfoNCE: DDP needs every grad
        # Non-finite embeddings (from damaged weights, say) can yield a finite, even zero, loss:
        # the hardest-negative search never picks a NaN score. So they count as non-finite too.
        # Kept on the device: no host sync before the step's one all-reduce.
        finite = torch.isfinite(loss.detach()) & torch.isfinite(motion_emb).all() & torch.isfinite(text_emb).all()
        host_flags = torch.tensor([
            # one rank looks at the marker (one metadata call per step on a shared filesystem,
            # not W); the all-reduce below tells every rank
            1.0 if self.rank == 0 and (self.run_dir / PREEMPT_MARKER).exists() else 0.0,
            float(batch.get("bad_samples", 0)),
            1.0 if self.ctrl_c.requested else 0.0,
            *self.drawn_per_source(batch),
        ], dtype=torch.float64)
        flags = torch.cat([(~finite).to(torch.float64).reshape(1), host_flags.to(self.acc.device)])
        # ONE all-reduce per step carries the loss statistics and the flags all ranks must agree on.
        summed = dist_utils.all_reduce_sum(torch.cat([stats_vector(out.stats), flags]))
        stats = summarize_stats(summed[:len(STATS_KEYS)])
        flag_values = summed[len(STATS_KEYS):].tolist()
        stats.update(zip(("nonfinite", "preempt", "bad_samples", "interrupt"), flag_values))
        self.bad_samples += int(stats["bad_samples"])
        # drawn is drawn: a skipped (non-finite) step's samples count too, as its bad samples do
        self.source_samples = [total + int(n) for total, n in zip(self.source_samples, flag_values[4:])]
        if stats["nonfinite"] > 0:
            if self.cfg.train.nonfinite == "stop":
                raise FloatingPointError(f"non-finite loss at step {self.step} on {stats['nonfinite']:.0f} rank(s); "
                                         "stopping (train.nonfinite=stop)")
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            # a loss computed from non-finite embeddings means nothing: never log it as a number
            return {**stats, "loss": float("nan"), "skipped": 1.0, "loss_name": out.loss_name}
        if cached is not None:
            backward_through_cache(cached, loss, self.forward_towers, backward=self.acc.backward,
                                   no_sync=lambda: self.acc.no_sync(model),
                                   loss_params=[p for p in (unwrapped.logit_scale,) if p.requires_grad])
        else:
            self.acc.backward(loss)
        if self.cfg.train.grad_clip > 0 and self.acc.sync_gradients and not accel.is_deepspeed(self.acc):
            self.acc.clip_grad_norm_(model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_embeddings = (motion_emb.detach().float(), text_emb.detach().float())
        return {**stats, "skipped": 0.0, "loss_name": out.loss_name}

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> int:
        cfg = self.cfg
        if cfg.train.micro_batches > 1:
            self.log.print(f"GradCache: {cfg.train.micro_batches} micro-batches of "
                           f"{cfg.train.batch_size // cfg.train.micro_batches} per step "
                           f"(batch {cfg.train.batch_size} per process)")
        val_every = cfg.train.val_every or self.steps_per_epoch
        save_every = cfg.train.save_every or self.steps_per_epoch
        stop = None  # "preempt" (the marker) or "interrupt" (Ctrl-C): save and end the run there
        try:
            with self.ctrl_c:
                stop = self.train_loop(val_every, save_every)
                final_ckpt = self.save()
            if stop == "preempt":
                self.log.print(f"preemption marker seen: saved {final_ckpt} at step {self.step}; exiting for requeue")
                return 0
            if stop == "interrupt":
                self.log.close()  # the progress bar ends before the line
                if self.acc.is_main_process:
                    print(f"rehamot: interrupted (Ctrl-C) at step {self.step}; saved {final_ckpt}; continue with: "
                          f"{resume_command(self.run_dir)}", file=sys.stderr, flush=True)
                return 130
            if self.step % val_every != 0:
                self.validate()
            self.export("final", {"step": self.step})
            self.finish()
            self.say(f"bad samples skipped: {self.bad_samples} (data.max_bad_fraction="
                     f"{self.cfg.data.max_bad_fraction:g})")
            self.log.print(f"done: {self.run_dir}\nnext: rehamot-eval {self.run_dir} --protocol every   "
                           f"(every protocol)\n      rehamot-search index {self.run_dir}   (then query, or serve a page)")
        finally:
            self.log.close()
            self.release_lock()
        return 0

    def train_loop(self, val_every: int, save_every: int) -> str | None:
        """Steps until the end of the run or a stop that all ranks agreed on (returned)."""
        cfg = self.cfg
        window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
        while self.step < self.total_steps:
            loader = self.stream.loader(self.epoch, start_step=self.step_in_epoch)
            it = iter(loader)
            epoch_done = False
            while not epoch_done and self.step < self.total_steps:
                t0 = time.perf_counter()
                batch = next(it)
                data_wait += time.perf_counter() - t0
                # A step's random numbers (dropout) are a function of (seed, step, rank), not of
                # whatever drew from the global RNG between steps (validation, export, a loader
                # created mid-epoch by a resume): a resumed run draws what an uninterrupted one
                # did, and ranks draw different masks. Seeds the CPU and every CUDA generator.
                torch.manual_seed(step_seed(cfg.seed, self.step, self.rank))
                stats = self.train_step(batch)
                self.step += 1
                self.step_in_epoch += 1
                window_steps += 1
                if self.step_in_epoch == self.steps_per_epoch:  # the position is the next batch's
                    self.epoch, self.step_in_epoch, epoch_done = self.epoch + 1, 0, True
                record = None
                if self.logs_step(self.step):
                    elapsed = time.perf_counter() - window_start
                    record = self.record(stats, window_steps, elapsed, data_wait)
                    window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
                self.log.step(self.step, record)
                self.check_health(stats, logged=record is not None, epoch_end=epoch_done)
                # at the last step a stop request is moot: the run finishes
                if self.step < self.total_steps and stats["interrupt"] > 0:
                    return "interrupt"
                if self.step < self.total_steps and stats["preempt"] > 0:
                    return "preempt"
                pause = time.perf_counter()
                if self.step % val_every == 0:
                    self.validate()
                if self.step % save_every == 0 and self.step < self.total_steps:
                    self.save()
                window_start += time.perf_counter() - pause  # samples/s counts training only
            del it, loader
        return None

    def say(self, line: str) -> None:
        """One unwrapped line of the log, from the main process (above the progress bar, if any)."""
        if self.acc.is_main_process:
            print(line, flush=True)

    def check_health(self, stats: dict[str, Any], logged: bool, epoch_end: bool) -> None:
        """Warn (once per code) of a logged step's signs of a run gone wrong; stop the run when
        the loaders skipped more bad samples than data.max_bad_fraction allows."""
        if logged:
            for warning in self.health.observe(self.step, stats):
                self.say(f"warning: {warning.code} at step {warning.step}: {warning.message}")
                self.log.write(warning.record())
        if logged or epoch_end:  # the same all-reduced counts on every rank: all stop alike
            read = self.step * self.cfg.train.batch_size * self.world + self.bad_samples
            check_bad_samples(self.bad_samples, read, self.cfg.data.max_bad_fraction,
                              self.stream.bad_shards(), " and ".join(s.shards for s in self.stream.sources))

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
            "bad_samples": self.bad_samples,
            "source_samples": dict(zip(self.source_names, self.source_samples)),
        }

    def finish(self) -> None:
        """Test-split evaluation of the best bundle, FID statistics and a model card in each
        bundle, plots, the DONE marker."""
        from rehamot.evaluation.figures import plot_similarity, plot_training_curves
        from rehamot.evaluation.generation_eval import save_run_fid_stats
        from rehamot.evaluation.model_card import write_model_card

        cfg, acc = self.cfg, self.acc
        acc.wait_for_everyone()
        bundle = find_bundle(self.run_dir)
        model, _, info = load_bundle(bundle, device=acc.device)
        eval_set = self.eval_set(cfg.data.test_split)
        enc = encode_split(model, eval_set, acc.device, cfg.train.eval_batch_size)
        results = evaluate_encoded(enc, ("captions",))
        del model
        # FID's reference for scoring generated motions, in best/ and final/ (a collective)
        save_run_fid_stats(self.run_dir, bundle, enc["motion_emb"], eval_set, acc.device,
                           cfg.train.eval_batch_size, write=acc.is_main_process)
        if acc.is_main_process:
            write_eval_figures(self.run_dir, enc, results, cfg.data.test_split)
            payload = {"split": cfg.data.test_split, "bundle": bundle.name, "step": info.get("step"),
                       "motions": eval_set.num_motions, "captions": eval_set.num_captions, "protocols": results}
            (self.run_dir / f"eval-{cfg.data.test_split}.json").write_text(json.dumps(payload, indent=1))
            for name in ("best", "final"):
                if (self.run_dir / name / WEIGHTS_FILE).is_file():
                    write_model_card(self.run_dir / name, self.manifest, self.run_dir)
            plot_training_curves(self.run_dir / "metrics.jsonl", self.run_dir / "training_curves.png")
            if self.last_embeddings is not None:
                m, t = self.last_embeddings
                plot_similarity((m @ t.T).cpu().numpy(), self.run_dir / "batch_similarity.png")
            self.log.close()
            print_results(results, title=f"{cfg.data.test_split} split ({bundle.name} checkpoint, step {info.get('step')})")
            (self.run_dir / DONE_MARKER).write_text(f"{self.step}\n")
        acc.wait_for_everyone()
