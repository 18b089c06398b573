"""Couplings: how the source end z is paired with data x for flow matching. One interface, six choices.

    nfm            (z, x) read from a teacher's pair cache: z = teacher.encode(x + eta*eps) / sigma_f
    reflow         (z, x) read from a reflow pair cache: x = ODE_student(z) (`nfm pairs build --from-student`)
                   (both: flow.mix_independent = p replaces the noise of a fraction p of each batch's rows
                   with fresh N(0, I): a mixture of the paired and the independent coupling)
    independent    z drawn fresh from the source for each data batch (I-CFM)
    minibatch-ot   z re-paired to the batch by an exact assignment minimising sum_i |x_i - z_pi(i)|^2
                   (OT-CFM; scipy's linear_sum_assignment; a permutation of the whole batch)
    sb             (z, x) drawn from the batch's entropic OT plan, regularisation 2 sigma^2 (POT's Sinkhorn in
                   the log domain): Schrodinger-bridge CFM with the `bridge` path of the same sigma
    sd-ot          z ~ N(0, I) sent to the image whose Laguerre cell holds it, argmin_j |z - x_j|^2 - g_j over
                   the whole training set (semidiscrete OT, SD-FM; g fitted once, student.sdot)

The source (`flow.source`) is N(0, I) (`gaussian`) or a data set of the same image shape (`data:NAME`):
OT-CFM's couplings work from any source. With labels, minibatch-ot, sb and sd-ot pair within each class:
a global assignment would hand each class only the part of the source nearest to it, and a
class-conditional sampler that starts from the whole source would start off its training distribution.
The minibatch assignments run per process and micro-batch.

A coupling gives the trainer a batch stream (CPU tensors, this process's rows) and turns each
batch into (z, x, y) on the device inside the loss. Labels stay with their data points.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from nfm.core.batches import BatchStream, dataset_batches
from nfm.core.config import one_of
from nfm.core.data import DataConfig, ImageDataset, load_data
from nfm.core.errors import NFMError
from nfm.core.seeding import BatchRandom
from nfm.pairs.reader import PairCache, PairReader
from nfm.student.names import COUPLINGS, PAIRED, CouplingName  # noqa: F401 (re-exported)
from nfm.student.sdot import class_groups


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
    """`nfm`: the teacher's pairs, read from a pair cache; `mix` > 0: the rows of global batch index
    < round(mix * batch) take fresh N(0, I) noise instead of their pair's (the reader's batches are in random
    order, so these are a random subset of the pairs)."""

    name = "nfm"

    def __init__(self, cache: PairCache, window: int = 2, name: str = "nfm", mix: float = 0.0):
        if not 0.0 <= mix <= 1.0:
            raise NFMError(f"flow.mix_independent must be in [0, 1], got {mix}")
        self.cache, self.window, self.name, self.mix = cache, window, name, mix
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
        if self.mix <= 0:
            return batch
        z, x, y = batch
        fresh = rng.randn(*z.shape[1:]).to(z.device, z.dtype)
        rows = torch.arange(rng.offset, rng.offset + rng.n, device=z.device)
        independent = (rows < round(self.mix * rng.total)).view(-1, *([1] * (z.dim() - 1)))
        return torch.where(independent, fresh, z), x, y

    def describe(self) -> str:
        origin = "student" if self.cache.kind == "reflow" else "teacher"
        mix = f"; {self.mix:g} of each batch with fresh N(0, I) noise" if self.mix > 0 else ""
        foreign = self.cache.unchecked_origin
        warn = (
            f". WARNING: this cache came from {foreign} and is not checked against its teacher "
            f"(nfm pairs verify {self.cache.key[:8]} --teacher SPEC)"
            if foreign
            else ""
        )
        return (
            f"{self.name}: pair cache {self.cache.key} ({len(self.cache)} pairs from a {origin}, "
            f"sigma_f {self.cache.sigma_f:.4f}{mix}){warn}"
        )


class Source:
    """The t = 0 end: `draw` gives one z per row of a batch, from one draw of the batch's random numbers."""

    spec = "gaussian"

    def draw(self, rng: BatchRandom, like: torch.Tensor) -> torch.Tensor:
        return rng.randn(*like.shape[1:]).to(like.device, like.dtype)

    def describe(self) -> str:
        return "source N(0, I)"


