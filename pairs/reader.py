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

    def __init__(self, cache: PairCache, seed: int = 0, rank: int = 0, world: int = 1, window: int = 2):
        if not 0 <= rank < world:
            raise NFMError(f"rank {rank} is not in [0, {world})")
        self.cache, self.seed, self.rank, self.world, self.window = cache, seed, rank, world, max(1, window)

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

    def iter_epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yields this rank's chunks (noise, data, label, index) of one epoch, after skipping `skip` rows."""
        for w_i, window in enumerate(self._windows(epoch)):
            n = sum(self.cache.shards[i]["rows"] for i in window)
            mine = self._mine(n)
            if skip >= mine:  # resume: skip whole windows without reading them
                skip -= mine
                continue
            parts = [self.cache.shard(i) for i in window]
            cols = {k: torch.cat([p.read(k) for p in parts]) for k in ("noise", "data", "label", "index")}
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch, w_i)))
            take = perm[self.rank :: self.world][skip:]
            skip = 0
            yield (
                cols["noise"][take].float(),
                self.cache.to_float(cols["data"][take]),
                cols["label"][take],
                cols["index"][take],
            )

    def batches(self, batch_size: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """An endless stream of (noise, data, label) batches of this rank, crossing epochs;
        `start` = batches already consumed (resume)."""
        per_epoch = self.rows_per_epoch()
        if per_epoch == 0:
            raise NFMError(f"pair cache {self.cache.dir} gives rank {self.rank} no rows")
        consumed = start * batch_size
        epoch, skip = 0, consumed
        while skip >= (n := self.rows_per_epoch(epoch)):
            skip -= n
            epoch += 1
        bufs: list[list[torch.Tensor]] = [[], [], []]
        have = 0
        while True:
            for chunk in self.iter_epoch(epoch, skip):
                for j in range(3):
                    bufs[j].append(chunk[j])
                have += len(chunk[0])
                while have >= batch_size:
                    cat = [torch.cat(b) for b in bufs]
                    yield cat[0][:batch_size], cat[1][:batch_size], cat[2][:batch_size]
                    bufs, have = [[c[batch_size:]] for c in cat], have - batch_size
            skip = 0
            epoch += 1
