"""One-step objectives: what a training step costs against plain flow matching, per preset student.

    python benchmarks/one_step_bench.py [--steps 20] [--presets digits,fashion-mnist]

A step is the loss (coupling rows already in memory: the objectives' own work, not the data's), backward and
AdamW, on the preset's student network, batch and image shape: `fm` (one forward), `meanflow` (a forward with
gradients and one forward-mode JVP without), `shortcut` (a forward with gradients and, on a quarter of the rows,
two forwards without). Median seconds per step over `--steps` steps after 3 warm-up steps, on random (z, x, y).
Writes benchmarks/results/one-step-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_results  # noqa: E402
from nfm.core.config import build_config  # noqa: E402
from nfm.core.seeding import BatchRandom  # noqa: E402
from nfm.pipeline.presets import STUDENT_PRESETS  # noqa: E402
from nfm.student.models import build_student  # noqa: E402
from nfm.student.train import StudentRunConfig, flow_matching_loss  # noqa: E402

SHAPES = {"digits": (1, 8, 10), "fashion-mnist": (1, 28, 10)}  # channels, side, classes


class InMemory:
    """A coupling whose rows are the batch itself: (z, x, y)."""

    name = "in-memory"

    def couple(self, batch, rng):
        return batch


def bench(preset: str, objective: str, steps: int, device: torch.device) -> dict:
    c, side, classes = SHAPES[preset]
    cfg = build_config(StudentRunConfig, preset=STUDENT_PRESETS[preset], overrides=[f"flow.objective={objective}"])
    mc = cfg.model.resolved(c, side, classes)
    mc = replace(mc, interval=objective != "fm")
    torch.manual_seed(0)
    model = build_student(mc).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = flow_matching_loss(InMemory(), cfg.flow.make_path(), cfg.flow, mc.class_dropout)
    b = cfg.train.batch_size
    g = torch.Generator().manual_seed(0)
    batch = (
        torch.randn(b, c, side, side, generator=g).to(device),
        torch.rand(b, c, side, side, generator=g).mul(2).sub(1).to(device),
        torch.randint(classes, (b,), generator=g).to(device),
    )
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        loss, _ = loss_fn(model, batch, BatchRandom(0, i, 0, b, b, device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    times.sort()
    params = sum(p.numel() for p in model.parameters())
    return {"preset": preset, "network": f"{mc.arch} width {mc.width} depth {mc.depth}", "params": params,
            "objective": objective, "batch": b, "ms / step": round(times[len(times) // 2] * 1e3, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--presets", default="digits,fashion-mnist")
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = []
    for preset in args.presets.split(","):
        base = None
        for objective in ("fm", "meanflow", "shortcut"):
            row = bench(preset, objective, args.steps, device)
            base = base or row["ms / step"]
            row["vs fm"] = f"{row['ms / step'] / base:.2f}x"
            rows.append(row)
            print(row, flush=True)
    notes = (
        "The loss, backward and AdamW of one step on the preset's student network and batch (random rows in "
        "memory). meanflow: a forward with gradients plus one torch.func.jvp without (attention through the math "
        "kernel); shortcut: a forward plus two no-gradient forwards on a quarter of the rows. Median of the "
        f"timed steps ({args.steps}, after 3 warm-up steps). Command: python benchmarks/one_step_bench.py"
    )
    print(write_results(f"one-step-{device.type}", rows, notes))


if __name__ == "__main__":
    main()
