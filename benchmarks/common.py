"""Helpers shared by the benchmark scripts: machine description, timing, result files."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = f"{torch.cuda.get_device_name()} + " if torch.cuda.is_available() else ""
    return f"{dev}{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1, min_time: float = 0.0) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < repeat or time.perf_counter() < t_end:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def timed_row(benchmark: str, seconds: float, batch: int, **fields) -> dict:
    """A result row: what was timed, its own fields, then the batch, ms per call and images per second."""
    return {"benchmark": benchmark, **fields, "batch": batch, "ms": round(seconds * 1e3, 1),
            "img/s": round(batch / seconds, 1)}  # fmt: skip


def write_results(name: str, rows: list[dict], notes: str = "") -> Path:
    """benchmarks/results/NAME.json and NAME.md (a table)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "rows": rows, "notes": notes}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = [f"# {name}", "", f"Machine: {payload['machine']}  ", f"Date: {payload['date']}", ""]
    if notes:
        lines += [notes, ""]
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    md = RESULTS / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return md
