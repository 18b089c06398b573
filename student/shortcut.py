"""One-step students by self-consistency: shortcut models (Frans et al. 2024), in this project's time.

An interval student s(x_t, t, h) (student/models.py, `model.interval`) is asked for the step of length h that
lands where the flow does: x_{t+h} = x_t + h s(x_t, t, h), the same average velocity MeanFlow learns
(student/meanflow.py), taught without a derivative. Two losses share each batch:

    flow matching (h = 0):  s(x_t, t, 0) = v,
    self-consistency:       s(x_t, t, 2d) = 1/2 [s(x_t, t, d) + s(x_t + d s(x_t, t, d), t + d, d)],

the second on a share of the rows (the paper's quarter), its target two no-gradient evaluations of the network:
one step of 2d is two steps of d. The step lengths are powers of two, 2d = 2^-k for k = 0 .. levels - 1, and t
a multiple of 2d, the grid a sampler of 2^k steps walks; the finest half step d = 2^-levels is taken with the
instantaneous velocity (h = 0), which flow matching trains. Sampling is student/sampling.py's `mean` solver.
"""

from __future__ import annotations

import torch
from torch import nn

from nfm.core.errors import NFMError
from nfm.student.meanflow import StepRows, column


def consistency_target(
    model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, d: torch.Tensor, y: torch.Tensor | None, h: torch.Tensor
) -> torch.Tensor:
    """1/2 [s(x_t, t, h) + s(x', t + d, h)] with x' = x_t + d s(x_t, t, h): two steps of length d, the network
    asked for steps of length h (h = d, or 0 at the finest level, where the instantaneous velocity stands in)."""
    first = model(x_t, t, y, h=h)
    second = model(x_t + column(d, x_t) * first, t + d, y, h=h)
    return 0.5 * (first + second)


def consistency_steps(
    u_share: torch.Tensor, u_level: torch.Tensor, u_place: torch.Tensor, share: float, levels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(which rows are self-consistency rows, their step 2d) from three uniforms per row: a `share` of the rows,
    2d = 2^-k with k uniform in 0 .. levels - 1; (the start t = j 2d, j uniform in 0 .. 2^k - 1: `grid_time`)."""
    if not 0.0 <= share <= 1.0:
        raise NFMError(f"the share of self-consistency rows must be in [0, 1], got {share}")
    if levels < 1:
        raise NFMError(f"shortcut_levels must be >= 1 (steps 1 .. 2^-(levels-1)), got {levels}")
    k = (u_level * levels).floor().clamp(max=levels - 1)
    return u_share < share, torch.exp2(-k).to(u_place.dtype)


def grid_time(step: torch.Tensor, u_place: torch.Tensor) -> torch.Tensor:
    """A start t = j * step with j uniform in 0 .. 1/step - 1: the grid a sampler of 1/step steps walks."""
    count = (1.0 / step).round()
    return (u_place * count).floor().clamp(max=count - 1) * step


def shortcut_loss(model: nn.Module, rows: StepRows, consistent: torch.Tensor, finest: float) -> torch.Tensor:
    """The loss of a batch: the squared error of s(x_t, t, h) against v on the flow-matching rows (h = 0) and
    against the two-half-steps target on the `consistent` rows (h = 2d; half steps of at most `finest` taken
    with the instantaneous velocity), computed from the bare module without gradients (a distributed wrapper's
    forward gives the output whose backward synchronises)."""
    x_t, t, h, v, y = rows
    s = model(x_t, t, y, h=h)
    target = v.clone()
    if consistent.any():
        bare, idx = getattr(model, "module", model), consistent.nonzero().flatten()
        d = h[idx] / 2
        query = torch.where(d <= finest, torch.zeros_like(d), d)
        with torch.no_grad():
            yy = None if y is None else y[idx]
            target[idx] = consistency_target(bare, x_t[idx], t[idx], d, yy, query).to(target.dtype)
    wide = torch.promote_types(s.dtype, torch.float32)  # bfloat16 under autocast: the error in float32 at least
    return (s.to(wide) - target.to(wide)).pow(2).mean()