class DataSource(Source):
    """A data set as the source: each row's z is a training image of it, chosen uniformly (with replacement)."""

    def __init__(self, spec: str, data: ImageDataset):
        self.spec, self.data = spec, data
        self.images = data.tensors()[0] if len(data) <= 200_000 else None

    def draw(self, rng: BatchRandom, like: torch.Tensor) -> torch.Tensor:
        rows = (rng.rand() * len(self.data)).long().clamp(max=len(self.data) - 1)
        z = self.images[rows] if self.images is not None else self.data.__getitems__(rows.tolist())[0]
        return z.to(like.device, like.dtype)

    def describe(self) -> str:
        return f"source {self.data.describe()}"


SOURCE_HELP = "flow.source is `gaussian` or `data:NAME` (digits, fashion-mnist, mnist-5k, a Hugging Face dataset)"


def source_data_config(spec: str, target: DataConfig) -> DataConfig | None:
    """The data config of a `data:NAME` source (target's size and channels, no labels); None for gaussian."""
    if spec == "gaussian":
        return None
    if not spec.startswith("data:") or not spec[5:]:
        raise NFMError(f"unknown source {spec!r}: {SOURCE_HELP}")
    return DataConfig(name=spec[5:], image_size=target.image_size, channels=target.channels, use_labels=False)


def make_source(spec: str, target: DataConfig, split: str = "train", shape: tuple[int, ...] | None = None) -> Source:
    cfg = source_data_config(spec, target)
    if cfg is None:
        return Source()
    data = load_data(cfg, split)
    if shape is not None and tuple(data.image_shape) != tuple(shape):
        raise NFMError(
            f"the source {spec} has {'x'.join(map(str, data.image_shape))} images but the data has "
            f"{'x'.join(map(str, shape))}: a source must have the data's image shape (set data.image_size / "
            "data.channels for Hugging Face sources)"
        )
    return DataSource(spec, data)


class IndependentCoupling(Coupling):
    """`independent`: a fresh source draw (standard normal by default) for every data batch."""

    name = "independent"

    def __init__(self, data: ImageDataset, source: Source | None = None):
        self.data, self.source = data, source or Source()
        self.image_shape, self.num_classes = tuple(data.image_shape), data.num_classes

    def stream(self, seed: int, end: int, num_workers: int = 0) -> BatchStream:
        return dataset_batches(self.data, seed, end, num_workers)

    def couple(self, batch, rng):
        x, y = batch
        return self.source.draw(rng, x), x, y

    def describe(self) -> str:
        return f"{self.name}: {self.data.describe()}; {self.source.describe()}"


def _sq_cost(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x.detach().flatten(1).double().cpu(), z.detach().flatten(1).double().cpu()).pow(2)


