"""Reading a pair cache: shuffled, rank-split, resumable, with flat memory.

An epoch visits the shards in a seeded order, `window` shards at a time; the rows of a window
are read from disk, permuted with a seed of (seed, epoch, window) and dealt to the processes
round-robin (process r takes positions r, r + W, ...), so across processes every row is read
exactly once per epoch. Memory holds one window, whatever the cache size.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pairs.format import ShardFile, read_index, safe_member
from pipeline.errors import NFMError
from pipeline.training import derive_seed


class PairCache:
    """A complete pair cache: its index, shards and row counts. Validates before any read."""

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir)
        self.index: dict[str, Any] = read_index(self.dir)
        if not self.index.get("complete"):
            have, want = len(self.index.get("shards", [])), self.index.get("num_shards", "?")
            raise NFMError(
                f"pair cache {self.dir} is incomplete ({have} of {want} shards): rerun `nfm pairs build` "
                "with the same arguments to finish it"
            )
        self.shards = self.index["shards"]
        for s in self.shards:
            path = safe_member(self.dir, s["file"])
            if not path.is_file():
                raise NFMError(
                    f"pair shard missing: {path}. Rebuild the cache (`nfm pairs rm {self.key}`, then `nfm pairs build`)"
                )
            if path.stat().st_size != s["bytes"]:
                raise NFMError(
                    f"pair shard {path} is {path.stat().st_size} bytes, the index says {s['bytes']}: "
                    f"it is truncated or was replaced. Run `nfm pairs verify {self.key}` or rebuild"
                )
        self.sigma_f = float(self.index["sigma_f"])
        self.levels = int(self.index["data"]["levels"])
        self.data_uint8 = self.index["dtypes"]["data"] == "uint8"

    @property
    def key(self) -> str:
        return self.index["key"]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.index["shapes"]["data"])

    @property
    def num_classes(self) -> int:
        return int(self.index["data"].get("num_classes", 0))

    def __len__(self) -> int:
        return int(self.index["total_rows"])

    def shard(self, i: int) -> ShardFile:
        return ShardFile(safe_member(self.dir, self.shards[i]["file"]))

    def to_float(self, data: torch.Tensor) -> torch.Tensor:
        """Stored data -> float images in [-1, 1]."""
        return data.float() * (2.0 / self.levels) - 1.0 if self.data_uint8 else data.float()


class PairReader:
    """Iterates a cache as (noise, data, label) rows for process `rank` of `world`, epoch by epoch."""

    def __init__(
        self, cache: PairCache, seed: int = 0, rank: int = 0, world: int = 1, window: int = 2, chunk: int = 4096
    ):
        if not 0 <= rank < world:
            raise NFMError(f"rank {rank} is not in [0, {world})")
        self.cache, self.seed, self.rank, self.world, self.window = cache, seed, rank, world, max(1, window)
        self.chunk = chunk  # rows converted to float at a time

    def _windows(self, epoch: int) -> list[list[int]]:
        order = torch.randperm(
            len(self.cache.shards), generator=torch.Generator().manual_seed(derive_seed(self.seed, "shards", epoch))
        ).tolist()
        return [order[i : i + self.window] for i in range(0, len(order), self.window)]

    def _mine(self, n: int) -> int:
        """How many of a window's n rows this rank takes."""
        return len(range(self.rank, n, self.world))

    def rows_per_epoch(self, epoch: int = 0) -> int:
        return sum(self._mine(sum(self.cache.shards[i]["rows"] for i in w)) for w in self._windows(epoch))

    def _read_window(self, window: list[int]) -> dict[str, torch.Tensor]:
        """The window's shards, column by column, read straight into one buffer per column."""
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

    def iter_epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yields this rank's rows of one epoch as float chunks (noise, data, label, index) of at most
        `self.chunk` rows, after skipping `skip` rows. Memory: one window in stored dtypes, plus one chunk."""
        for w_i, window in enumerate(self._windows(epoch)):
            n = sum(self.cache.shards[i]["rows"] for i in window)
            mine = self._mine(n)
            if skip >= mine:  # resume: skip whole windows without reading them
                skip -= mine
                continue
            cols = self._read_window(window)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch, w_i)))
            take = perm[self.rank :: self.world][skip:]
            skip = 0
            for i in range(0, len(take), self.chunk):
                idx = take[i : i + self.chunk]
                yield (
                    cols["noise"][idx].float(),
                    self.cache.to_float(cols["data"][idx]),
                    cols["label"][idx],
                    cols["index"][idx],
                )
            del cols

    def batches(self, batch_size: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """An endless stream of (noise, data, label) batches of this rank, crossing epochs;
        `start` = batches already consumed (resume)."""
        if self.rows_per_epoch() == 0:
            raise NFMError(f"pair cache {self.cache.dir} gives rank {self.rank} no rows")
        epoch, skip = 0, start * batch_size
        while skip >= (n := self.rows_per_epoch(epoch)):
            skip -= n
            epoch += 1
        left: list[torch.Tensor] | None = None
        while True:
            for chunk in self.iter_epoch(epoch, skip):
                cols = list(chunk[:3]) if left is None else [torch.cat([a, b]) for a, b in zip(left, chunk[:3])]
                full = len(cols[0]) // batch_size * batch_size
                for i in range(0, full, batch_size):
                    yield cols[0][i : i + batch_size], cols[1][i : i + batch_size], cols[2][i : i + batch_size]
                left = [c[full:] for c in cols]
            skip = 0
            epoch += 1
