"""How many intra-op threads a training process should use: the cores it may actually use.

torch sizes its thread pool from the machine's cores. On a shared node that oversubscribes:
two intra-op threads plus a loader worker on two cores, or eight processes of a node each
taking all its cores. OpenMP threads that spin while a sibling is descheduled then burn the
time, and throughput collapses far below a fair share (docs/benchmarks.md, contention). So
the count comes from what this process may use: its CPU affinity, capped by SLURM's
`--cpus-per-task`, shared with the other training processes of the node (torchrun's
LOCAL_WORLD_SIZE) when they all see the same cores, minus the process's loader workers.
"""
from __future__ import annotations

import os


def usable_cpus() -> int:
    """Cores this process may run on: its affinity, capped by SLURM_CPUS_PER_TASK."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and int(per_task) > 0:
        cpus = min(cpus, int(per_task))
    return max(cpus, 1)


def auto_threads(loader_workers: int) -> int:
    """Intra-op threads for one training process (at least 1)."""
    cpus = usable_cpus()
    if not os.environ.get("SLURM_CPUS_PER_TASK"):  # torchrun: the node's processes share these cores
        cpus //= max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(cpus - loader_workers, 1)


def choose_threads(configured: int, loader_workers: int) -> tuple[int, str]:
    """(threads, why): the config's count, else OMP_NUM_THREADS when set, else auto_threads."""
    if configured > 0:
        return configured, "train.threads"
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    return auto_threads(loader_workers), (f"{usable_cpus()} usable core(s), "
                                          f"{os.environ.get('LOCAL_WORLD_SIZE', '1')} process(es), "
                                          f"{loader_workers} loader worker(s)")