def ot_permutation(x: torch.Tensor, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """perm minimising sum_i |x_i - z_perm[i]|^2 over permutations (exact assignment). With labels y the
    assignment is made within each class, so the noise each class is trained on stays N(0, I)."""
    cost = _sq_cost(x, z)
    n = cost.shape[0]
    groups = class_groups(n, y)
    perm = np.empty(n, dtype=np.int64)
    for idx in groups:
        rows, cols = linear_sum_assignment(cost[idx][:, idx].numpy())
        perm[idx[rows].numpy()] = idx[cols].numpy()
    return torch.from_numpy(perm)


class MinibatchOTCoupling(IndependentCoupling):
    """`minibatch-ot`: fresh noise, re-paired to the batch by exact optimal assignment (within each class
    when the data are labelled: a class-conditional velocity must see N(0, I) noise for every class)."""

    name = "minibatch-ot"

    def __init__(self, data: ImageDataset, source: Source | None = None, per_class: bool = True):
        super().__init__(data, source)
        self.per_class = per_class and data.num_classes > 0

    def couple(self, batch, rng):
        z, x, y = super().couple(batch, rng)
        return z[ot_permutation(x, z, y if self.per_class else None).to(z.device)], x, y


def sinkhorn_plan(x: torch.Tensor, z: torch.Tensor, reg: float, iters: int = 1000, tol: float = 1e-6) -> torch.Tensor:
    """The entropic OT plan (n_x, n_z) between uniform masses on x and z for the cost |x - z|^2 and
    regularisation `reg`, float64: POT's Sinkhorn in the log domain, stable for costs far larger than reg but
    slow to converge there. It stops when the marginals are within `tol` (absolute) or after `iters`
    iterations; the x marginal is then exact and the z marginal within about 0.1 % at reg = cost / 300."""
    import warnings

    import ot

    cost = _sq_cost(x, z)
    a = torch.full((cost.shape[0],), 1.0 / cost.shape[0], dtype=torch.float64)
    b = torch.full((cost.shape[1],), 1.0 / cost.shape[1], dtype=torch.float64)
    with warnings.catch_warnings():  # "did not converge": the marginals are as good as stated above
        warnings.filterwarnings("ignore", "Sinkhorn did not converge")
        return ot.sinkhorn(a, b, cost, reg, method="sinkhorn_log", numItermax=iters, stopThr=tol)


def plan_pairs(plan: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of len(u) pairs drawn from a plan with replacement, by inverting its CDF at uniforms u."""
    cdf = torch.cumsum(plan.flatten(), 0)
    k = torch.searchsorted(cdf / cdf[-1], u.double().cpu().contiguous(), right=True).clamp(max=plan.numel() - 1)
    return k // plan.shape[1], k % plan.shape[1]


class SchrodingerBridgeCoupling(IndependentCoupling):
    """`sb`: pairs drawn from the batch's entropic OT plan with regularisation 2 sigma^2 (within each class
    when the data are labelled), as OT-CFM's SB-CFM; train it on the `bridge` path with the same sigma."""

    name = "sb"

    def __init__(self, data: ImageDataset, sigma: float, source: Source | None = None, per_class: bool = True):
        super().__init__(data, source)
        if not sigma > 0:
            raise NFMError(
                "the sb coupling draws pairs from an entropic plan with regularisation 2 * flow.sigma^2: set "
                "flow.sigma > 0 (with flow.path=bridge for Schrodinger-bridge CFM)"
            )
        self.sigma, self.per_class = sigma, per_class and data.num_classes > 0

    def couple(self, batch, rng):
        z, x, y = super().couple(batch, rng)
        u = rng.rand()  # one uniform per row picks its pair from the plan
        zi, xi = torch.empty(len(x), dtype=torch.long), torch.empty(len(x), dtype=torch.long)
        for idx in class_groups(len(x), y if self.per_class else None):
            plan = sinkhorn_plan(x[idx.to(x.device)], z[idx.to(z.device)], 2 * self.sigma**2)
            r, c = plan_pairs(plan, u[idx.to(u.device)])
            xi[idx], zi[idx] = idx[r], idx[c]
        xi, zi = xi.to(x.device), zi.to(x.device)
        return z[zi], x[xi], y[xi]

    def describe(self) -> str:
        return f"{super().describe()}; entropic plan, reg 2 sigma^2 = {2 * self.sigma**2:g}"


class SemidiscreteOTCoupling(IndependentCoupling):
    """`sd-ot`: fresh z ~ N(0, I) for each row, sent to the training image whose Laguerre cell holds it (weights
    g fitted once over the whole training set, per class when labelled; student.sdot). The data batch only
    gives the labels: each row's image is the one its noise is assigned to, within its class."""

    name = "sd-ot"

    def __init__(self, data: ImageDataset, g: torch.Tensor, meta: dict, chunk: int = 16384):
        super().__init__(data)
        images, labels = data.tensors()
        self.per_class = bool(meta.get("per_class"))
        self.flat = images.flatten(1)
        self.offset = self.flat.pow(2).sum(1).double() - g.double()  # |x_j|^2 - g_j
        self.groups = {
            int(c): idx
            for c, idx in zip(
                torch.unique(labels).tolist() if self.per_class else [-1],
                class_groups(len(labels), labels if self.per_class else None),
            )
        }
        self.meta, self.chunk = meta, chunk
        self._on: dict = {}

    def _device_tables(self, device: torch.device, dtype: torch.dtype):
        if device not in self._on:
            self._on[device] = (self.flat.to(device, dtype), self.offset.to(device, dtype))
        return self._on[device]

    def couple(self, batch, rng):
        from nfm.student.sdot import assign

        x, y = batch
        z = self.source.draw(rng, x)
        flat, offset = self._device_tables(x.device, x.dtype)
        rows = torch.empty(len(x), dtype=torch.long, device=x.device)
        keys = torch.unique(y).tolist() if self.per_class else [-1]
        for c in keys:
            sel = (y == c) if self.per_class else torch.ones_like(y, dtype=torch.bool)
            idx = self.groups.get(int(c))
            if idx is None:
                raise NFMError(f"sd-ot: label {c} has no fitted weights (classes {sorted(self.groups)})")
            idx = idx.to(x.device)
            rows[sel] = idx[assign(z[sel].flatten(1), flat[idx], offset[idx], self.chunk)]
        return z, flat[rows].view_as(x), y

    def describe(self) -> str:
        s = self.meta["shares"]
        return (
            f"sd-ot: {self.data.describe()}; semidiscrete OT weights {self.meta['key']} "
            f"({'per class' if self.per_class else 'global'}; share/mass max {s['max_over_mass']:.2f}, "
            f"min {s['min_over_mass']:.2f}, exact-fit floor {s['floor_max_over_mass']:.2f} / "
            f"{s['floor_min_over_mass']:.2f})"
        )


def make_coupling(
    name: str,
    *,
    data: ImageDataset | None = None,
    cache: PairCache | None = None,
    source: Source | None = None,
    sigma: float = 0.0,
    sdot: tuple[torch.Tensor, dict] | None = None,
    mix: float = 0.0,
) -> Coupling:
    if one_of(name, CouplingName, "coupling") not in PAIRED and mix > 0:
        raise NFMError(
            f"flow.mix_independent mixes independent noise into paired couplings (nfm, reflow); {name} has no "
            "pairs to mix: leave it at 0"
        )
    if name in PAIRED:
        if cache is None:
            build = "--teacher RUN" if name == "nfm" else "--from-student RUN"
            raise NFMError(
                f"the {name} coupling needs a pair cache: pass --pairs KEY_OR_DIR (flow.pairs=KEY_OR_DIR) "
                f"(build one with `nfm pairs build {build}`)"
            )
        return PairCoupling(cache, name=name, mix=mix)
    if data is None:
        raise NFMError(f"the {name} coupling needs a data set (data=...)")
    if name == "independent":
        return IndependentCoupling(data, source)
    if name == "minibatch-ot":
        return MinibatchOTCoupling(data, source)
    if name == "sb":
        return SchrodingerBridgeCoupling(data, sigma, source)
    if source is not None and source.spec != "gaussian":
        raise NFMError(
            f"sd-ot is semidiscrete OT from N(0, I): it has no data source; use minibatch-ot or sb from {source.spec}"
        )
    if sdot is None:
        raise NFMError("the sd-ot coupling needs its fitted weights (student.sdot.fit_sdot)")
    return SemidiscreteOTCoupling(data, *sdot)
