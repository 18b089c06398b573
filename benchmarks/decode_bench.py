"""Parallel (Jacobi / Gauss-Seidel-Jacobi) vs KV-cached sequential TarFlow decoding.

    python benchmarks/decode_bench.py [--quick] [--device cuda] [--teacher RUN_OR_EXPORT ...]

At 49 patches (28x28, patch 4) and 256 patches (32x32 RGB, patch 2) with random weights of a trained
model's scale, and on real teachers passed with --teacher (whose fixed-point iterations converge as
trained flows do). Reports wall time, iterations per block and the largest deviation from the
sequential decode. Writes benchmarks/results/decode-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import timed_row, timeit, write_results  # noqa: E402
from nfm.teacher.model import TarFlow, TarFlowConfig  # noqa: E402

SYNTHETIC = {  # name -> (channels, image size, patch, width, blocks, layers)
    "49 patches (1x28x28, p4)": (1, 28, 4, 128, 4, 2),
    "256 patches (3x32x32, p2)": (3, 32, 2, 256, 4, 2),
}
VARIANTS = [  # (label, decode kwargs)
    ("sequential, KV cache", dict(method="sequential")),
    ("jacobi tol 1e-3", dict(method="jacobi", tol=1e-3)),
    ("jacobi tol 1e-4", dict(method="jacobi", tol=1e-4)),
    ("GS-jacobi chunk 8, tol 1e-4", dict(method="jacobi", tol=1e-4, chunk=8)),
]


def synthetic(name: str, device) -> TarFlow:
    c, s, p, w, nb, nl = SYNTHETIC[name]
    torch.manual_seed(0)
    cfg = TarFlowConfig(in_channels=c, img_size=s, patch_size=p, width=w, num_blocks=nb, layers_per_block=nl,
                        head_dim=64 if w >= 256 else 32, num_classes=10, noise_std=0.05)  # fmt: skip
    model = TarFlow(cfg)
    with torch.no_grad():
        for b in model.blocks:
            b.proj_out.weight.normal_(0, 0.01)
    return model.to(device).eval()


def bench(model: TarFlow, label: str, batch: int, device, repeat: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, *model.image_shape, generator=g).to(device) * model.prior_std
    y = torch.randint(0, max(model.num_classes, 1), (batch,), generator=g).to(device) if model.num_classes else None
    ref = model.decode(z, y)
    rows, base = [], None
    for name, kw in VARIANTS:
        stats: dict = {}
        out = model.decode(z, y, stats=stats, **kw)
        t = timeit(lambda kw=kw: model.decode(z, y, **kw), repeat=repeat, warmup=1)
        base = base or t
        iters = stats.get("iterations")
        rows.append(
            {
                **timed_row(f"decode: {name}", t, batch, model=label, patches=model.cfg.num_patches),
                "vs sequential": f"{base / t:.2f}x",
                "iterations/block": "-" if iters is None else "/".join(map(str, iters)),
                "max |x - x_seq|": f"{float((out - ref).abs().max()):.1e}",
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--teacher", action="append", default=[], help="trained teacher run or export (repeatable)")
    args = ap.parse_args()
    device = torch.device(args.device)
    r = 2 if args.quick else 3
    rows = []
    with torch.no_grad():
        for path in args.teacher:
            from nfm.teacher.export import load_teacher

            model = load_teacher(path, device)
            for batch in (16, 256):
                rows += bench(model, f"trained: {Path(path).name}", batch, device, r)
        for name in SYNTHETIC:
            model = synthetic(name, device)
            for batch in (16, 128):
                rows += bench(model, f"random: {name}", batch, device, r)
    write_results(
        f"decode-{device.type}",
        rows,
        notes="Wall time of one decode (no guidance, float32). Jacobi: all patches of a block updated in parallel "
        "from the previous iterate until the largest change <= tol; GS-jacobi: chunks of 8 patches in turn, "
        "Jacobi within. Random weights converge in few iterations; trained teachers are the realistic case.",
    )


if __name__ == "__main__":
    main()
