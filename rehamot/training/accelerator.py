"""Accelerate and DeepSpeed: building the accelerator, preparing the model, and their quirks.

The one library module that imports accelerate (the entry points aside): every workaround
for a version of accelerate or DeepSpeed lives here, each with the reason, so the trainer
reads as a plain loop.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable

import torch

from rehamot.config import Config

DEEPSPEED_SHM_ENV = "REHAMOT_DS_SHM_COMM"  # 1: keep DeepSpeed's JIT-compiled CPU all-reduce


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
    if deepspeed and not cuda and os.environ.get(DEEPSPEED_SHM_ENV, "0") != "1":
        # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce at start-up (35-100 s, a C++
        # toolchain needed); gloo's all-reduce serves our small CPU runs.
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


def set_seed(seed: int) -> None:
    from accelerate.utils import set_seed as accelerate_set_seed

    accelerate_set_seed(seed)


def broadcast_from_main(value: Any, accelerator) -> Any:
    """Rank 0's value on every rank (a picklable object)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type.value == "DEEPSPEED"


def is_zero3(accelerator) -> bool:
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3


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


def prepare(accelerator, model: torch.nn.Module, optimizer, scheduler):
    """accelerator.prepare, with DeepSpeed's quirks handled before and after."""
    if is_deepspeed(accelerator):
        deepspeed_scalar_workaround(model)
    prepared = accelerator.prepare(model, optimizer, scheduler)
    if is_deepspeed(accelerator):
        from transformers.integrations import unset_hf_deepspeed_config

        # accelerate registers the ZeRO config with transformers, whose from_pretrained then
        # partitions every model built later (ZeRO-3): evaluation copies and bundles must be plain.
        unset_hf_deepspeed_config()
    return prepared


class PlainModel:
    """The model to run outside the training step (validation, the text-cache build).

    Under ZeRO-3 every forward all-gathers partitioned weights, a collective: ranks encoding
    different numbers of batches would hang, and the hooks break nn.TransformerEncoder's
    nested-tensor fast path. So under ZeRO-3 every rank uses a plain copy, built once with
    `build` (outside the training RNG) and refreshed from the gathered weights on each call.
    Otherwise it is the unwrapped training model itself.
    """

    def __init__(self, accelerator, build: Callable[[], torch.nn.Module]):
        self.accelerator, self.build = accelerator, build
        self.copy: torch.nn.Module | None = None

    def __call__(self, model: torch.nn.Module) -> torch.nn.Module:
        unwrapped = self.accelerator.unwrap_model(model)
        if not is_zero3(self.accelerator):
            return unwrapped
        import deepspeed

        if self.copy is None:
            with torch.random.fork_rng(devices=[]):  # building it must not move the training RNG
                self.copy = self.build().to(self.accelerator.device)
        with deepspeed.zero.GatheredParameters(list(unwrapped.parameters())):
            self.copy.load_state_dict(unwrapped.state_dict())
        return self.copy


def frozen_for_inference(accelerator, module: torch.nn.Module, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """A frozen submodule to run alone (the LM for the text cache): itself, or under ZeRO-3 a
    fresh plain one from `build` (partitioned weights would make each forward a collective;
    frozen weights are those `build` loads)."""
    if not is_zero3(accelerator):
        return accelerator.unwrap_model(module)
    with torch.random.fork_rng(devices=[]):  # the copy must not move the training RNG
        return build().to(accelerator.device)
