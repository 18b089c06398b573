"""Probability paths between noise z (t = 0) and data x (t = 1), and time samplers.

Every path is  x_t = alpha_t * x + sigma_t * z  with conditional velocity  u_t = alpha'_t * x + sigma'_t * z:

    linear (rectified flow / CondOT)   alpha_t = t,            sigma_t = 1 - t             u = x - z
    vp     (variance preserving, trig) alpha_t = sin(pi t/2),  sigma_t = cos(pi t/2)      alpha^2 + sigma^2 = 1
    ve     (variance exploding)        alpha_t = 1,            sigma_t = s_max^(1-t) s_min^t
                                       (t = 0 is N(x, s_max^2) ~ s_max * z: samplers start from prior_scale * z)

and one stochastic path, the Brownian bridge of Schrodinger-bridge CFM (Tong et al., OT-CFM, eq. 19-20):

    bridge                             x_t = (1 - t) z + t x + sigma * sqrt(t (1 - t)) * eps,   eps ~ N(0, I)
                                       u_t = x - z + sigma * (1 - 2t) / (2 sqrt(t (1 - t))) * eps
                                       (= d x_t / dt at fixed eps; sigma = 0 is the linear path). Its ends are
                                       z and x exactly, so samplers start from z as for `linear`. The target
                                       grows like 1/sqrt(t) at the ends: times are kept in [BRIDGE_T, 1 - BRIDGE_T].
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal

import torch

from nfm.core.config import one_of
from nfm.core.errors import NFMError

PathName = Literal["linear", "vp", "ve", "bridge"]
TimeSampler = Literal["uniform", "logit-normal"]
PATHS: tuple[str, ...] = typing.get_args(PathName)
TIME_SAMPLERS: tuple[str, ...] = typing.get_args(TimeSampler)
BRIDGE_T = 1e-4  # the bridge's times are clamped to [BRIDGE_T, 1 - BRIDGE_T]


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class ProbPath:
    kind: PathName = "linear"
    ve_sigma_min: float = 0.01
    ve_sigma_max: float = 20.0
    sigma: float = 0.0  # bridge: the Brownian bridge's noise scale

    def __post_init__(self):
        one_of(self.kind, PathName, "path")
        if not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise NFMError(f"flow.sigma must be a finite number >= 0, got {self.sigma}")

    @property
    def stochastic(self) -> bool:
        """True if x_t needs a noise draw eps besides (z, x, t)."""
        return self.kind == "bridge" and self.sigma > 0

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(alpha_t, sigma_t, d alpha/dt, d sigma/dt), each shaped like t."""
        if self.kind in ("linear", "bridge"):
            return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)
        if self.kind == "vp":
            h = 0.5 * math.pi
            return torch.sin(h * t), torch.cos(h * t), h * torch.cos(h * t), -h * torch.sin(h * t)
        log_ratio = math.log(self.ve_sigma_min / self.ve_sigma_max)
        sigma = self.ve_sigma_max * torch.exp(log_ratio * t)
        return torch.ones_like(t), sigma, torch.zeros_like(t), log_ratio * sigma

    @classmethod
    def from_flow(cls, flow: dict) -> ProbPath:
        """The path of a student's exported flow config (a dict)."""
        return cls(flow["path"], flow["ve_sigma_min"], flow["ve_sigma_max"], float(flow.get("sigma", 0.0)))

    @property
    def prior_scale(self) -> float:
        """Standard deviation of the t = 0 marginal's noise: samplers start from prior_scale * z."""
        return self.ve_sigma_max if self.kind == "ve" else 1.0

    def sample(
        self, z: torch.Tensor, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, u_t) for per-row times t (b,); the bridge also takes its noise eps (shaped like x)."""
        a, s, da, ds = (_bcast(c, x) for c in self.coefficients(t))
        xt, u = a * x + s * z, da * x + ds * z
        if not self.stochastic:
            return xt, u
        if eps is None:
            raise NFMError("the bridge path with sigma > 0 needs its noise eps")
        tt = _bcast(t, x)
        root = torch.sqrt(tt * (1 - tt))
        return xt + self.sigma * root * eps, u + self.sigma * (1 - 2 * tt) / (2 * root) * eps

    def clamp_time(self, t: torch.Tensor) -> torch.Tensor:
        """Training times the path's target is finite at (the bridge's is not at 0 and 1)."""
        return t.clamp(BRIDGE_T, 1 - BRIDGE_T) if self.stochastic else t


def sample_time(n: int, rng, kind: str = "uniform", mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """t in (0, 1): uniform, or logit-normal sigmoid(N(mean, std^2)). `rng` is a BatchRandom."""
    if one_of(kind, TimeSampler, "time sampler") == "uniform":
        return rng.rand()
    return torch.sigmoid(mean + std * rng.randn())  # logit-normal
