"""CPU cost of the per-sample digest the training reader checks, against other hashes.

    python benchmarks/sample_digest.py [--kib 132] [--repeats 2000]

132 KiB is the mean size of a demo sample's members; the share of one core is at 3,000
samples/s (a loader worker's target).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import time

from rehamot.data import schema


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kib", type=int, default=132)
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    data = os.urandom(args.kib * 1024)
    arms = {f"{schema.DIGEST} (ours)": schema.member_digest,
            "sha256": lambda d: hashlib.sha256(d).digest(),
            "blake2b-128": lambda d: hashlib.blake2b(d, digest_size=16).digest()}
    print(f"| digest | µs per {args.kib} KiB sample | share of one core at 3,000 samples/s |\n|---|---:|---:|")
    for name, digest in arms.items():
        start = time.perf_counter()
        for _ in range(args.repeats):
            digest(data)
        seconds = (time.perf_counter() - start) / args.repeats
        print(f"| {name} | {seconds * 1e6:.1f} | {seconds * 3000 * 100:.1f} % |")


if __name__ == "__main__":
    main()
