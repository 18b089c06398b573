"""Sampling the student: integrate dx/dt = v(x, t, y) from t = 0 (noise) to t = 1 (data) with torchdiffeq.

Fixed-step solvers (euler, midpoint, heun, rk4) run on a time grid of `steps` intervals: uniform,
or `data-end`, t_i = 1 - (1 - i/N)^rho, which puts the short steps near the data. dopri5 adapts
its steps to (rtol, atol). The velocity wrapper counts every function evaluation (NFE), and the
network forward passes (2 per NFE under classifier-free guidance:
v = (1 + w) v(x, t, y) - w v(x, t, null), computed as one batch of 2b). Sampling runs in float32.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn
from torchdiffeq import odeint

from nfm.core.config import one_of
from nfm.core.errors import NFMError
from nfm.core.prior import Prior
from nfm.core.sampling import SampleInputs, sample_inputs
from nfm.student.meanflow import mean_steps
from nfm.student.names import EVALS_PER_STEP, GRIDS, SOLVERS, Grid, Solver, fixed_nfe  # noqa: F401 (re-exported)


class CountedVelocity(nn.Module):
    """torchdiffeq's func(t, x): the (guided) velocity, counting evaluations and forward passes."""

    def __init__(self, model: nn.Module, y: torch.Tensor | None, guidance: float = 0.0, progress=None, label=""):
        super().__init__()
        self.model, self.y, self.guidance = model, y, guidance
        self.nfe = 0
        self.forward_passes = 0
        # a tqdm bar: its postfix shows the NFE so far and t (a disabled bar, --quiet, has no postfix to draw)
        self.progress = None if getattr(progress, "disable", False) else progress
        self.label = label
        self._drawn = time.monotonic()

    def forward(self, t: torch.Tensor, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """The velocity at (x, t); with h, an interval student's average velocity over [t, t + h]."""
        self.nfe += 1
        if self.progress is not None:  # redrawn at most every `mininterval` seconds (a log file: every 30 s)
            self.progress.set_postfix_str(f"{self.label} NFE {self.nfe}, t = {float(t):.3f}", refresh=False)
            now = time.monotonic()
            if now - self._drawn >= self.progress.mininterval:
                self.progress.refresh()
                self._drawn = now
        tt = t.to(x.dtype).expand(x.shape[0])
        step = {} if h is None else {"h": h.to(x.dtype).expand(x.shape[0])}
        if self.guidance == 0.0:
            self.forward_passes += 1
            return self.model(x, tt, self.y, **step).float()
        self.forward_passes += 2
        null = torch.full_like(self.y, -1)
        step2 = {k: torch.cat([v, v]) for k, v in step.items()}
        v = self.model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([self.y, null]), **step2).float()
        v_cond, v_uncond = v.chunk(2)
        return (1 + self.guidance) * v_cond - self.guidance * v_uncond


def pick_solver(solver: str, model: nn.Module) -> str:
    """`auto`: mean for an interval student (a one-step objective: its average velocity), euler otherwise."""
    if solver != "auto":
        return solver
    return "mean" if getattr(getattr(model, "cfg", None), "interval", False) else "euler"


def time_grid(steps: int, kind: str = "uniform", rho: float = 2.0) -> torch.Tensor:
    """t_0 = 0 < t_1 < ... < t_steps = 1: uniform, or data-end t_i = 1 - (1 - i/N)^rho."""
    if steps < 1:
        raise NFMError(f"the number of steps must be >= 1, got {steps}")
    s = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    if one_of(kind, Grid, "time grid") == "uniform":
        return s.float()
    return (1 - (1 - s) ** rho).float()


