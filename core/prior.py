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

Where a D x D matrix a class is too large (3 x 64 x 64 images: 1.2 GB a class), `LowRankPrior` is the Gaussian
of the top `rank` principal directions plus a diagonal:

    Sigma_c = W_c W_c^T + diag(psi_c),   W_c: D x rank

fitted from a streamed randomized range finder (Halko, Martinsson & Tropp 2011) in two passes over the rows
(`Sketch`): the first accumulates count, sum, sum of squares and Y = sum x (x^T Omega) for a fixed Gaussian
D x m Omega (m = rank + 10); an orthonormal basis Q of the centred C Omega spans C's leading directions; the
second accumulates F = C Q, and the Nystrom approximation F (Q^T F)^-1 F^T of C (as accurate as a power
iteration) gives W, its top `rank` eigenpairs; psi is the rest of C's diagonal, so Sigma_c keeps every variance.
It holds O(D m) numbers a class, samples exactly in O(D rank) (a symmetric square root, below) and evaluates its
density by Woodbury's identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from nfm.core.errors import NFMError
from nfm.core.io import load_tensors, save_tensors

PRIOR_FORMAT = "nfm-prior"
MAX_FULL_BYTES = 2 << 30  # float64 second moments of every class above this: refuse (one D x D matrix a class)
OVERSAMPLE = 10  # the range finder's extra columns: m = rank + OVERSAMPLE
PSI_FLOOR = 1e-3  # the diagonal psi at least this times the mean variance (keeps Sigma positive definite)


def full_fits(groups: int, dim: int) -> bool:
    """Whether the full-covariance moments of `groups` groups of `dim` dimensions fit in MAX_FULL_BYTES."""
    return groups * dim * dim * 8 <= MAX_FULL_BYTES


