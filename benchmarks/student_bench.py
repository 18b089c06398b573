"""Student benchmarks: training step time per coupling, minibatch-OT cost per batch size, sampling throughput.

    python benchmarks/student_bench.py [--size SiT-S/2] [--batch 256]

Writes benchmarks/results/student-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import timeit, write_results  # noqa: E402
from nfm.core.data import DataConfig, load_data  # noqa: E402
from nfm.core.seeding import BatchRandom  # noqa: E402
from nfm.pairs.build import PairBuildConfig, build_pairs  # noqa: E402
from nfm.pairs.reader import PairCache  # noqa: E402
from nfm.student.couplings import IndependentCoupling, MinibatchOTCoupling, PairCoupling, ot_permutation  # noqa: E402
from nfm.student.models import STUDENT_SIZES, StudentModelConfig, build_student  # noqa: E402
from nfm.student.paths import ProbPath  # noqa: E402
from nfm.student.sampling import sample_ode  # noqa: E402
from nfm.student.train import FlowConfig, flow_matching_loss  # noqa: E402
from nfm.teacher.model import TARFLOW_SIZES, TarFlow, TarFlowConfig  # noqa: E402


def student(size: str, device) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = StudentModelConfig(**STUDENT_SIZES[size], in_channels=1, img_size=8, num_classes=10)
    model = build_student(cfg).to(device)
    for p in model.parameters():  # non-trivial outputs (adaLN-zero would make a fresh net output 0)
        if p.ndim > 1 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    return model


def bench_training(size: str, batch: int, device, steps: int, workdir: Path) -> list[dict]:
    data = load_data(DataConfig(name="digits"))
    torch.manual_seed(0)
    teacher = TarFlow(TarFlowConfig(in_channels=1, img_size=8, num_classes=10, **TARFLOW_SIZES["tiny"]))
    cache = PairCache(build_pairs(teacher, data, PairBuildConfig(views=4), workdir / "pairs", log=lambda *a: None).path)
    rows = []
    base = None
    for coupling in (IndependentCoupling(data), PairCoupling(cache), MinibatchOTCoupling(data)):
        model = student(size, device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loss_fn = flow_matching_loss(coupling, ProbPath("linear"), FlowConfig(), 0.1)
        stream = coupling.stream(seed=0, end=10**9)(0, 1, batch, 0)

        def step(i, coupling=coupling, model=model, opt=opt, loss_fn=loss_fn, stream=stream):
            b = tuple(t.to(device) for t in next(stream))
            loss, _ = loss_fn(model, b, BatchRandom(0, i, 0, batch, batch, device))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for i in range(3):
            step(i)
        t0 = time.perf_counter()
        for i in range(steps):
            step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / steps * 1e3
        base = base or ms
        rows.append(
            {
                "benchmark": "train step (data + coupling + fwd/bwd + AdamW)",
                "student": size,
                "coupling": coupling.name,
                "batch": batch,
                "ms": round(ms, 2),
                "vs independent": f"{ms / base:.3f}x",
            }
        )
    return rows


def bench_ot(device) -> list[dict]:
    rows = []
    for dim in (64, 784, 3072):
        for n in (64, 128, 256, 512, 1024):
            x, z = torch.randn(n, dim), torch.randn(n, dim)
            t = timeit(lambda x=x, z=z: ot_permutation(x, z), repeat=3 if n >= 512 else 5)
            rows.append(
                {
                    "benchmark": "minibatch-OT assignment (cdist + linear_sum_assignment)",
                    "dim": dim,
                    "batch": n,
                    "ms": round(t * 1e3, 2),
                }
            )
    return rows


def bench_sampling(size: str, batch: int, device) -> list[dict]:
    model = student(size, device).eval()
    z, y = torch.randn(batch, 1, 8, 8, device=device), torch.arange(batch, device=device) % 10
    rows = []
    for solver, steps in [
        ("euler", 1),
        ("euler", 2),
        ("euler", 4),
        ("euler", 8),
        ("midpoint", 4),
        ("heun", 4),
        ("rk4", 4),
        ("rk4", 8),
        ("dopri5", None),
    ]:
        stats = {}

        def run(solver=solver, steps=steps, stats=stats):
            stats.update(sample_ode(model, z, y, solver=solver, steps=steps or 1, rtol=1e-4, atol=1e-4)[1])

        t = timeit(run, repeat=3)
        rows.append(
            {
                "benchmark": "sampling",
                "student": size,
                "solver": solver,
                "steps": steps or "adaptive",
                "NFE": stats["nfe"],
                "batch": batch,
                "img/s": round(batch / t, 1),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="SiT-S/2")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workdir", default="/tmp/nfm-student-bench")
    args = ap.parse_args()
    device, workdir = torch.device(args.device), Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    rows = bench_training(args.size, args.batch, device, args.steps, workdir)
    rows += bench_training("mlp-S", args.batch, device, args.steps, workdir / "mlp")
    rows += bench_ot(device)
    rows += bench_sampling(args.size, args.batch, device)
    write_results(
        f"student-{device.type}",
        rows,
        notes="8x8 digits (1 channel, 10 classes); networks with random weights. dopri5 at rtol=atol=1e-4.",
    )
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
