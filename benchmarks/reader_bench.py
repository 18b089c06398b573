"""Pair-reader throughput with and without content verification, on a synthetic cache in the real format.

    python benchmarks/reader_bench.py [--gb 1.0] [--workdir /tmp/nfm-reader-bench]

"verified" is the reader as shipped: every shard is read whole and its xxh3-128 checked against the index
before any row is used. "unverified" is the previous reader (positional reads of each column, no check),
kept here only as the baseline. Writes benchmarks/results/reader-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_results  # noqa: E402
from benchmarks.pairs_bench import synthetic_cache  # noqa: E402
from nfm.pairs.reader import PairCache, PairReader  # noqa: E402


class UnverifiedReader(PairReader):
    """The reader before verification: each column read straight from disk into the window's buffer."""

    def _read_window(self, window):
        parts = [self.cache.shard(i) for i in window]
        cols = {}
        for k in ("noise", "data", "label", "index"):
            dt, shape = parts[0].tensors[k][0], parts[0].tensors[k][1][1:]
            out = torch.from_numpy(np.empty((sum(p.rows for p in parts), *shape), dtype=dt))
            a = 0
            for p in parts:
                p.read(k, out=out[a : a + p.rows])
                a += p.rows
            cols[k] = out
        return cols


def epoch_rate(reader: PairReader, batch: int) -> float:
    steps = len(reader.cache) // batch
    it = reader.batches(batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/nfm-reader-bench")
    args = ap.parse_args()
    cache_dir = synthetic_cache(Path(args.workdir), args.gb)
    cache = PairCache(cache_dir)
    rows = []
    readers = (("unverified (previous reader)", UnverifiedReader), ("verified (xxh3-128 per shard)", PairReader))
    for name, cls in readers:
        rates = [epoch_rate(cls(cache, seed=0, window=2), args.batch) for _ in range(args.repeats)]
        rows.append({"reader": name, "pairs/s (median)": round(float(np.median(rates))), "runs": len(rates)})
    ratio = rows[1]["pairs/s (median)"] / rows[0]["pairs/s (median)"]
    notes = (
        f"One shuffled epoch of a {args.gb} GB synthetic cache of 3x32x32 pairs (float16 noise, uint8 data), "
        f"batch {args.batch}, window 2, file cache warm after the first run; median of {args.repeats}. "
        f"verified / unverified = {ratio:.2f}."
    )
    write_results("reader-cpu", rows, notes=notes)


if __name__ == "__main__":
    main()
