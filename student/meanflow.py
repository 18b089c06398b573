"""One-step students: the average velocity over a step (MeanFlow, Geng et al. 2025), in this project's time.

Time runs from the noise (t = 0) to the data (t = 1): x_t = (1 - t) z + t x, v = x - z for the linear path. An
interval student u(x_t, t, h) (student/models.py, `model.interval`) learns the average velocity over [t, t + h],

    u(x_t, t, h) = (1 / h) int_t^{t+h} v(x_tau, tau) dtau,   so   x_{t+h} = x_t + h u(x_t, t, h).

Differentiating h u = int_t^s v dtau along the flow with the end s = t + h fixed gives the MeanFlow identity

    u = v + h (d/dt) u(x_t, t, s - t),   d/dt = v . grad_x + d/dt - d/dh,

the paper's u = v - (t - r) du/dt with its time reversed (its noise is at t = 1). The derivative is one
forward-mode JVP of the network (torch.func.jvp) with tangents (v, 1, -1) on (x, t, h); the target is detached,
so the loss asks the network to satisfy the identity at the points it is sampled at. At h = 0 the target is v:
plain flow matching. Sampling takes steps of the average velocity: one step x = z + u(z, 0, 1).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from nfm.core.errors import NFMError


def column(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return a.view(-1, *([1] * (like.dim() - 1)))


def average_velocity_target(
    model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, h: torch.Tensor, v: torch.Tensor, y: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(u(x_t, t, h), its MeanFlow target v + h (d/dt) u, detached) from one JVP: the network's output with
    gradients for the loss, the derivative along the flow with the step's end held fixed."""

    def u_of(x: torch.Tensor, tt: torch.Tensor, hh: torch.Tensor) -> torch.Tensor:
        return model(x, tt, y, h=hh)

    # attention through its math kernel: the fused ones (flash, memory-efficient) have no forward-mode derivative.
    # torch's first JVP in a process loads its own decompositions through torch.jit.script and warns that this is
    # deprecated: torch's own call, not one a user can change, so it is not shown to them
    with sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        u, du_dt = torch.func.jvp(u_of, (x_t, t, h), (v, torch.ones_like(t), -torch.ones_like(h)))
    return u, (v + column(h, v) * du_dt).detach()


class StepRows(NamedTuple):
    """The rows of a one-step objective's batch: x_t on the path at time t, the step length h (0: a flow-matching
    row), the path's velocity v there, the labels y (None: unconditional)."""

    x_t: torch.Tensor
    t: torch.Tensor
    h: torch.Tensor
    v: torch.Tensor
    y: torch.Tensor | None


def meanflow_loss(model: nn.Module, rows: StepRows, power: float = 1.0) -> torch.Tensor:
    """The training loss of a batch: u from the model as given (a distributed wrapper's forward, whose backward
    synchronises the gradients), its target from a JVP of the bare module without gradients."""
    u = model(rows.x_t, rows.t, rows.y, h=rows.h)
    with torch.no_grad():
        _, target = average_velocity_target(getattr(model, "module", model), *rows)
    return adaptive_loss(u.float(), target.float(), power)


def pair_steps(
    t: torch.Tensor, s: torch.Tensor, u: torch.Tensor, share_equal: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, h) of a batch from two times t, s (b,) drawn from the same law and uniforms u (b,): the two ordered so
    that the step runs from the earlier to the later (h = later - earlier >= 0); the rows with u < share_equal
    keep h = 0 at t (flow matching: the paper's r = t share)."""
    if not 0.0 <= share_equal <= 1.0:
        raise NFMError(f"the share of rows with h = 0 must be in [0, 1], got {share_equal}")
    lo, hi = torch.minimum(t, s), torch.maximum(t, s)
    equal = u < share_equal
    return torch.where(equal, t, lo), torch.where(equal, torch.zeros_like(t), hi - lo)


def adaptive_loss(u: torch.Tensor, target: torch.Tensor, power: float = 1.0, eps: float = 1e-3) -> torch.Tensor:
    """MeanFlow's adaptively weighted squared error: per row ||u - target||^2 / sg(||u - target||^2 + eps)^power
    (power 0: the plain squared error), averaged over the batch."""
    err = (u - target).flatten(1).pow(2).sum(1)
    return (err / (err.detach() + eps) ** power).mean()


def mean_steps(u, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x after one step of the average velocity u(t, x, h) per interval of the grid t: x <- x + h u(t, x, h).
    The one loop of the `mean` sampler (student/sampling.py counts its evaluations through u)."""
    for a, b in zip(t[:-1], t[1:]):
        x = x + (b - a) * u(a, x, b - a)
    return x


@torch.no_grad()
def sample_mean(
    model: nn.Module, z: torch.Tensor, y: torch.Tensor | None, steps: int = 1
) -> tuple[torch.Tensor, dict[str, int]]:
    """x_1 from z by `steps` equal steps of the average velocity (NFE = steps) in z's own precision (the
    float64 tests; `sample_ode(solver="mean")` is the float32 sampler with a time grid, guidance and counts)."""
    if steps < 1:
        raise NFMError(f"steps must be >= 1, got {steps}")
    n = z.shape[0]
    t = torch.linspace(0, 1, steps + 1, dtype=z.dtype, device=z.device)
    x = mean_steps(lambda tt, xx, h: model(xx, tt.expand(n), y, h=h.expand(n)), z, t)
    return x, {"nfe": steps, "forward_passes": steps}
