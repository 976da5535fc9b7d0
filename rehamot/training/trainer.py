"""The training loop: one optimizer step over the global batch, validation, checkpoints, export.

Read top to bottom: `Trainer.__init__` builds everything (data, model, optimizer, objective)
and resumes; `train_step` is one optimizer step; `run` is the loop; `finish` evaluates the
best bundle on the test split. Accelerate/DeepSpeed specifics live in `rehamot.training.accelerator`.
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from rehamot import distributed as dist_utils
from rehamot.config import Config
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
from rehamot.training.lr_schedule import gated, lr_multiplier
from rehamot.training.run_dir import choose_run_dir, write_run_files
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
        self.resume_point = self.find_resume_point()  # checked now: a bad one fails in seconds
        if self.acc.is_main_process:
            print(f"run directory: {self.run_dir}", flush=True)
            print(f"CPU threads per process: {threads} ({threads_from})", flush=True)
            write_run_files(self.run_dir, cfg, {
                "world_size": self.world, "distributed_type": str(self.acc.distributed_type),
                "mixed_precision": self.acc.mixed_precision,
            })
        self.acc.wait_for_everyone()

        # data: with the text cache the loader does not tokenise, each caption's LM features are looked up
        self.tokenizer = build_tokenizer(cfg)
        self.use_text_cache = feature_cache.cache_enabled(cfg.model.text_cache, cfg.model.finetune_lm)
        self.stream = TrainStream(data_config(cfg, cfg.data.train_split),
                                  None if self.use_text_cache else self.tokenizer, self.rank, self.world)
        self.steps_per_epoch = self.stream.steps_per_epoch
        total = cfg.train.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.train.max_steps) if cfg.train.max_steps else total

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
        self.last_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None  # for batch_similarity.png
        if self.resume_point is not None:
            self.restore(*self.resume_point)
        self.log = (RunLog(self.run_dir, self.total_steps, self.step, loss_name=cfg.loss.name)
                    if self.acc.is_main_process else NullLog())

    # -- checkpoints --------------------------------------------------------------------------
    def position(self) -> dict[str, Any]:
        return {
            "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "world_size": self.world, "seed": self.cfg.seed, "batch_size": self.cfg.train.batch_size,
            "num_workers": self.cfg.data.num_workers, "shards": self.cfg.data.shards,
            "best_rsum": self.best_rsum if math.isfinite(self.best_rsum) else None,
            "bad_samples": self.bad_samples,
        }

    def save(self) -> Path:
        bad = [name for name, p in self.acc.unwrap_model(self.model).named_parameters() if not torch.isfinite(p).all()]
        if bad:  # never write (nor let retention keep in place of a good one) a checkpoint of NaNs
            raise FloatingPointError(f"non-finite parameters at step {self.step} ({', '.join(bad[:3])}"
                                     f"{', ...' if len(bad) > 3 else ''}); not saving a checkpoint of them")
        return ckpt.save_checkpoint(
            self.run_dir, self.step, self.position(), self.acc.save_state, self.acc.wait_for_everyone,
            self.acc.is_main_process, keep=self.cfg.train.keep_checkpoints,
        )

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
            raise RunDirLocked(refusal)
        return lock

    def find_resume_point(self) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint to resume from and its position, or None; refuses a position
        written under other settings than the data order needs."""
        path = ckpt.resolve_resume(self.cfg.resume, self.run_dir)
        if path is None:
            if self.cfg.resume == "latest" and not self.run_dir_was_looked_up and self.acc.is_main_process:
                print(f"resume=latest: no checkpoint in {self.run_dir} yet; starting fresh", flush=True)
            return None
        pos = ckpt.read_position(path, required=("step", "epoch", "step_in_epoch", "best_rsum"))
        now = {"world_size": self.world, "batch_size": self.cfg.train.batch_size,
               "num_workers": self.cfg.data.num_workers, "seed": self.cfg.seed}
        changed = {k: (pos.get(k), v) for k, v in now.items() if pos.get(k) != v}
        if changed:
            what = ", ".join(f"{k}={old} then, {new} now" for k, (old, new) in changed.items())
            raise ckpt.CheckpointError(
                f"resume from {path}: {what}. The data order and the global batch depend on the "
                "world size, batch size, loader workers and seed, so an exact resume needs the same "
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
        if self.acc.is_main_process:
            print(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.step_in_epoch})")

    # -- evaluation and export ----------------------------------------------------------------
    def export(self, name: str, extra: dict[str, Any]) -> None:
        state = self.acc.get_state_dict(self.model)  # gathers ZeRO-3 shards; call on every rank
        if self.acc.is_main_process:
            unwrapped = self.acc.unwrap_model(self.model)
            export_bundle(self.run_dir / name, state, unwrapped.text.fingerprint(), self.cfg, self.manifest, extra)
        self.acc.wait_for_everyone()

    def validate(self) -> None:
        split = self.cfg.data.val_split
        if split not in self.manifest["splits"]:
            return
        eval_set = EvalSet(data_config(self.cfg, split), self.tokenizer, self.rank, self.world)
        results = evaluate_model(self.eval_model(self.model), eval_set, self.acc.device,
                                 batch_size=self.cfg.train.eval_batch_size, protocols=("captions",))
        metrics = results["captions"]
        self.log.write({"step": self.step, "epoch": self.epoch, **{f"val/{k}": v for k, v in metrics.items()}})
        if metrics["rsum"] > self.best_rsum:
            self.best_rsum = metrics["rsum"]
            self.export("best", {"step": self.step, "val": metrics})

    # -- frozen-LM text features -----------------------------------------------------------
    def load_text_cache(self) -> feature_cache.TextFeatureCache:
        """Every training caption's frozen-LM features, loaded, or built in parallel by all ranks."""
        cfg = self.cfg
        encoder = accel.frozen_for_inference(self.acc, self.acc.unwrap_model(self.model).text,
                                             lambda: TextEncoder(text_config(cfg)))
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

    # -- one optimizer step -------------------------------------------------------------------
    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch's tensors on the device; with the text cache, the captions' frozen-LM
        features (B, H) stand in for their token ids."""
        inputs = to_device(batch, self.acc.device)
        if self.text_cache is not None:
            features = self.text_cache.lookup(batch["texts"], batch["ids"], batch.get("shards"))
            inputs["text_features"] = features.to(self.acc.device, non_blocking=True)
        return inputs

    def forward_towers(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        with self.acc.autocast():
            return self.model(inputs)

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
        out = self.objective(motion_emb.float(), text_emb.float(), inputs["motion_index"],
                             step=self.step, epoch=self.epoch, logit_scale=-torch.log(unwrapped.temperature()))
        loss = out.loss
        if unwrapped.logit_scale.requires_grad and out.loss_name != "infonce":
            loss = loss + 0.0 * unwrapped.logit_scale  # SH warm-up before InfoNCE: DDP needs every grad
        # Non-finite embeddings (from damaged weights, say) can yield a finite, even zero, loss:
        # the hardest-negative search never picks a NaN score. So they count as non-finite too.
        # Kept on the device: no host sync before the step's one all-reduce.
        finite = torch.isfinite(loss.detach()) & torch.isfinite(motion_emb).all() & torch.isfinite(text_emb).all()
        host_flags = torch.tensor([
            1.0 if (self.run_dir / PREEMPT_MARKER).exists() else 0.0,
            float(batch.get("bad_samples", 0)),
        ], dtype=torch.float64)
        flags = torch.cat([(~finite).to(torch.float64).reshape(1), host_flags.to(self.acc.device)])
        # ONE all-reduce per step carries the loss statistics and the flags all ranks must agree on.
        summed = dist_utils.all_reduce_sum(torch.cat([stats_vector(out.stats), flags]))
        stats = summarize_stats(summed[:len(STATS_KEYS)])
        stats.update(zip(("nonfinite", "preempt", "bad_samples"), summed[len(STATS_KEYS):].tolist()))
        self.bad_samples += int(stats["bad_samples"])
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
            self.log.print(f"done: {self.run_dir}\nnext: rehamot-eval {self.run_dir} --protocol every   "
                           f"(every protocol)\n      rehamot-search index {self.run_dir}   (then query, or serve a page)")
        finally:
            self.log.close()
            if self.lock is not None:
                self.lock.release()
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
            "bad_samples": self.bad_samples,
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
        eval_set = EvalSet(data_config(cfg, cfg.data.test_split), self.tokenizer, self.rank, self.world)
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
