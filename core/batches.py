"""The batch stream of a map-style data set: step s reads the rows that (seed, s) choose.

Epochs are seeded permutations of the rows, concatenated into one stream; process r takes its
slice of each global batch. So the stream resumes at any step and N processes together see the
global batches of one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from nfm.core.errors import NFMError
from nfm.core.seeding import derive_seed

# (rank, world, per-process batch, first step) -> this process's batches for that step and the next ones
BatchStream = Callable[[int, int, int, int], Iterator[tuple[torch.Tensor, ...]]]


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields, for steps start..end-1, this process's rows of the global batch of that step."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int, world: int, start: int, end: int):
        self.n, self.batch, self.seed, self.rank, self.world = n, global_batch, seed, rank, world
        self.start, self.end = start, end
        self._perm: tuple[int, torch.Tensor] | None = None

    def epoch_perm(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def global_rows(self, step: int) -> torch.Tensor:
        start, out = step * self.batch, []
        while sum(len(o) for o in out) < self.batch:
            pos = start + sum(len(o) for o in out)
            epoch, off = divmod(pos, self.n)
            out.append(self.epoch_perm(epoch)[off : off + self.batch - sum(len(o) for o in out)])
        return torch.cat(out)

    def __iter__(self):
        per = self.batch // self.world
        for s in range(self.start, self.end):
            yield self.global_rows(s)[self.rank * per : (self.rank + 1) * per].tolist()

    def __len__(self) -> int:
        return max(0, self.end - self.start)


class _RowTagged(torch.utils.data.Dataset):
    """Prepends the row indices to each fetched batch, so bad rows can be named."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, rows: list[int]):
        return (torch.as_tensor(rows), *self.ds.__getitems__(rows))


def collate_batch(batch):
    """The DataLoader's collate_fn: `__getitems__` already returns a batch. A module-level function, not a
    lambda, so that workers started by spawn / forkserver (macOS, Windows, Python 3.14) can pickle it."""
    return batch


def check_finite(rows: torch.Tensor, batch: tuple[torch.Tensor, ...], what: str) -> None:
    for t in batch:
        if t.is_floating_point():
            bad = ~torch.isfinite(t).flatten(1).all(dim=1)
            if bad.any():
                raise NFMError(
                    f"{what}: rows {rows[bad][:8].tolist()} contain NaN or Inf "
                    f"({int(bad.sum())} in this batch); clean or drop them"
                )


def dataset_batches(
    dataset: torch.utils.data.Dataset,
    seed: int,
    end: int,
    num_workers: int = 0,
    multiprocessing_context: str | None = None,
) -> BatchStream:
    """Batches of a map-style data set (``__getitems__``): step s reads the rows that StepBatchSampler
    gives (seed, s), so the stream resumes at any step; rows with NaN/Inf are named."""

    def stream(rank: int, world: int, per_process: int, start: int) -> Iterator[tuple[torch.Tensor, ...]]:
        sampler = StepBatchSampler(len(dataset), per_process * world, seed, rank, world, start, end)
        loader = torch.utils.data.DataLoader(
            _RowTagged(dataset),
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=collate_batch,
            multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
        )
        for rows, *batch in loader:
            check_finite(rows, batch, f"training data ({getattr(dataset, 'name', 'dataset')})")
            yield tuple(batch)

    return stream
