"""Faults injected into training subprocesses through train.py's REHAMOT_TEST_HOOK seam.

    env = {"REHAMOT_TEST_HOOK": "fault_hooks:nan_loss_at_step", "PYTHONPATH": <this folder>,
           "FAULT_STEP": "1"}
"""
from __future__ import annotations

import os


def nan_loss_at_step(trainer) -> None:
    """The objective returns a NaN loss at global step FAULT_STEP (on every rank)."""
    step = int(os.environ["FAULT_STEP"])
    objective = trainer.objective

    def faulty(*args, **kwargs):
        out = objective(*args, **kwargs)
        if kwargs["step"] == step:
            out.loss = out.loss + float("nan")
        return out

    trainer.objective = faulty


def nan_parameter(trainer) -> None:
    """One motion-tower weight is NaN from the start (as a damaged checkpoint would leave it)."""
    import torch

    with torch.no_grad():
        next(trainer.acc.unwrap_model(trainer.model).motion.parameters()).view(-1)[0] = float("nan")
