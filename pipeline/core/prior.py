"""The prior a model is sampled from: N(0, I), or a Gaussian fitted to the noise a student was trained on.

A flow-matching student trained on a teacher's pairs learns the map from the teacher's encodings of the data
to the data. Those encodings are close to N(0, I) as a whole but not per class (issue 25: per class their
means and covariances differ markedly), so a student sampled from N(0, I) starts from noise it was not
trained on. `FittedPrior` is one Gaussian per class and one pooled over every row:

    z = scale * (mean_c + L_c eps),   L_c L_c^T = Sigma_c,   c = the label (the pooled component for none / -1)

Sigma_c is the sample covariance shrunk towards a multiple of I by the oracle approximating shrinkage (OAS,
Chen et al. 2010, as scikit-learn computes it), which keeps it well conditioned where a class has fewer rows
than dimensions. The fit streams: `Moments` accumulates each group's count, sum and sum of outer products in
float64, so a fit over many shards holds one D x D matrix a class, never the rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nfm.pipeline.core.errors import NFMError
from nfm.pipeline.core.io import load_tensors, save_tensors

PRIOR_FORMAT = "nfm-prior"
MAX_FULL_BYTES = 2 << 30  # float64 second moments of every class above this: refuse (one D x D matrix a class)


@dataclass
class Moments:
    """Streaming float64 moments of G groups of D-dimensional rows: count, sum, sum of outer products."""

    count: torch.Tensor  # (G,)
    s1: torch.Tensor  # (G, D)
    s2: torch.Tensor  # (G, D, D)

    @classmethod
    def zeros(cls, groups: int, dim: int) -> Moments:
        need = groups * dim * dim * 8
        if need > MAX_FULL_BYTES:
            raise NFMError(
                f"a full-covariance prior of {groups} group(s) x {dim} dimensions needs {need / 2**30:.1f} GB of "
                f"float64 moments (more than {MAX_FULL_BYTES / 2**30:.0f} GB); fit it per_class=false or on "
                "smaller images"
            )
        z = torch.zeros
        return cls(
            z(groups, dtype=torch.float64),
            z(groups, dim, dtype=torch.float64),
            z(groups, dim, dim, dtype=torch.float64),
        )

    def add(self, x: torch.Tensor, group: torch.Tensor) -> None:
        """Rows x (n, D) of groups `group` (n,) in 0..G-1."""
        x = x.reshape(len(x), -1).double()
        for g in torch.unique(group).tolist():
            rows = x[group == g]
            self.count[g] += len(rows)
            self.s1[g] += rows.sum(0)
            self.s2[g] += rows.T @ rows

    def pool_last(self) -> None:
        """Make the last group every row of the others (the pooled component of a per-class fit)."""
        self.count[-1], self.s1[-1], self.s2[-1] = self.count[:-1].sum(), self.s1[:-1].sum(0), self.s2[:-1].sum(0)

    def state(self) -> dict[str, torch.Tensor]:
        return {"count": self.count, "s1": self.s1, "s2": self.s2}


def oas(cov: torch.Tensor, n: float) -> tuple[torch.Tensor, float]:
    """(shrunk covariance, shrinkage) of a maximum-likelihood covariance `cov` of n rows: OAS towards tr(cov)/D I."""
    d = cov.shape[-1]
    mu = float(torch.diagonal(cov).sum()) / d
    alpha = float(cov.pow(2).mean())
    den = (n + 1.0) * (alpha - mu * mu / d)
    rho = 1.0 if den <= 0 else min((alpha + mu * mu) / den, 1.0)
    out = (1.0 - rho) * cov
    out.diagonal().add_(rho * mu)
    return out, rho


def gaussian_stats(mean: torch.Tensor, cov: torch.Tensor, count: float, rho: float) -> dict[str, float]:
    """What a component is, against N(0, I): mean norm, the spread of its variances and eigenvalues, and
    KL(N(mean, cov) || N(0, I)) in nats."""
    eig = torch.linalg.eigvalsh(cov)
    var = torch.diagonal(cov)
    kl = 0.5 * float(var.sum() + mean.pow(2).sum() - len(mean) - torch.log(eig).sum())
    return {
        "rows": int(count),
        "mean_norm": round(float(mean.norm()), 4),
        "var_min": round(float(var.min()), 4),
        "var_max": round(float(var.max()), 4),
        "eig_min": round(float(eig.min()), 4),
        "eig_max": round(float(eig.max()), 4),
        "kl_to_standard": round(kl, 3),
        "shrinkage": round(rho, 5),
    }


@dataclass(frozen=True)
class FittedPrior:
    """One Gaussian per class (components 0..K-1) and one pooled over every row (component K; the only one
    when K = 0). `scale` multiplies the result: 1 for a student, the teacher's prior std x sigma_f for a
    teacher decoding from its own latent space."""

    mean: torch.Tensor  # (K + 1, D) float64
    chol: torch.Tensor  # (K + 1, D, D) float64, lower triangular
    shape: tuple[int, ...]  # one sample's shape (C, H, W)
    scale: torch.Tensor | float = 1.0

    @property
    def num_classes(self) -> int:
        return self.mean.shape[0] - 1

    @classmethod
    def from_moments(cls, m: Moments, shape: tuple[int, ...]) -> tuple[FittedPrior, list[dict[str, float]]]:
        """The fit: per group the mean and the OAS-shrunk covariance; the last group is every row pooled.
        Returns the prior and each component's statistics."""
        means, chols, stats = [], [], []
        for g in range(len(m.count)):
            n = float(m.count[g])
            if n < 2:
                raise NFMError(f"prior component {g} has {int(n)} row(s); a Gaussian needs at least 2")
            mean = m.s1[g] / n
            cov = m.s2[g] / n - torch.outer(mean, mean)
            cov = 0.5 * (cov + cov.T)
            shrunk, rho = oas(cov, n)
            chol, info = torch.linalg.cholesky_ex(shrunk)
            if int(info) != 0:
                raise NFMError(f"prior component {g}: the covariance is not positive definite (rows all equal?)")
            means.append(mean)
            chols.append(chol)
            stats.append(gaussian_stats(mean, shrunk, n, rho))
        return cls(torch.stack(means), torch.stack(chols), tuple(shape)), stats

    def scaled(self, scale: torch.Tensor | float) -> FittedPrior:
        return FittedPrior(self.mean, self.chol, self.shape, scale)

    def components(self, labels: torch.Tensor | None, n: int) -> torch.Tensor:
        """The component of each of n samples: its class, or the pooled one for no label or -1."""
        pooled = torch.full((n,), self.num_classes, dtype=torch.long)
        if labels is None or self.num_classes == 0:
            return pooled
        labels = labels.cpu().long()
        if int(labels.max()) >= self.num_classes:
            raise NFMError(f"label {int(labels.max())} is not a class of this prior (0..{self.num_classes - 1})")
        return torch.where(labels >= 0, labels, pooled)

    def transform(self, eps: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """z = scale * (mean_c + L_c eps) for eps (n, *shape) standard normal (float64 arithmetic, eps's dtype out)."""
        if tuple(eps.shape[1:]) != self.shape:
            raise NFMError(f"this prior is of samples {self.shape}, not {tuple(eps.shape[1:])}")
        c = self.components(labels, len(eps))
        e = eps.reshape(len(eps), -1).double()
        z = self.mean[c] + torch.einsum("nij,nj->ni", self.chol[c], e)
        return (z.reshape(eps.shape) * self.scale).to(eps.dtype)

    def log_prob(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """log density (n,) in nats of z (n, *shape) under the component of each label (float64 arithmetic)."""
        c = self.components(labels, len(z))
        scale = torch.as_tensor(self.scale, dtype=torch.float64).expand(self.shape).reshape(-1)
        u = z.reshape(len(z), -1).double().cpu() / scale - self.mean[c]
        w = torch.linalg.solve_triangular(self.chol[c], u.unsqueeze(-1), upper=False).squeeze(-1)
        logdet = torch.log(torch.diagonal(self.chol[c], dim1=-2, dim2=-1)).sum(-1) + torch.log(scale).sum()
        return (-0.5 * w.pow(2).sum(-1) - logdet - 0.5 * u.shape[1] * math.log(2 * math.pi)).to(z.device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "chol": self.chol, "shape": torch.tensor(self.shape)}

    def save(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        save_tensors(path, self.tensors(), metadata={"format": PRIOR_FORMAT, **(metadata or {})})

    @classmethod
    def load(cls, path: Path, what: str = "fitted prior") -> FittedPrior:
        """A prior saved by `save`, its tensors checked for shape and finiteness (the caller checks the checksum)."""
        t = load_tensors(path, what)
        bad = None
        if set(t) != {"mean", "chol", "shape"}:
            bad = f"it holds {sorted(t)}, not mean, chol and shape"
        else:
            shape = tuple(int(s) for s in t["shape"].tolist())
            d, k = math.prod(shape), t["mean"].shape[0]
            if t["mean"].shape != (k, d) or t["chol"].shape != (k, d, d) or k < 1:
                bad = f"its tensors are {tuple(t['mean'].shape)} and {tuple(t['chol'].shape)} for samples {shape}"
            elif not (torch.isfinite(t["mean"]).all() and torch.isfinite(t["chol"]).all()):
                bad = "it holds NaN/Inf"
        if bad:
            raise NFMError(f"{what} {path} is corrupt ({bad}); delete it and it is fitted again")
        return cls(t["mean"].double(), t["chol"].double(), shape)


def describe(stats: list[dict[str, Any]]) -> str:
    """One line for a prior's components: their KL to N(0, I) and the range of their covariance eigenvalues."""
    per = stats[:-1] or stats
    kl = [s["kl_to_standard"] for s in per]
    return (
        f"{len(per)} class component(s): KL to N(0, I) {min(kl):.1f}-{max(kl):.1f} nats, mean norm "
        f"{min(s['mean_norm'] for s in per):.2f}-{max(s['mean_norm'] for s in per):.2f}, covariance eigenvalues "
        f"{min(s['eig_min'] for s in per):.3f}-{max(s['eig_max'] for s in per):.2f}; pooled: KL "
        f"{stats[-1]['kl_to_standard']:.1f} nats"
    )
