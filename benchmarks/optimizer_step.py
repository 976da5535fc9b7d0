"""AdamW step time on the paper model's parameters: for-loop vs foreach vs fused.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/optimizer_step.py --repeats 5

Builds the real two-tower model (rehamot.models.factory, the paper's size, the packaged MiniLM
fine-tuned, so ~26 M trainable parameters in the trainer's parameter groups), fills every
gradient with fixed random values, and times `optimizer.step()` of torch.optim.AdamW built
as build_optimizer builds it, in each implementation; implementations are interleaved and
the median over --repeats rounds of --steps steps is reported. It also checks that the
three leave the same parameters after the same steps (max abs difference).
"""
from __future__ import annotations

import argparse
import statistics
import time

IMPLS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--frozen", action="store_true", help="frozen LM: only the towers' own parameters")
    args = parser.parse_args()

    import torch

    from rehamot.config import load_config
    from rehamot.models.factory import build_model

    cfg = load_config(None, [f"model.finetune_lm={not args.frozen}", "train.weight_decay=0.01"])
    models, optimizers = {}, {}
    for name, kwargs in IMPLS.items():
        torch.manual_seed(0)
        model = build_model(cfg, feature_dim=263)  # HumanML3D features
        groups = model.param_groups(lr=cfg.train.lr, lm_lr=cfg.train.lm_lr, weight_decay=cfg.train.weight_decay)
        optimizers[name] = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, **kwargs)
        models[name] = model
    params = {name: [p for g in opt.param_groups for p in g["params"]] for name, opt in optimizers.items()}
    count = sum(p.numel() for p in params["fused"])
    times: dict[str, list[float]] = {name: [] for name in IMPLS}
    for repeat in range(args.repeats):
        for name, opt in optimizers.items():
            generator = torch.Generator().manual_seed(repeat)
            for p in params[name]:
                p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            start = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            times[name].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["for-loop"])
    print(f"AdamW over {count / 1e6:.1f} M parameters in {len(optimizers['fused'].param_groups)} groups, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}; medians of {args.repeats} rounds × "
          f"{args.steps} steps\n")
    print("| implementation | ms/step | vs for-loop | max abs param difference vs for-loop |")
    print("|---|---:|---:|---:|")
    for name in IMPLS:
        diff = max(float((a - b).detach().abs().max()) for a, b in zip(params[name], params["for-loop"]))
        median = statistics.median(times[name])
        print(f"| {name} | {1000 * median:.1f} | {base / median:.2f}× | {diff:.1e} |")


if __name__ == "__main__":
    main()
