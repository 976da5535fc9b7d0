"""Peak memory and time of DropTriple forward + backward, arm by arm.

Arms: `dense` (the project's B x G reference, `loss.implementation=dense`), `compact` (a
short dense formulation shaped like the original code: the B x G scores and the two
intra-modal B x G similarities under autograd, masked max), `scan` (the chunked loss scanning
every intra-modal similarity: the search before the bounded one), `topk` (the top-k search,
then the bounded scan for the rows it cannot settle), `bounded` (the bounded scan alone),
`chunked` (the default: "auto" picks top-k or bounded after a probe) and `product` (one
B x G x D similarity product, forward only: the floor any implementation pays).

Global-batch mode (default): W gloo ranks (1 thread each) run `GlobalBatchObjective` on
clustered unit embeddings, G = W * B global pairs, for each G in --sizes.
Single-process mode (--single): one process, one batch of --batch pairs (no gather).
--count-drops counts every dropped pair (what a logged training step does); without it the
chunked arms skip that count (every other step). --rounds N repeats every arm N times,
alternating, and reports each arm's time over the `reference` arm's in the same round.
--thresholds T sets all four drop thresholds (-0.99: drop nearly everything, the worst case).

Every measurement runs in fresh processes, so that each process's max RSS
(resource.getrusage) belongs to that measurement alone. "peak tensor" is the high-water
mark of tensor bytes allocated inside the loss (gather, scores, masks, backward), from the
profiler's memory events; the input embeddings are not counted. Sizes whose predicted
footprint exceeds --budget-gb are skipped: without swap the kernel's OOM killer, not a
Python error, would end them. Each arm's latest measurement calibrates the bytes per
score cell that predict its next size.

    python benchmarks/loss_memory.py                          # G = 1k ... 64k, D = 256, 2 ranks
    python benchmarks/loss_memory.py --single --batch 8192 --dim 1024
    python benchmarks/loss_memory.py --single --batch 1024 2048 4096 8192 16384 --dim 1024 \
        --implementations product chunked
    python benchmarks/loss_memory.py --single --batch 8192 --dim 1024 --rounds 5 \
        --implementations compact dense scan chunked product
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: ranks share a few cores
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler quiet

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from rehamot.config import LossConfig  # noqa: E402
from rehamot.loss.negative_search import chunk_width  # noqa: E402
from rehamot.loss.objective import GlobalBatchObjective, reduce_stats  # noqa: E402
from rehamot.loss.pairs import drop_thresholds  # noqa: E402

MB = 1 << 20
# Bytes held per (anchor, candidate) cell at the peak, before a measurement calibrates
# them; measured on torch 2.13 CPU: the dense reference holds both directions' fp32 scores,
# both intra-modal similarities and several bool masks (~22.5); the chunked path about 10
# per cell of one B x chunk block.
INITIAL_BYTES_PER_CELL = {"dense": 24.0, "compact": 16.0, "scan": 12.0, "topk": 12.0, "bounded": 12.0,
                         "chunked": 12.0, "product": 8.0}
ARMS = tuple(INITIAL_BYTES_PER_CELL)
CHUNKED_ARMS = {"scan": "plain", "topk": "topk", "bounded": "bounded", "chunked": "auto"}  # arm -> search
# Gathered fp32 columns (motion, text, their concatenation) and their gradients.
COLUMN_COPIES = 4


@dataclass(frozen=True)
class Job:
    global_batch: int
    dim: int
    implementation: str
    chunk_size: int
    threads: int
    clusters: int
    noise: float
    seed: int
    count_drops: bool = False
    thresholds: float | None = None


def clustered_batch(job: Job) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit embeddings around `clusters` centres; captions and motions share the centre.

    Same-cluster cosines are about 1 / (1 + noise^2) (0.77 at noise 0.55), so around the
    0.75 thresholds some same-cluster pairs are dropped and some are kept.
    """
    gen = torch.Generator().manual_seed(job.seed)
    size, dim = job.global_batch, job.dim
    centres = F.normalize(torch.randn(job.clusters, dim, generator=gen), dim=1)
    which = torch.randint(job.clusters, (size,), generator=gen)
    scale = job.noise / dim**0.5
    motion = F.normalize(centres[which] + scale * torch.randn(size, dim, generator=gen), dim=1)
    text = F.normalize(centres[which] + scale * torch.randn(size, dim, generator=gen), dim=1)
    ids = torch.arange(size, dtype=torch.int64)
    ids[1::100] = ids[0::100][: ids[1::100].numel()]  # a motion seen twice now and then
    return motion, text, ids


