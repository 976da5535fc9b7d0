"""Threads per training process follow the cores the process may use, not the machine's."""
from __future__ import annotations

import os

import pytest

from rehamot.training.cpu_threads import auto_threads, choose_threads, usable_cpus


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    for key in ("SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_affinity_minus_loader_workers(two_cores):
    assert usable_cpus() == 2
    assert auto_threads(loader_workers=0) == 2
    assert auto_threads(loader_workers=1) == 1
    assert auto_threads(loader_workers=4) == 1  # never below one


def test_slurm_cpus_per_task_caps_and_is_not_shared_again(two_cores):
    two_cores.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    two_cores.setenv("SLURM_CPUS_PER_TASK", "8")
    two_cores.setenv("LOCAL_WORLD_SIZE", "8")
    assert usable_cpus() == 8 and auto_threads(loader_workers=2) == 6


def test_torchrun_processes_share_the_node(two_cores):
    two_cores.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    two_cores.setenv("LOCAL_WORLD_SIZE", "4")
    assert auto_threads(loader_workers=1) == 3


def test_config_then_environment_then_auto(two_cores):
    assert choose_threads(3, loader_workers=1) == (3, "train.threads")
    two_cores.setenv("OMP_NUM_THREADS", "2")
    assert choose_threads(0, loader_workers=1) == (2, "OMP_NUM_THREADS")
    two_cores.delenv("OMP_NUM_THREADS")
    threads, why = choose_threads(0, loader_workers=1)
    assert threads == 1 and "2 usable core(s)" in why
