"""Teacher benchmarks: training throughput, KV-cached vs recomputed decode, encode throughput.

    python benchmarks/teacher_bench.py [--quick] [--device cuda]

Writes benchmarks/results/teacher-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import timed_row, timeit, write_results  # noqa: E402
from nfm.core.seeding import BatchRandom  # noqa: E402
from nfm.teacher.model import TARFLOW_SIZES, TarFlow, TarFlowConfig  # noqa: E402
from nfm.teacher.train import teacher_loss  # noqa: E402

SETTINGS = {  # size -> (channels, image size, classes)
    "digits8": (1, 8, 10),
    "mnist28": (1, 28, 10),
    "mnist28-large": (1, 28, 10),
}


def build(size: str, device) -> TarFlow:
    c, s, k = SETTINGS[size]
    torch.manual_seed(0)
    model = TarFlow(TarFlowConfig(in_channels=c, img_size=s, num_classes=k, noise_std=0.1, **TARFLOW_SIZES[size]))
    with torch.no_grad():  # non-trivial weights, as a trained model has
        for b in model.blocks:
            b.proj_out.weight.normal_(0, 0.01)
    return model.to(device)


def bench_train(size: str, batch: int, device, repeat: int) -> dict:
    model = build(size, device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the training loop (core.loop.adamw)
    c, s, k = SETTINGS[size]
    x, y = torch.rand(batch, c, s, s, device=device) * 2 - 1, torch.randint(0, k, (batch,), device=device)
    loss_fn = teacher_loss(0.1, 0.1)
    rng = BatchRandom(0, 0, 0, batch, batch, device)

    def step():
        loss, _ = loss_fn(model, (x, y), rng)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = timeit(step, repeat=repeat, warmup=2)
    return timed_row("train step", t, batch, size=size, tokens=model.cfg.num_patches)


def bench_encode(size: str, batch: int, device, repeat: int) -> dict:
    model = build(size, device).eval()
    c, s, k = SETTINGS[size]
    x, y = torch.rand(batch, c, s, s, device=device) * 2 - 1, torch.randint(0, k, (batch,), device=device)
    with torch.no_grad():
        t = timeit(lambda: model.encode(x, y), repeat=repeat, warmup=1)
    return timed_row("encode (data->noise)", t, batch, size=size, tokens=model.cfg.num_patches)


def bench_decode(size: str, batch: int, device, repeat: int) -> list[dict]:
    model = build(size, device).eval()
    c, s, k = SETTINGS[size]
    z, y = torch.randn(batch, c, s, s, device=device), torch.randint(0, k, (batch,), device=device)
    rows = []
    times = {}
    for cached in (True, False):
        t = timeit(lambda cached=cached: model.decode(z, y, kv_cache=cached), repeat=repeat, warmup=1)
        times[cached] = t
        what = f"decode ({'KV cache' if cached else 'recompute prefix'})"
        rows.append(timed_row(what, t, batch, size=size, tokens=model.cfg.num_patches))
    rows[0]["speed-up"] = f"{times[False] / times[True]:.2f}x"
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    args = ap.parse_args()
    device = torch.device(args.device)
    r = 3 if args.quick else 7
    rows = [
        bench_train("digits8", 128, device, r),
        bench_train("digits8", 256, device, r),
        bench_train("mnist28", 128, device, r),
        bench_train("mnist28-large", 64, device, max(2, r // 2)),
        bench_encode("digits8", 256, device, r),
        bench_encode("mnist28", 256, device, r),
        bench_encode("mnist28-large", 256, device, max(2, r // 2)),
    ]
    for batch in (16, 64):
        rows += bench_decode("mnist28", batch, device, max(2, r // 2))
    rows += bench_decode("mnist28-large", 16, device, 2)
    rows += bench_decode("digits8", 100, device, r)
    write_results(
        f"teacher-{device.type}",
        rows,
        notes="train step = forward + backward + clip + AdamW on the MLE loss (float32). "
        "decode at 49 patches = 28x28 with patch 4 (mnist28 size), no guidance.",
    )


if __name__ == "__main__":
    main()
