"""The `%%gpu` change check: hashing 100 MB with what `jupyter_ext.agent.new_digest` uses
(xxHash's XXH3-128, or SHA-1 without the package) against SHA-1, BLAKE2b and MD5.

    .venv/bin/python bench/digest.py [--reps 7]

Every push hashes what it sends (to send a variable only when it changed) and every pull hashes
what comes back (so that it is not pushed back unchanged): this is that cost per 100 MB."""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import describe_machine, run_lines
from jupyter_ext import agent

NBYTES = 100_000_000


def timed(make: Callable[[], Any], data: memoryview, reps: int) -> list[float]:
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        h = make()
        h.update(data)
        h.hexdigest()
        samples.append(time.perf_counter() - t0)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7, help="hashes of 100 MB per function (7)")
    args = parser.parse_args()
    if not 1 <= args.reps <= 100:
        parser.error("--reps must be from 1 to 100")
    import numpy as np

    data = memoryview(np.random.default_rng(0).random(NBYTES // 8)).cast("B")
    started = time.perf_counter()
    functions: dict[str, Callable[[], Any]] = {
        "SHA-1 (before)": lambda: hashlib.sha1(usedforsecurity=False),
        "BLAKE2b-128": lambda: hashlib.blake2b(digest_size=16),
        "MD5": lambda: hashlib.md5(usedforsecurity=False),
    }
    if agent.FAST_HASH is not None:
        functions["XXH3-128 (now, with the xxhash package)"] = agent.FAST_HASH
    else:
        print("xxhash is not installed: new_digest is SHA-1 here (pip install xxhash)")
    results = {name: timed(make, data, args.reps) for name, make in functions.items()}
    elapsed = time.perf_counter() - started
    machine = describe_machine(("xxhash", "numpy"), "none used")
    for line in run_lines(machine, ("jupyter_ext",), elapsed):
        print(line)
    print()
    print("| hash of 100 MB | n | median | p90 | rate | time vs SHA-1 |")
    print("|---|--:|--:|--:|--:|--:|")
    base = statistics.median(results["SHA-1 (before)"])
    for name, samples in results.items():
        value = statistics.median(samples)
        worst = sorted(samples)[max(0, round(0.9 * len(samples)) - 1)]
        print(f"| {name} | {len(samples)} | {value * 1e3:.1f} ms | {worst * 1e3:.1f} ms | "
              f"{NBYTES / value / 1e9:.2f} GB/s | {value / base:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