def _peak_tensor_bytes(prof: profile) -> int:
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def compact_dense_loss(motion: torch.Tensor, text: torch.Tensor, ids: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """DropTriple as the original writes it, single process: every B x B matrix under autograd."""
    scores = motion @ text.T
    sim_mm, sim_tt = motion @ motion.T, text @ text.T
    positive = scores.diagonal()
    same = ids[:, None] == ids[None, :]
    th = drop_thresholds(cfg)
    drop_mt = (sim_mm > th.mt_motion) | (sim_tt > th.mt_text) | same
    drop_tm = (sim_mm > th.tm_motion) | (sim_tt > th.tm_text) | same
    hardest_mt = scores.masked_fill(drop_mt, float("-inf")).max(dim=1).values
    hardest_tm = scores.T.masked_fill(drop_tm, float("-inf")).max(dim=1).values
    per_anchor = (cfg.margin + hardest_mt - positive).clamp_min(0) + (cfg.margin + hardest_tm - positive).clamp_min(0)
    return per_anchor.mean()


def _arm_loss(job: Job, objective: GlobalBatchObjective | None, cfg: LossConfig, motion, text, ids):
    """(loss to backward, stats or None) of one arm on this rank's rows."""
    if job.implementation == "product":  # the one product itself, no autograd
        with torch.no_grad():
            return (motion @ text.T).sum(), None
    if job.implementation == "compact":
        return compact_dense_loss(motion, text, ids, cfg), None
    out = objective(motion, text, ids, step=0, epoch=0, count_drops=job.count_drops)
    return out.loss, out.stats


def _loss_config(job: Job) -> LossConfig:
    thresholds = {} if job.thresholds is None else {
        "threshold_motion": job.thresholds, "threshold_text": job.thresholds,
        "threshold_anchor": job.thresholds, "threshold_candidate": job.thresholds}
    implementation = "dense" if job.implementation == "dense" else "chunked"
    return LossConfig(name="droptriple", chunk_size=job.chunk_size, implementation=implementation, **thresholds)


def _run_loss(job: Job, rank: int, world_size: int, objective: GlobalBatchObjective | None, batch) -> dict:
    motion, text, ids = batch
    local = slice(rank * job.global_batch // world_size, (rank + 1) * job.global_batch // world_size)
    motion_emb = motion[local].clone().requires_grad_()
    text_emb = text[local].clone().requires_grad_()
    local_ids = ids[local].clone()
    del motion, text, ids, batch
    rss_before = _max_rss_bytes()
    if world_size > 1:
        dist.barrier()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        start = time.perf_counter()
        loss, stats = _arm_loss(job, objective, _loss_config(job), motion_emb, text_emb, local_ids)
        if loss.requires_grad:
            loss.backward()
        seconds = time.perf_counter() - start
    nan = float("nan")
    summary = reduce_stats(stats) if stats is not None else {"loss": float(loss.detach()), "dropped": nan, "drop_rate": nan}
    return {
        "seconds": seconds,
        "peak_tensor_bytes": _peak_tensor_bytes(prof),
        "rss_before_bytes": rss_before,
        "max_rss_bytes": _max_rss_bytes(),
        "loss": summary["loss"],
        "dropped": summary["dropped"],
        "drop_rate": summary["drop_rate"],
    }


def _worker(rank: int, world_size: int, port: int, job: Job, out_dir: str) -> None:
    torch.set_num_threads(job.threads)
    if world_size > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(minutes=30),
        )
    try:
        if job.implementation in ("compact", "product") and world_size > 1:
            raise SystemExit(f"the {job.implementation} arm is single-process only (--single)")
        objective = GlobalBatchObjective(_loss_config(job), search=CHUNKED_ARMS.get(job.implementation, "auto"))
        # Warm-up on a tiny batch: thread pools, kernels and the first collective.
        tiny = Job(**{**job.__dict__, "global_batch": 8 * world_size})
        _run_loss(tiny, rank, world_size, objective, clustered_batch(tiny))
        result = _run_loss(job, rank, world_size, objective, clustered_batch(job))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_job(job: Job, world_size: int) -> list[dict] | str:
    """Per-rank results, or why the run failed."""
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.spawn(_worker, args=(world_size, _free_port(), job, out_dir), nprocs=world_size, join=True)
        except Exception as error:  # a rank killed by the OOM killer lands here too
            return f"failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
        return [json.loads(Path(out_dir, f"rank{rank}.json").read_text()) for rank in range(world_size)]


def score_cells(job: Job, world_size: int) -> int:
    """(anchor, candidate) cells one rank holds at once: B x G dense, B x chunk chunked."""
    local = job.global_batch // world_size
    whole = job.implementation in ("dense", "compact", "product")
    width = job.global_batch if whole else min(chunk_width(job.chunk_size, local), job.global_batch)
    return local * width


def predict_rank_bytes(job: Job, world_size: int, bytes_per_cell: float, baseline: int) -> float:
    columns = COLUMN_COPIES * job.global_batch * job.dim * 4
    return baseline + bytes_per_cell * score_cells(job, world_size) + columns


def _row(cells: list[object]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024 * 2**k for k in range(7)],
                        help="global batch sizes G (global-batch mode)")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--single", action="store_true", help="one process, one batch of --batch")
    parser.add_argument("--batch", type=int, nargs="+", default=[8192], help="batch sizes in --single mode")
    parser.add_argument("--dim", type=int, default=None, help="embedding size (256; 1024 with --single)")
    parser.add_argument("--chunk-size", type=int, default=LossConfig().chunk_size)
    parser.add_argument("--implementations", nargs="+", default=["dense", "scan", "chunked"], choices=ARMS,
                        help="arms, in order (compact and product: --single only)")
    parser.add_argument("--reference", default=None, help="the arm the others' times are divided by (default: the first)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every arm, alternating, this many times")
    parser.add_argument("--count-drops", action="store_true", help="count every dropped pair (a logged step)")
    parser.add_argument("--thresholds", type=float, default=None, help="all four drop thresholds (default: the config's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--clusters", type=int, default=64)
    parser.add_argument("--noise", type=float, default=0.55)
    parser.add_argument("--budget-gb", type=float, default=8.0, help="skip runs predicted above this (all ranks)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    world_size = 1 if args.single else args.world_size
    sizes = args.batch if args.single else args.sizes
    dim = args.dim or (1024 if args.single else 256)
    budget = args.budget_gb * (1 << 30)
    bytes_per_cell = dict(INITIAL_BYTES_PER_CELL)
    baseline = 400 * MB  # RSS of a process that has imported torch; replaced once measured
    calibrated: set[str] = set()

    mode = "single process" if args.single else f"{world_size} gloo ranks"
    counting = "every dropped pair counted" if args.count_drops else "drops not counted (an unlogged step)"
    reference = args.reference or args.implementations[0]
    print(f"DropTriple forward+backward, {mode}, D = {dim}, chunk = {args.chunk_size}, "
          f"{args.threads} thread(s) per process, {args.clusters} clusters, {counting}, "
          f"thresholds {args.thresholds if args.thresholds is not None else 'of the config'}, torch {torch.__version__}\n")
    header = ["G", "B / rank", "round", "arm", "time (s)", f"time / {reference}", "peak tensor MB / rank",
              "max RSS MB / rank", "predicted MB / rank", "loss", "dropped", "drop rate"]
    print(_row(header))
    print(_row(["---"] * len(header)))
    ratios: dict[tuple[int, str], list[float]] = {}
    for size in sizes:
        for round_ in range(1, args.rounds + 1):
            times: dict[str, float] = {}
            for implementation in args.implementations:
                job = Job(size, dim, implementation, args.chunk_size, args.threads, args.clusters, args.noise, args.seed,
                          args.count_drops, args.thresholds)
                predicted = predict_rank_bytes(job, world_size, bytes_per_cell[implementation], baseline)
                prefix = [size, size // world_size, round_, implementation]
                if predicted * world_size > budget:
                    print(_row(prefix + ["skipped", "", "", "", f"{predicted / MB:,.0f}",
                                         f"predicted {predicted * world_size / (1 << 30):.1f} GB > budget", "", ""]),
                          flush=True)
                    continue
                results = run_job(job, world_size)
                if isinstance(results, str):
                    print(_row(prefix + [results, "", "", "", f"{predicted / MB:,.0f}", "", "", ""]), flush=True)
                    continue
                peak = max(r["peak_tensor_bytes"] for r in results)
                rss = max(r["max_rss_bytes"] for r in results)
                # The next, larger sizes are predicted from this measurement (the largest so far,
                # where fixed overheads weigh least).
                bytes_per_cell[implementation] = max(
                    1.0, (peak - COLUMN_COPIES * size * dim * 4) / score_cells(job, world_size)
                )
                baseline = max(r["rss_before_bytes"] for r in results)
                calibrated.add(implementation)
                first = results[0]
                times[implementation] = max(r["seconds"] for r in results)
                ratio = times[implementation] / times[reference] if reference in times else float("nan")
                ratios.setdefault((size, implementation), []).append(ratio)
                drop_rate = first["drop_rate"]
                print(_row(prefix + [
                    f"{times[implementation]:.2f}", f"{ratio:.2f}", f"{peak / MB:,.0f}", f"{rss / MB:,.0f}",
                    f"{predicted / MB:,.0f}", f"{first['loss']:.6f}", f"{first['dropped']:,.0f}",
                    "" if drop_rate != drop_rate else f"{100 * drop_rate:.2f} %",
                ]), flush=True)
    print(f"\ntime / {reference} over the rounds (min, median, max):")
    for (size, implementation), values in ratios.items():
        values = sorted(values)
        print(f"  G = {size}, {implementation}: {values[0]:.2f}, {values[len(values) // 2]:.2f}, {values[-1]:.2f}")
    print("\nbytes per score cell at the peak (measured): "
          + ", ".join(f"{k} {v:.1f}" for k, v in bytes_per_cell.items() if k in calibrated))


if __name__ == "__main__":
    main()
