"""Pair-cache benchmarks: build vs bare encode, reader throughput and memory on a >= 2 GB cache, size per pair.

    python benchmarks/pairs_bench.py [--reader-gb 2.2] [--workdir /tmp/nfm-pairs-bench]

Writes benchmarks/results/pairs-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_results  # noqa: E402
from nfm.core.data import DataConfig, load_data  # noqa: E402
from nfm.core.io import save_tensors  # noqa: E402
from nfm.pairs.build import PairBuildConfig, build_pairs, pair_noise  # noqa: E402
from nfm.pairs.format import FORMAT_VERSION, shard_name  # noqa: E402
from nfm.pairs.reader import PairCache, PairReader  # noqa: E402
from nfm.pairs.writer import assemble_index  # noqa: E402
from nfm.teacher.model import TARFLOW_SIZES, TarFlow, TarFlowConfig  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def teacher_for(size: str, data, device) -> TarFlow:
    torch.manual_seed(0)
    c, h, _ = data.image_shape
    model = TarFlow(
        TarFlowConfig(in_channels=c, img_size=h, num_classes=data.num_classes, noise_std=0.1, **TARFLOW_SIZES[size])
    )
    with torch.no_grad():
        for b in model.blocks:
            b.proj_out.weight.normal_(0, 0.01)
    return model.to(device).eval()


@torch.no_grad()
def bench_build(size: str, data, views: int, device, workdir: Path, batch: int = 256) -> dict:
    teacher = teacher_for(size, data, device)
    n = len(data) * views
    # bare encode: the same images and noise, already in memory, in batches of `batch`
    x, y = data.tensors()
    ids = torch.arange(n)
    xs, ys = x[ids // views], y[ids // views]
    eps = pair_noise(0, ids, tuple(x.shape[1:]))
    inputs = xs + teacher.noise_std * eps
    teacher.encode(inputs[:batch].to(device), ys[:batch].to(device))  # warm-up
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        teacher.encode(inputs[i : i + batch].to(device), ys[i : i + batch].to(device))
    bare = n / (time.perf_counter() - t0)
    root = workdir / f"build-{size}"
    shutil.rmtree(root, ignore_errors=True)
    cfg = PairBuildConfig(views=views, batch_size=batch, sigma_rows=batch)
    t0 = time.perf_counter()
    cache_dir = build_pairs(teacher, data, cfg, root, log=lambda *a: None).path
    built = n / (time.perf_counter() - t0)
    cache = PairCache(cache_dir)
    size_b = sum(s["bytes"] for s in cache.shards)
    t0 = time.perf_counter()
    build_pairs(teacher, data, cfg, root, log=lambda *a: None)
    hit = time.perf_counter() - t0
    return {
        "benchmark": "build vs bare encode",
        "teacher": size,
        "data": data.name,
        "pairs": n,
        "batch": batch,
        "bare encode pairs/s": round(bare, 1),
        "build pairs/s (incl. sigma_f pass, writes, sha256)": round(built, 1),
        "ratio": round(built / bare, 3),
        "cache hit s": round(hit, 2),
        "bytes/pair": round(size_b / n, 1),
    }


def size_per_pair(data, device, workdir: Path) -> list[dict]:
    teacher = teacher_for("tiny", data, device)
    rows = []
    for dtype in ("float16", "float32"):
        root = workdir / f"size-{dtype}"
        shutil.rmtree(root, ignore_errors=True)
        cache = PairCache(build_pairs(teacher, data, PairBuildConfig(dtype=dtype), root, log=lambda *a: None).path)
        total = sum(s["bytes"] for s in cache.shards)
        rows.append(
            {
                "benchmark": "size on disk",
                "data": f"{data.name} {tuple(data.image_shape)}",
                "noise dtype": dtype,
                "bytes/pair": round(total / len(cache), 1),
            }
        )
    return rows


def synthetic_cache(root: Path, gb: float, shape=(3, 32, 32), shard_rows: int = 25_000) -> Path:
    """A cache of random pairs (no teacher) in the real format, for reader benchmarks."""
    row_bytes = 2 * math.prod(shape) + math.prod(shape) + 24
    total = int(gb * 2**30 / row_bytes)
    n_shards = math.ceil(total / shard_rows)
    cache_dir = root / "synthetic"
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache_dir.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for s in range(n_shards):
        n = min(shard_rows, total - s * shard_rows)
        save_tensors(
            cache_dir / shard_name(s, n_shards),
            {
                "noise": torch.randn(n, *shape, generator=g).half(),
                "data": torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8),
                "label": torch.randint(0, 10, (n,), generator=g),
                "index": torch.arange(s * shard_rows, s * shard_rows + n),
                "view": torch.zeros(n, dtype=torch.long),
            },
        )
    base = {
        "format_version": FORMAT_VERSION,
        "key": "synthetic",
        "teacher": {"fingerprint": "none"},
        "data": {
            "name": "synthetic",
            "split": "train",
            "fingerprint": "none",
            "rows": total,
            "levels": 255,
            "num_classes": 10,
        },
        "noise_std": 0.1,
        "sigma_f": 1.0,
        "views": 1,
        "seed": 0,
        "dtypes": {"noise": "float16", "data": "uint8", "label": "int64", "index": "int64"},
        "shapes": {"noise": list(shape), "data": list(shape)},
        "shard_rows": shard_rows,
        "num_shards": n_shards,
        "expected_rows": total,
    }
    assemble_index(cache_dir, base, n_shards, complete=True)
    return cache_dir


def bench_reader(cache_dir: Path, batch: int = 256) -> dict:
    import gc

    gc.collect()
    cache = PairCache(cache_dir)
    size_gb = sum(s["bytes"] for s in cache.shards) / 2**30
    reader = PairReader(cache, seed=0, window=2)
    rss0, peak, samples = rss_mb(), 0.0, []
    n = 0
    t0 = time.perf_counter()
    it = reader.batches(batch)
    per_epoch = len(cache) // batch
    for i in range(per_epoch):
        noise, data, label, _ = next(it)
        n += len(label)
        if i % max(1, per_epoch // 8) == 0:
            samples.append(round(rss_mb()))
        peak = max(peak, rss_mb())
    dt = time.perf_counter() - t0
    return {
        "benchmark": "reader, 1 shuffled epoch",
        "cache GB": round(size_gb, 2),
        "pairs": len(cache),
        "batch": batch,
        "pairs/s": round(n / dt, 1),
        "RSS before MB": round(rss0),
        "peak RSS MB": round(peak),
        "RSS over the epoch MB": " ".join(map(str, samples)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reader-gb", type=float, default=2.2)
    ap.add_argument("--workdir", default="/tmp/nfm-pairs-bench")
    args = ap.parse_args()
    device, workdir = torch.device(args.device), Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    digits = load_data(DataConfig(name="digits"))
    rows = [bench_build("digits8", digits, 4, device, workdir)]
    try:
        fashion = load_data(DataConfig(name="fashion-mnist"))
        fashion.images, fashion.labels = fashion.images[:4096], fashion.labels[:4096]
        rows.append(bench_build("mnist28", fashion, 1, device, workdir))
    except Exception as e:  # noqa: BLE001 - the Debian package may be absent
        print(f"skipping fashion-mnist build benchmark: {e}")
    rows += size_per_pair(digits, device, workdir)
    for gb in (args.reader_gb, 2 * args.reader_gb):  # memory must not grow with the cache
        rows.append(bench_reader(synthetic_cache(workdir, gb)))
    write_results(
        f"pairs-{device.type}",
        rows,
        notes="Teachers have random (non-trivial) weights; throughput does not depend on training. "
        "The reader cache is synthetic (3x32x32, float16 noise, uint8 data) in the real format; "
        "the reader holds 2 shards (~2 x 220 MB) at a time.",
    )
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