@dataclass
class Moments:
    """Streaming float64 moments of G groups of D-dimensional rows: count, sum, sum of outer products."""

    count: torch.Tensor  # (G,)
    s1: torch.Tensor  # (G, D)
    s2: torch.Tensor  # (G, D, D)

    @classmethod
    def zeros(cls, groups: int, dim: int) -> Moments:
        if not full_fits(groups, dim):
            raise NFMError(
                f"a full-covariance prior of {groups} group(s) x {dim} dimensions needs "
                f"{groups * dim * dim * 8 / 2**30:.1f} GB of float64 moments (more than {MAX_FULL_BYTES / 2**30:.0f} "
                "GB); fit the low-rank + diagonal model (`nfm pairs prior KEY --model lowrank`; the default, auto, "
                "chooses it for such caches)"
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
        """Add every other group's rows to the last one (the pooled component of a per-class fit: its own rows,
        those of no class, and every class's). Call it once, after the last `add`."""
        self.count[-1] += self.count[:-1].sum()
        self.s1[-1] += self.s1[:-1].sum(0)
        self.s2[-1] += self.s2[:-1].sum(0)

    def state(self) -> dict[str, torch.Tensor]:
        return {"count": self.count, "s1": self.s1, "s2": self.s2}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in self.state().items():
            v.copy_(state[k])


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


class PriorBase:
    """What every fitted prior shares: one Gaussian per class (components 0..K-1) and one pooled over every row
    (component K; the only one when K = 0), `mean` (K + 1, D) float64, the sample `shape`, and `scale`, which
    multiplies the result: 1 for a student, the teacher's prior std x sigma_f for a teacher decoding from its own
    latent space. Subclasses give `transform`, `log_prob` and `tensors`."""

    mean: torch.Tensor
    shape: tuple[int, ...]
    scale: torch.Tensor | float

    @property
    def num_classes(self) -> int:
        return self.mean.shape[0] - 1

    def scaled(self, scale: torch.Tensor | float) -> PriorBase:
        return replace(self, scale=scale)

    def components(self, labels: torch.Tensor | None, n: int) -> torch.Tensor:
        """The component of each of n samples: its class, or the pooled one for no label or -1."""
        pooled = torch.full((n,), self.num_classes, dtype=torch.long)
        if labels is None or self.num_classes == 0:
            return pooled
        labels = labels.cpu().long()
        if int(labels.max()) >= self.num_classes:
            raise NFMError(f"label {int(labels.max())} is not a class of this prior (0..{self.num_classes - 1})")
        return torch.where(labels >= 0, labels, pooled)

    def _check_shape(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != self.shape:
            raise NFMError(f"this prior is of samples {self.shape}, not {tuple(x.shape[1:])}")

    def _scale_vector(self) -> torch.Tensor:
        return torch.as_tensor(self.scale, dtype=torch.float64).cpu().expand(self.shape).reshape(-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def save(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        save_tensors(path, self.tensors(), metadata={"format": PRIOR_FORMAT, **(metadata or {})})


@dataclass(frozen=True)
class FittedPrior(PriorBase):
    """The full-covariance Gaussian per class: Sigma_c = L_c L_c^T."""

    mean: torch.Tensor  # (K + 1, D) float64
    chol: torch.Tensor  # (K + 1, D, D) float64, lower triangular
    shape: tuple[int, ...]  # one sample's shape (C, H, W)
    scale: torch.Tensor | float = 1.0

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

    def transform(self, eps: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """z = scale * (mean_c + L_c eps) for eps (n, *shape) standard normal (float64 arithmetic, eps's dtype out)."""
        self._check_shape(eps)
        c = self.components(labels, len(eps))
        e = eps.reshape(len(eps), -1).double()
        z = self.mean[c] + torch.einsum("nij,nj->ni", self.chol[c], e)
        return (z.reshape(eps.shape) * self.scale).to(eps.dtype)

    def log_prob(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """log density (n,) in nats of z (n, *shape) under the component of each label (float64 arithmetic)."""
        c = self.components(labels, len(z))
        scale = self._scale_vector()
        u = z.reshape(len(z), -1).double().cpu() / scale - self.mean[c]
        w = torch.linalg.solve_triangular(self.chol[c], u.unsqueeze(-1), upper=False).squeeze(-1)
        logdet = torch.log(torch.diagonal(self.chol[c], dim1=-2, dim2=-1)).sum(-1) + torch.log(scale).sum()
        return (-0.5 * w.pow(2).sum(-1) - logdet - 0.5 * u.shape[1] * math.log(2 * math.pi)).to(z.device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "chol": self.chol, "shape": torch.tensor(self.shape)}


@dataclass
class Sketch:
    """Streaming float64 statistics of G groups of D-dimensional rows for a low-rank + diagonal fit, in two
    passes over the same rows (module docstring): pass 0 adds count, sum, sum of squares and Y = sum x (x^T Omega);
    pass 1 adds F = sum x (x^T Q), Q the orthonormal basis `basis()` makes of pass 0's range estimate."""

    count: torch.Tensor  # (G,)
    s1: torch.Tensor  # (G, D)
    sq: torch.Tensor  # (G, D)
    y: torch.Tensor  # (G, D, m)
    f: torch.Tensor  # (G, D, m)
    stage: torch.Tensor  # () the pass being accumulated: 0 or 1
    q: torch.Tensor | None = None  # (G, D, m) pass 1's basis, made from pass 0's sums

    @classmethod
    def zeros(cls, groups: int, dim: int, rank: int) -> Sketch:
        m = min(rank + OVERSAMPLE, dim)
        if groups * dim * m * 8 * 3 > MAX_FULL_BYTES:  # y, f and the basis
            raise NFMError(
                f"a rank-{rank} prior of {groups} group(s) x {dim} dimensions needs "
                f"{groups * dim * m * 24 / 2**30:.1f} GB of float64 sketches; fit it per_class=false or at a lower rank"
            )
        z = torch.zeros
        f64 = torch.float64
        return cls(z(groups, dtype=f64), z(groups, dim, dtype=f64), z(groups, dim, dtype=f64),
                   z(groups, dim, m, dtype=f64), z(groups, dim, m, dtype=f64), torch.tensor(0))  # fmt: skip

    @staticmethod
    def omega(dim: int, m: int) -> torch.Tensor:
        """The range finder's test matrix: fixed, so a fit's result depends on its rows only."""
        return torch.randn(dim, m, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def basis(self) -> torch.Tensor:
        """Q (G, D, m): an orthonormal basis of C Omega, C each group's centred covariance (from pass 0's sums)."""
        n = self.count.clamp_min(1)[:, None]
        mean = self.s1 / n
        om = self.omega(self.s1.shape[1], self.y.shape[2])
        c_omega = self.y / n[:, :, None] - mean[:, :, None] * (mean @ om)[:, None, :]
        return torch.linalg.qr(c_omega).Q

    def start_second_pass(self) -> None:
        self.stage.fill_(1)
        self.q = self.basis()

    def add(self, x: torch.Tensor, group: torch.Tensor) -> None:
        """Rows x (n, D) of groups `group` (n,) in 0..G-1, to the pass being accumulated."""
        x = x.reshape(len(x), -1).double()
        om = self.omega(x.shape[1], self.y.shape[2]) if int(self.stage) == 0 else None
        for g in torch.unique(group).tolist():
            rows = x[group == g]
            if om is not None:
                self.count[g] += len(rows)
                self.s1[g] += rows.sum(0)
                self.sq[g] += rows.pow(2).sum(0)
                self.y[g] += rows.T @ (rows @ om)
            else:
                self.f[g] += rows.T @ (rows @ self.q[g])

    def state(self) -> dict[str, torch.Tensor]:
        return {"count": self.count, "s1": self.s1, "sq": self.sq, "y": self.y, "f": self.f, "stage": self.stage}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in self.state().items():
            v.copy_(state[k])
        if int(self.stage) == 1:
            self.q = self.basis()


@dataclass(frozen=True)
class LowRankPrior(PriorBase):
    """The low-rank + diagonal Gaussian per class, Sigma_c = W_c W_c^T + diag(psi_c), stored as
    Sigma_c = D_c^1/2 (I + U_c diag(s_c^2) U_c^T) D_c^1/2 with D_c = diag(psi_c) and U_c s_c the thin SVD of
    D_c^-1/2 W_c. Its symmetric square root is D_c^1/2 (I + U_c diag(sqrt(1 + s_c^2) - 1) U_c^T): sampling and
    the density are O(D rank)."""

    mean: torch.Tensor  # (K + 1, D) float64
    sqrt_psi: torch.Tensor  # (K + 1, D) float64, positive
    basis: torch.Tensor  # (K + 1, D, r) float64, orthonormal columns
    s: torch.Tensor  # (K + 1, r) float64, >= 0
    shape: tuple[int, ...]
    scale: torch.Tensor | float = 1.0

    @property
    def rank(self) -> int:
        return self.basis.shape[2]

    @classmethod
    def from_sketch(cls, sk: Sketch, shape: tuple[int, ...], rank: int) -> tuple[LowRankPrior, list[dict[str, float]]]:
        """The fit: per group the mean, the top `rank` eigenpairs of C's Nystrom approximation, and psi the rest of
        C's diagonal (at least PSI_FLOOR x the mean variance). Returns the prior and each component's statistics
        (eig_min: the smallest psi, a lower bound on Sigma's smallest eigenvalue; eig_max: Sigma's Rayleigh
        quotient along C's top direction, a lower bound on its largest)."""
        means, roots, bases, ss, stats = [], [], [], [], []
        q = sk.basis()
        for g in range(len(sk.count)):
            n = float(sk.count[g])
            if n < 2:
                raise NFMError(f"prior component {g} has {int(n)} row(s); a Gaussian needs at least 2")
            mean = sk.s1[g] / n
            var = (sk.sq[g] / n - mean.pow(2)).clamp_min(0)
            if not float(var.mean()) > 0:
                raise NFMError(f"prior component {g}: the rows are all equal (zero variance)")
            f = sk.f[g] / n - torch.outer(mean, q[g].T @ mean)  # C Q
            b = q[g].T @ f  # Q^T C Q
            ev, v = torch.linalg.eigh(0.5 * (b + b.T))
            keep = ev > ev.max() * 1e-12  # C Q (Q^T C Q)^-1/2 on Q^T C Q's range
            u, sv, _ = torch.linalg.svd(f @ (v[:, keep] / ev[keep].sqrt()), full_matrices=False)
            lam, u = sv[:rank].pow(2), u[:, :rank]  # (r,), (D, r): C's leading eigenpairs
            psi = (var - (u.pow(2) * lam).sum(1)).clamp_min(PSI_FLOOR * float(var.mean()))
            w_tilde = u * lam.sqrt() / psi.sqrt()[:, None]
            basis, sv, _ = torch.linalg.svd(w_tilde, full_matrices=False)
            means.append(mean), roots.append(psi.sqrt()), bases.append(basis), ss.append(sv)
            total = psi + (u.pow(2) * lam).sum(1)
            logdet = float(torch.log(psi).sum() + torch.log1p(sv.pow(2)).sum())
            kl = 0.5 * (float(total.sum() + mean.pow(2).sum()) - len(mean) - logdet)
            top = float(lam[0] + (u[:, 0].pow(2) * psi).sum())
            stats.append({"rows": int(n), "mean_norm": round(float(mean.norm()), 4),
                          "var_min": round(float(total.min()), 4), "var_max": round(float(total.max()), 4),
                          "eig_min": round(float(psi.min()), 4), "eig_max": round(top, 4),
                          "kl_to_standard": round(kl, 3), "shrinkage": 0.0, "rank": rank})  # fmt: skip
        return cls(torch.stack(means), torch.stack(roots), torch.stack(bases), torch.stack(ss), tuple(shape)), stats

    def transform(self, eps: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """z = scale * (mean_c + psi_c^1/2 (e + U_c ((sqrt(1 + s_c^2) - 1) U_c^T e))) for eps (n, *shape) standard
        normal: z's covariance is Sigma_c exactly (float64 arithmetic, eps's dtype out)."""
        self._check_shape(eps)
        c = self.components(labels, len(eps))
        e = eps.reshape(len(eps), -1).double().cpu()
        z = torch.empty_like(e)
        for g in torch.unique(c).tolist():
            rows, u = c == g, self.basis[g]
            gain = (1 + self.s[g].pow(2)).sqrt() - 1
            eg = e[rows]
            z[rows] = self.mean[g] + self.sqrt_psi[g] * (eg + ((eg @ u) * gain) @ u.T)
        return (z.reshape(eps.shape) * self._scale_vector().reshape(self.shape)).to(eps.device, eps.dtype)

    def log_prob(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """log density (n,) in nats of z (n, *shape) under the component of each label, by Woodbury's identity."""
        c = self.components(labels, len(z))
        scale = self._scale_vector()
        x = z.reshape(len(z), -1).double().cpu() / scale
        out = torch.empty(len(z), dtype=torch.float64)
        for g in torch.unique(c).tolist():
            rows = c == g
            w = (x[rows] - self.mean[g]) / self.sqrt_psi[g]
            s2 = self.s[g].pow(2)
            maha = w.pow(2).sum(1) - ((w @ self.basis[g]).pow(2) * (s2 / (1 + s2))).sum(1)
            logdet = 2 * torch.log(self.sqrt_psi[g]).sum() + torch.log1p(s2).sum() + 2 * torch.log(scale).sum()
            out[rows] = -0.5 * (maha + logdet + x.shape[1] * math.log(2 * math.pi))
        return out.to(z.device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "sqrt_psi": self.sqrt_psi, "basis": self.basis, "s": self.s,
                "shape": torch.tensor(self.shape)}  # fmt: skip


Prior = FittedPrior | LowRankPrior


def load_prior_file(path: Path, what: str = "fitted prior") -> Prior:
    """A prior saved by `save` (either model, told by its tensors), checked for shapes and finiteness (the caller
    checks the checksum)."""
    t = load_tensors(path, what)
    bad, out = None, None
    if set(t) == {"mean", "chol", "shape"}:
        want = {"mean": ("k", "d"), "chol": ("k", "d", "d")}
    elif set(t) == {"mean", "sqrt_psi", "basis", "s", "shape"}:
        want = {"mean": ("k", "d"), "sqrt_psi": ("k", "d"), "basis": ("k", "d", "r"), "s": ("k", "r")}
    else:
        want, bad = {}, f"it holds {sorted(t)}, not the tensors of a full or a low-rank Gaussian"
    if want:
        shape = tuple(int(v) for v in t["shape"].tolist())
        k, d = t["mean"].shape[0], math.prod(shape)
        r = t["s"].shape[-1] if "s" in t else 0
        sizes = {"k": k, "d": d, "r": r}
        if k < 1 or any(tuple(t[n].shape) != tuple(sizes[a] for a in axes) for n, axes in want.items()):
            bad = f"its tensors are {', '.join(f'{n} {tuple(t[n].shape)}' for n in want)} for samples {shape}"
        elif not all(torch.isfinite(t[n]).all() for n in want):
            bad = "it holds NaN/Inf"
        elif "chol" in t:
            out = FittedPrior(t["mean"].double(), t["chol"].double(), shape)
        else:
            out = LowRankPrior(*(t[n].double() for n in ("mean", "sqrt_psi", "basis", "s")), shape)
    if bad:
        raise NFMError(f"{what} {path} is corrupt ({bad}); delete it and it is fitted again")
    return out


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
