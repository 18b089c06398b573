"""What the couplings cost: seconds per pair of a teacher encode (NFM) against an ODE solve of a student (reflow),
and the semidiscrete-OT assignment at Fashion-MNIST scale (60,000 images of 784 dimensions).

    python benchmarks/couplings_bench.py --teacher RUN/teacher-*/export --student RUN/students/independent-*/export

Writes benchmarks/results/couplings-<device>.{json,md}. The teacher and student should be trained ones (an
`nfm run --preset digits` gives both): dopri5's NFE depends on how curved the learned flow is.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import timeit, write_results  # noqa: E402
from nfm.core.config import from_dict  # noqa: E402
from nfm.core.data import DataConfig, load_data  # noqa: E402
from nfm.pairs.build import PairBuildConfig, build_pairs  # noqa: E402
from nfm.pairs.reflow import build_reflow_pairs  # noqa: E402
from nfm.student import sdot  # noqa: E402
from nfm.student.reflow import StudentGenerator  # noqa: E402
from nfm.teacher.protocol import load_teacher_spec  # noqa: E402


def per_pair(build, n: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    build()
    dt = time.perf_counter() - t0
    return dt, dt / n


def bench_pairs(teacher_spec: str, student: str, n: int, device) -> list[dict]:
    rows = []
    teacher, info = load_teacher_spec(teacher_spec, device)
    data = load_data(from_dict(DataConfig, info.get("data") or {"name": "digits"}), "train")
    views = max(1, n // len(data))
    with tempfile.TemporaryDirectory() as root:
        cfg = PairBuildConfig(views=views, batch_size=256)
        n_nfm = len(data) * views
        total, each = per_pair(lambda: build_pairs(teacher, data, cfg, Path(root), log=lambda *a: None), n_nfm)
        rows.append({"pairs": "NFM: teacher encode (one parallel pass)", "n": n_nfm, "NFE": 1,
                     "seconds": round(total, 2), "ms / pair": round(1e3 * each, 3)})  # fmt: skip
        pcfg = PairBuildConfig(batch_size=500, seed=1)
        for solver, steps in (("euler", 16), ("heun", 8), ("dopri5", 0)):
            gen = StudentGenerator(student, device, solver, steps or 32)
            where = Path(root) / solver
            total, each = per_pair(lambda g=gen, w=where: build_reflow_pairs(g, n, pcfg, w, log=lambda *a: None), n)
            nfe = sum(gen.nfe) / len(gen.nfe)
            rows.append({"pairs": f"reflow: student ODE, {solver}", "n": n, "NFE": round(nfe, 1),
                         "seconds": round(total, 2), "ms / pair": round(1e3 * each, 3)})  # fmt: skip
    base = rows[0]["ms / pair"]
    for r in rows:
        r["x NFM"] = round(r["ms / pair"] / base, 1)
    return rows


def bench_sdot(device, batch: int = 256) -> list[dict]:
    rows = []
    for name in ("digits", "fashion-mnist"):
        data = load_data(DataConfig(name=name), "train")
        images, labels = data.tensors()
        x = images.flatten(1).to(device)
        n, dim = x.shape
        z = torch.randn(batch, dim, device=device)
        cls = x[(labels == 0).to(device)]
        for scope, xs in (("global", x), ("one class", cls)):
            offset = xs.pow(2).sum(1)
            sec = timeit(lambda xs=xs, offset=offset, z=z: sdot.assign(z, xs, offset), repeat=5)
            rows.append({"data": name, "images": len(xs), "dim": dim, "scope": scope, "noise batch": batch,
                         "ms / assignment": round(1e3 * sec, 2), "assignments / s": round(batch / sec)})  # fmt: skip
        # the fit: ascent steps of 1,024 draws on one class (a labelled fit runs `steps` of them per class)
        cfg = sdot.SDOTConfig(steps=20, batch_size=1024)
        prob = sdot._Problem(cls, torch.full((len(cls),), 1.0 / len(cls), device=device),
                             torch.zeros(len(cls), device=device), torch.zeros(len(cls), device=device))  # fmt: skip
        t0 = time.perf_counter()
        sdot.ascend(prob, cfg, 0, cfg.steps)
        sec = (time.perf_counter() - t0) / cfg.steps
        rows.append({"data": name, "images": len(cls), "dim": dim, "scope": "fit, one class", "noise batch": 1024,
                     "ms / assignment": round(1e3 * sec, 2), "assignments / s": round(1024 / sec)})  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True, help="a student export or run of the same data")
    p.add_argument("--n", type=int, default=5000, help="pairs per measurement")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    pairs = bench_pairs(args.teacher, args.student, args.n, device)
    sd = bench_sdot(device)
    rows = [{"benchmark": "pairs", **r} for r in pairs] + [{"benchmark": "sd-ot assignment", **r} for r in sd]
    notes = (
        "Cost per pair of a coupling's cache: NFM encodes each image once through the teacher (one parallel pass); "
        "reflow integrates a trained student from noise (Euler 16 / Heun 8 steps / dopri5 at rtol = atol = 1e-5). "
        "sd-ot: one training step's assignment of a noise batch to its Laguerre cells (one matmul over the images, "
        "per class as training does it, or over the whole training set); the fit runs this once per ascent step."
    )
    write_results(f"couplings-{device.type}", rows, notes)


if __name__ == "__main__":
    main()
