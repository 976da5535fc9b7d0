"""Search latency: one query over N random unit motion embeddings, the index in memory.

    python benchmarks/search_latency.py [--motions 100000] [--dim 1024] [--repeats 20] [--top-k 5]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from rehamot.retrieval.index import SearchIndex


def bench(num_motions: int, dim: int, repeats: int, k: int, seed: int = 0) -> dict[str, float]:
    """Latency of one query over random unit motion embeddings, index already in memory."""
    rng = np.random.default_rng(seed)
    motion_emb = rng.standard_normal((num_motions, dim), dtype=np.float32)
    motion_emb /= np.linalg.norm(motion_emb, axis=1, keepdims=True)
    motions = [{"id": f"m{i:06d}", "captions": []} for i in range(num_motions)]
    index = SearchIndex(motion_emb, np.zeros((0, dim), np.float32), motions)
    queries = rng.standard_normal((repeats, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    times = []
    for query in queries:
        start = time.perf_counter()
        index.search_motions(query, k)
        times.append(time.perf_counter() - start)
    return {"median_ms": 1e3 * float(np.median(times)), "max_ms": 1e3 * float(np.max(times))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--motions", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args()
    figures = bench(args.motions, args.dim, args.repeats, args.top_k)
    print(f"query over {args.motions} unit motion embeddings (dim {args.dim}), top-{args.top_k}: "
          f"median {figures['median_ms']:.1f} ms, max {figures['max_ms']:.1f} ms over {args.repeats} queries")


if __name__ == "__main__":
    main()
