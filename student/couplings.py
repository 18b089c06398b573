"""Couplings: how noise z is paired with data x for flow matching. One interface, three choices.

    nfm            (z, x) read from a teacher's pair cache: z = teacher.encode(x + eta*eps) / sigma_f
    independent    z ~ N(0, I) drawn fresh for each data batch (I-CFM)
    minibatch-ot   z ~ N(0, I), re-paired to the batch by an exact assignment minimising
                   sum_i |x_i - z_pi(i)|^2 (OT-CFM; scipy's linear_sum_assignment; a permutation of the
                   whole batch). With labels it is solved within each class: a global assignment would
                   hand each class only the part of noise space nearest to it, and a class-conditional
                   sampler that starts from N(0, I) would then start off its training distribution.
                   The assignment runs per process and micro-batch.

A coupling gives the trainer a batch stream (CPU tensors, this process's rows) and turns each
batch into (z, x, y) on the device inside the loss. Labels stay with their data points.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from nfm.pairs.reader import PairCache, PairReader
from nfm.pipeline.core.batches import BatchStream, dataset_batches
from nfm.pipeline.core.config import one_of
from nfm.pipeline.core.data import ImageDataset
from nfm.pipeline.core.errors import NFMError
from nfm.pipeline.core.seeding import BatchRandom

CouplingName = Literal["nfm", "independent", "minibatch-ot"]
COUPLINGS: tuple[str, ...] = typing.get_args(CouplingName)


class Coupling:
    name: str
    image_shape: tuple[int, int, int]
    num_classes: int

    def stream(self, seed: int, end: int, num_workers: int = 0) -> BatchStream:
        raise NotImplementedError

    def couple(self, batch: tuple[torch.Tensor, ...], rng: BatchRandom) -> tuple[torch.Tensor, ...]:
        """(z, x, y) on the batch's device."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class PairCoupling(Coupling):
    """`nfm`: the teacher's pairs, read from a pair cache."""

    name = "nfm"

    def __init__(self, cache: PairCache, window: int = 2):
        self.cache, self.window = cache, window
        self.image_shape, self.num_classes = tuple(cache.image_shape), cache.num_classes

    def stream(self, seed: int, end: int, num_workers: int = 0) -> BatchStream:
        def batches(rank: int, world: int, per_process: int, start: int) -> Iterator[tuple[torch.Tensor, ...]]:
            reader = PairReader(self.cache, seed=seed, rank=rank, world=world, window=self.window)
            for noise, data, label, index in reader.batches(per_process, start):
                bad = ~(torch.isfinite(noise).flatten(1).all(1) & torch.isfinite(data).flatten(1).all(1))
                if bad.any():
                    raise NFMError(
                        f"pair cache {self.cache.key}: pairs of dataset rows {index[bad][:8].tolist()} "
                        f"hold NaN/Inf; run `nfm pairs verify {self.cache.key}` and rebuild the cache"
                    )
                yield noise, data, label

        return batches

    def couple(self, batch, rng):
        return batch

    def describe(self) -> str:
        return f"nfm: pair cache {self.cache.key} ({len(self.cache)} pairs, sigma_f {self.cache.sigma_f:.4f})"


class IndependentCoupling(Coupling):
    """`independent`: fresh standard-normal noise for every data batch."""

    name = "independent"

    def __init__(self, data: ImageDataset):
        self.data = data
        self.image_shape, self.num_classes = tuple(data.image_shape), data.num_classes

    def stream(self, seed: int, end: int, num_workers: int = 0) -> BatchStream:
        return dataset_batches(self.data, seed, end, num_workers)

    def couple(self, batch, rng):
        x, y = batch
        z = rng.randn(*x.shape[1:]).to(x.device, x.dtype)
        return z, x, y

    def describe(self) -> str:
        return f"{self.name}: {self.data.describe()}"


def ot_permutation(x: torch.Tensor, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """perm minimising sum_i |x_i - z_perm[i]|^2 over permutations (exact assignment). With labels y the
    assignment is made within each class, so the noise each class is trained on stays N(0, I)."""
    cost = torch.cdist(x.detach().flatten(1).double().cpu(), z.detach().flatten(1).double().cpu()).pow(2)
    n = cost.shape[0]
    groups = [torch.arange(n)] if y is None else [(y.cpu() == c).nonzero().flatten() for c in torch.unique(y.cpu())]
    perm = np.empty(n, dtype=np.int64)
    for idx in groups:
        rows, cols = linear_sum_assignment(cost[idx][:, idx].numpy())
        perm[idx[rows].numpy()] = idx[cols].numpy()
    return torch.from_numpy(perm)


class MinibatchOTCoupling(IndependentCoupling):
    """`minibatch-ot`: fresh noise, re-paired to the batch by exact optimal assignment (within each class
    when the data are labelled: a class-conditional velocity must see N(0, I) noise for every class)."""

    name = "minibatch-ot"

    def __init__(self, data: ImageDataset, per_class: bool = True):
        super().__init__(data)
        self.per_class = per_class and data.num_classes > 0

    def couple(self, batch, rng):
        z, x, y = super().couple(batch, rng)
        return z[ot_permutation(x, z, y if self.per_class else None).to(z.device)], x, y


def make_coupling(name: str, *, data: ImageDataset | None = None, cache: PairCache | None = None) -> Coupling:
    if one_of(name, CouplingName, "coupling") == "nfm":
        if cache is None:
            raise NFMError(
                "the nfm coupling needs a pair cache: set flow.pairs=KEY_OR_DIR "
                "(build one with `nfm pairs build --teacher RUN`)"
            )
        return PairCoupling(cache)
    if data is None:
        raise NFMError(f"the {name} coupling needs a data set (data=...)")
    return IndependentCoupling(data) if name == "independent" else MinibatchOTCoupling(data)