@torch.no_grad()
def inside(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """torchdiffeq's adaptive solvers take steps past the end of the interval and interpolate back, evaluating
    the velocity at t outside [0, 1], where no student was trained (dopri5 on a trained digits student: up to
    t = 1.024). `step_t` at the end makes the last step land on it, so every evaluation stays inside."""
    return {"step_t": t[-1:].clone()}


def sample_ode(
    model: nn.Module,
    z: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    solver: str = "euler",
    steps: int = 8,
    grid: str = "uniform",
    rho: float = 2.0,
    guidance: float = 0.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    prior_scale: float = 1.0,
    num_classes: int | None = None,
    progress=None,
) -> tuple[torch.Tensor, dict]:
    """x(1) from x(0) = prior_scale * z. Returns (samples, {"nfe", "forward_passes", ...}). `progress`: a tqdm
    bar whose postfix follows the solve (NFE so far and t; dopri5's NFE is not known in advance)."""
    one_of(solver, Solver, "solver")
    if guidance != 0.0:
        if not num_classes:
            raise NFMError("classifier-free guidance needs a class-conditional student; this one has no classes")
        if y is None or (y < 0).all():
            raise NFMError("classifier-free guidance needs labels y to guide towards (got none)")
    func = CountedVelocity(model, y, guidance, progress, solver)
    x0 = prior_scale * z.float()
    with torch.autocast(device_type=x0.device.type, enabled=False):
        if solver == "dopri5":
            t = torch.tensor([0.0, 1.0], device=x0.device)
            x = odeint(func, x0, t, method="dopri5", rtol=rtol, atol=atol, options=inside(t))[-1]
        elif solver == "mean":  # an interval student (meanflow, shortcut): x <- x + h u(x, t, h), one NFE a step
            if not getattr(getattr(model, "cfg", None), "interval", False):
                raise NFMError("solver=mean steps an average velocity: this student has none (train it with "
                               "flow.objective=meanflow or shortcut); use euler, heun or dopri5")  # fmt: skip
            x = mean_steps(func, x0, time_grid(steps, grid, rho).to(x0.device))
        elif solver == "heun":  # EDM's Heun: the last step is Euler, so no evaluation at t = 1
            t = time_grid(steps, grid, rho).to(x0.device)
            x = odeint(func, x0, t[:-1], method=SOLVERS[solver])[-1] if steps > 1 else x0
            x = x + (t[-1] - t[-2]) * func(t[-2], x)
        else:
            t = time_grid(steps, grid, rho).to(x0.device)
            x = odeint(func, x0, t, method=SOLVERS[solver])[-1]
    stats = {
        "solver": solver,
        "steps": None if solver == "dopri5" else steps,
        "grid": None if solver == "dopri5" else grid,
        "nfe": func.nfe,
        "forward_passes": func.forward_passes,
    }
    return x, stats


def student_inputs(
    meta: dict,
    n: int,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    label: int | None = None,
    labels_like: torch.Tensor | None = None,
    prior: Prior | None = None,
    labels: torch.Tensor | None = None,
) -> SampleInputs:
    """Fixed sample inputs for a student export (`meta`: its config.json): its image shape and classes, noise
    through the prior of its path (core.sampling), or through a fitted prior (train.student_prior) times
    the path's scale; for a student trained from a data source (flow.source=data:NAME), held-out images of the
    source instead of the noise, chosen by `seed`."""
    from nfm.student.paths import ProbPath

    mc = meta["model"]
    scale = ProbPath.from_flow(meta["flow"]).prior_scale
    inputs = sample_inputs(
        n,
        (mc["in_channels"], mc["img_size"], mc["img_size"]),
        mc["num_classes"],
        seed=seed,
        prior=scale if prior is None else prior.scaled(scale),
        label=label,
        labels_like=labels_like,
        labels=labels,
        device=device,
    )
    source = meta["flow"].get("source", "gaussian")
    if source == "gaussian":
        return inputs
    z = source_images(source, meta.get("data") or {}, n, seed)
    return dataclasses.replace(inputs, eps=z, z=z.to(device))


def source_images(source: str, data: dict, n: int, seed: int) -> torch.Tensor:
    """n held-out images of a `data:NAME` source (cycled if it has fewer), in an order seeded by `seed`."""
    from nfm.core.config import from_dict
    from nfm.core.data import DataConfig, load_data
    from nfm.student.couplings import source_data_config

    held_out = load_data(source_data_config(source, from_dict(DataConfig, data)), "test")
    order = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(seed))
    return held_out.__getitems__(order[torch.arange(n) % len(order)].tolist())[0]
