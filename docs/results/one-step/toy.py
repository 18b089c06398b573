"""One-step students on a toy whose flow map is known: independent pairs z ~ N(0, 1), x ~ N(0, 2^2) in 1-D.

The flow of the marginal velocity is the monotone map x = 2 z (v(x, t) = (sigma_t' / sigma_t) x with
sigma_t^2 = (1 - t)^2 + 4 t^2); its velocity at t = 0 is -z, so one Euler step of a flow-matching student
collapses every sample onto the mean, and a one-step student must learn an average velocity (+z over [0, 1])
of the opposite sign to the instantaneous one. Each student: the same small MLP (width 64, depth 3), Adam,
batch 256, `--steps` steps; printed and written to toy.json: the one-step map's slope and its mean error against
2 z over z in [-2, 2], and the slope of its velocity at t = 0 (true: -1).

    python docs/results/one-step/toy.py [--steps 3000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from nfm.student.meanflow import StepRows, meanflow_loss, pair_steps, sample_mean
from nfm.student.models import StudentModelConfig, build_student
from nfm.student.shortcut import consistency_steps, grid_time, shortcut_loss

RUNS = [("fm", 1e-3), ("meanflow", 3e-3), ("meanflow", 1e-3), ("meanflow", 3e-4), ("shortcut", 1e-3)]


def train(objective: str, lr: float, steps: int) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = StudentModelConfig(arch="mlp", width=64, depth=3, num_classes=0, interval=objective != "fm")
    model = build_student(cfg.resolved(1, 1, 0))
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        z, x = torch.randn(256, 1, 1, 1, generator=g), 2 * torch.randn(256, 1, 1, 1, generator=g)
        t, h = torch.rand(256, generator=g), torch.zeros(256)
        if objective == "meanflow":  # the defaults of flow.meanflow_equal / meanflow_power
            t, h = pair_steps(t, torch.rand(256, generator=g), torch.rand(256, generator=g), 0.75)
        elif objective == "shortcut":  # flow.shortcut_share; 5 levels: steps 1 .. 1/16
            u = torch.rand(3, 256, generator=g)
            rows, step = consistency_steps(*u, 0.25, 5)
            t, h = torch.where(rows, grid_time(step, u[2]), t), torch.where(rows, step, h)
        xt = (1 - t.view(-1, 1, 1, 1)) * z + t.view(-1, 1, 1, 1) * x
        batch = StepRows(xt, t, h, x - z, None)
        if objective == "meanflow":
            loss = meanflow_loss(model, batch)
        elif objective == "shortcut":
            loss = shortcut_loss(model, batch, rows, 2.0**-5)
        else:
            loss = (model(xt, t) - (x - z)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def slope(a: torch.Tensor, b: torch.Tensor) -> float:
    """Least-squares slope of b on a."""
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a * b).sum() / (a * a).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    args = ap.parse_args()
    z = torch.linspace(-2, 2, 201).view(-1, 1, 1, 1)
    rows = []
    for objective, lr in RUNS:
        model = train(objective, lr, args.steps)
        with torch.no_grad():
            kw = {} if objective == "fm" else {"h": torch.zeros(201)}
            v0 = model(z, torch.zeros(201), None, **kw)
            one = z + v0 if objective == "fm" else sample_mean(model, z, None, 1)[0]
        row = {"objective": objective, "lr": lr, "steps": args.steps, "one-step slope": round(slope(z, one), 3),
               "one-step error": round(float((one - 2 * z).abs().mean()), 3),
               "velocity slope at t = 0": round(slope(z, v0), 3)}  # fmt: skip
        print(row, flush=True)
        rows.append(row)
    out = Path(__file__).with_name("toy.json")
    out.write_text(json.dumps({"command": "python docs/results/one-step/toy.py", "truth": {"one-step slope": 2.0,
                   "velocity slope at t = 0": -1.0}, "rows": rows}, indent=2) + "\n")  # fmt: skip
    print(out)


if __name__ == "__main__":
    main()
