"""What torch.compile and bf16 buy for the digits preset's models: the teacher's and the student's train step,
eager against `train.compile=true`, float32 against bf16 autocast, and the student's velocity evaluation of
1,000 samples (the evaluation's unit of work) in float32 and bf16.

    python benchmarks/compile_bench.py [--device cuda] [--steps 30]

The teacher is the digits preset's (digits8-S, batch 64), the student its `conv-S` (batch 128), both with the
fused AdamW of the training loop. A compiled row's first two steps (the compile) are timed apart. The bf16
velocity's largest deviation from float32 is reported beside its speed: bf16 changes the evaluation's numbers.

Writes benchmarks/results/compile-<device>.{json,md}; `train.compile=auto` (core/loop.py) follows
these figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import timeit, write_results  # noqa: E402
from nfm.core.loop import TrainConfig, adamw  # noqa: E402
from nfm.core.seeding import BatchRandom  # noqa: E402
from nfm.student.models import STUDENT_SIZES, StudentModelConfig, build_student  # noqa: E402
from nfm.teacher.model import TARFLOW_SIZES, TarFlow, TarFlowConfig  # noqa: E402
from nfm.teacher.train import teacher_loss  # noqa: E402


def teacher(device):
    torch.manual_seed(0)
    cfg = TarFlowConfig(in_channels=1, img_size=8, num_classes=10, noise_std=0.1, **TARFLOW_SIZES["digits8-S"])
    model = TarFlow(cfg).to(device).train()
    x, y = torch.rand(64, 1, 8, 8, device=device) * 2 - 1, torch.randint(0, 10, (64,), device=device)
    loss_fn = teacher_loss(0.1, 0.1)
    return model, lambda m, i: loss_fn(m, (x, y), BatchRandom(0, i, 0, 64, 64, device))[0], 64


def student(device):
    torch.manual_seed(0)
    cfg = StudentModelConfig(**STUDENT_SIZES["conv-S"], in_channels=1, img_size=8, num_classes=10)
    model = build_student(cfg).to(device).train()
    for p in model.parameters():  # non-trivial outputs (zero-initialised output layers)
        if p.ndim > 1 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    x, z = torch.randn(128, 1, 8, 8, device=device), torch.randn(128, 1, 8, 8, device=device)
    t, y = torch.rand(128, device=device), torch.randint(0, 10, (128,), device=device)

    def loss(m, i):
        xt = (1 - t.view(-1, 1, 1, 1)) * z + t.view(-1, 1, 1, 1) * x
        return (m(xt, t, y) - (x - z)).pow(2).mean()

    return model, loss, 128


def train_rows(name: str, build, device, steps: int) -> list[dict]:
    rows, base = [], None
    for variant in ("eager", "compiled", "bf16"):
        model, loss_fn, batch = build(device)
        if variant == "compiled":
            model.compile()
        opt = adamw(model, TrainConfig(lr=1e-4))
        counter = iter(range(10**9))

        def step(model=model, opt=opt, loss_fn=loss_fn, bf16=variant == "bf16", counter=counter):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(model, next(counter))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t0 = time.perf_counter()
        step(), step()
        first = time.perf_counter() - t0
        t = timeit(step, repeat=steps, warmup=1)
        base = base or t
        rows.append({"benchmark": f"{name} train step", "variant": variant, "batch": batch, "ms": round(t * 1e3, 1),
                     "img/s": round(batch / t), "vs eager": f"{base / t:.2f}x",
                     "first two steps s": round(first, 1)})  # fmt: skip
    return rows


@torch.inference_mode()
def velocity_rows(device) -> list[dict]:
    model = student(device)[0].eval()
    n = 1000
    x, t = torch.randn(n, 1, 8, 8, device=device), torch.rand(n, device=device)
    y = torch.randint(0, 10, (n,), device=device)
    ref = model(x, t, y)
    rows, base = [], None
    for variant in ("float32", "bf16"):

        def call(bf16=variant == "bf16"):  # fmt: skip
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                return model(x, t, y).float()

        s = timeit(call, repeat=7, warmup=1)
        base = base or s
        dev = (call() - ref).abs().max().item()
        rows.append({"benchmark": "conv-S velocity, 1000 samples", "variant": variant, "ms": round(s * 1e3, 1),
                     "vs eager": f"{base / s:.2f}x", "max abs deviation from float32": f"{dev:.1e}"})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per row (median)")
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = train_rows("teacher digits8-S", teacher, device, args.steps)
    rows += train_rows("student conv-S", student, device, args.steps)
    rows += velocity_rows(device)
    notes = (f"`python benchmarks/compile_bench.py --steps {args.steps}`: median step; compiled = torch.compile "
             "(inductor) of the model, as train.compile=true; bf16 = autocast around the loss.")  # fmt: skip
    write_results(f"compile-{device.type}", rows, notes)


if __name__ == "__main__":
    main()
