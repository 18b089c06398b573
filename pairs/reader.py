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

from nfm.core.errors import NFMError
from nfm.core.seeding import derive_seed
from nfm.pairs.format import (
    FLOW_KINDS,
    ShardFile,
    check_index,
    check_key,
    columns_of,
    read_index,
    read_origin,
    require_kind,
    safe_member,
)
from nfm.pairs.format import logits_column as logits_column  # the student's door to a logit cache's column


class PairCache:
    """A complete pair cache of one of the `kinds` the reader accepts (pairs.format.KINDS; default: the noise/data
    pairs a flow student trains on): its index, shards and row counts. Validates before any read."""

    def __init__(self, cache_dir: str | Path, *, kinds: tuple[str, ...] = FLOW_KINDS, reader: str = "this reader"):
        self.dir = Path(cache_dir)
        self.index: dict[str, Any] = read_index(self.dir)
        self.kind = require_kind(self.dir, self.index, kinds, reader)
        check_key(self.dir, self.index)  # its key is its key fields' hash, and its directory's name
        if not self.index.get("complete"):
            have, want = len(self.index.get("shards", [])), self.index.get("num_shards", "?")
            raise NFMError(
                f"pair cache {self.dir} is incomplete ({have} of {want} shards): rerun `nfm pairs build` "
                "with the same arguments to finish it"
            )
        self.shards = self.index["shards"]
        problems = check_index(self.dir, self.index)  # names, symlinks, sizes, rows, dtypes, shapes, totals
        if problems:
            raise NFMError(
                f"pair cache {self.dir} does not match its index: {'; '.join(problems[:3])}. Run `nfm pairs "
                f"verify {self.key}`, or rebuild it (`nfm pairs rm {self.key}`, then `nfm pairs build`)"
            )
        self.sigma_f = float(self.index["sigma_f"]) if "sigma_f" in self.index else None  # a logit cache: none
        self.levels = int(self.index["data"]["levels"])
        self.data_uint8 = self.index["dtypes"]["data"] == "uint8"

    @property
    def key(self) -> str:
        return self.index["key"]

    @property
    def unchecked_origin(self) -> str | None:
        """Where a pulled cache came from while it is not yet checked against its teacher (None: built here, or
        checked): its bytes match its index, but nothing shows the pairs are the named teacher's."""
        origin = read_origin(self.dir)
        return None if origin is None or origin.get("verified") else str(origin.get("source"))

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns of its shards (pairs.format.KIND_COLUMNS): noise, data, label, index, view; a logit
        cache's logits first where a flow cache has its noise."""
        return columns_of(self.index)

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
    """Batches of a pair cache for process `rank` of `world`.

    One global stream per seed: epoch e visits the shards in an order seeded by (seed, e), `window`
    shards at a time, with the rows of each window permuted by (seed, e, window). The stream is cut
    into global batches of batch_size * world rows, and process r takes rows
    [r * batch_size, (r + 1) * batch_size) of each. So the processes together read every row exactly
    once per epoch of the stream, and N processes see exactly the global batches that one process
    with the global batch size sees. Memory holds one window in its stored dtypes.
    """

    def __init__(
        self, cache: PairCache, seed: int = 0, rank: int = 0, world: int = 1, window: int = 2, chunk: int = 4096
    ):
        if not 0 <= rank < world:
            raise NFMError(f"rank {rank} is not in [0, {world})")
        if len(cache) == 0:
            raise NFMError(f"pair cache {cache.dir} holds no pairs")
        self.cache, self.seed, self.rank, self.world, self.window = cache, seed, rank, world, max(1, window)
        self.chunk = chunk  # rows handed on at a time

    def _windows(self, epoch: int) -> list[list[int]]:
        order = torch.randperm(
            len(self.cache.shards), generator=torch.Generator().manual_seed(derive_seed(self.seed, "shards", epoch))
        ).tolist()
        return [order[i : i + self.window] for i in range(0, len(order), self.window)]

    def _read_window(self, window: list[int]) -> dict[str, torch.Tensor]:
        """The window's shards, each read once straight into one buffer per column, hashed as it is read and
        checked against its checksum in the index before the window is used (memory: the window)."""
        parts = [self.cache.shard(i) for i in window]
        n = sum(p.rows for p in parts)
        cols = {
            k: torch.from_numpy(np.empty((n, *parts[0].tensors[k][1][1:]), dtype=parts[0].tensors[k][0]))
            for k in ("noise", "data", "label", "index")
        }
        a = 0
        for i, p in zip(window, parts):  # a shard's rows reach no batch before its checksum matched
            p.read_verified(self.cache.shards[i], {k: out[a : a + p.rows] for k, out in cols.items()})
            a += p.rows
        return cols

    def iter_epoch(self, epoch: int, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The global stream of one epoch in chunks of at most `chunk` rows (stored dtypes), after
        skipping `skip` rows; windows wholly skipped are not read."""
        for w_i, window in enumerate(self._windows(epoch)):
            n = sum(self.cache.shards[i]["rows"] for i in window)
            if skip >= n:
                skip -= n
                continue
            cols = self._read_window(window)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch, w_i)))
            perm = perm[skip:]
            skip = 0
            for i in range(0, len(perm), self.chunk):
                idx = perm[i : i + self.chunk]
                yield {k: v[idx] for k, v in cols.items()}
            del cols

    def batches(self, batch_size: int, start: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """Endless (noise, data, label, index) batches of this process (floats in [-1, 1] for the
        images), crossing epochs; `start` = steps already taken (resume)."""
        total = len(self.cache)
        glob = batch_size * self.world
        epoch, skip = divmod(start * glob, total)
        lo, hi = self.rank * batch_size, (self.rank + 1) * batch_size
        left: dict[str, torch.Tensor] | None = None
        while True:
            for chunk in self.iter_epoch(epoch, skip):
                cols = chunk if left is None else {k: torch.cat([left[k], chunk[k]]) for k in chunk}
                full = len(cols["label"]) // glob * glob
                for i in range(0, full, glob):
                    yield (
                        cols["noise"][i + lo : i + hi].float(),
                        self.cache.to_float(cols["data"][i + lo : i + hi]),
                        cols["label"][i + lo : i + hi],
                        cols["index"][i + lo : i + hi],
                    )
                left = {k: v[full:] for k, v in cols.items()}
            skip = 0
            epoch += 1
