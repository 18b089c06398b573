"""Paired-by-seed differences between rows of the reports in this folder (they share their seeds' teachers
and logit caches, so seed k of one report is seed k of another). Writes compare.md:

    python docs/results/fm-kt/fashion-mnist/compare.py
"""

from __future__ import annotations

import json
from pathlib import Path

from nfm.pipeline.aggregate import paired

HERE = Path(__file__).resolve().parent
COMPARISONS = [  # (label, (report, row, K), (report, row, K))
    ("FM-KT − KD, width 12, trained 1.57× longer (matched parameters, training FLOPs, and FLOPs at K = 2)",
     ("", "fm-kt", "2"), ("control-compute-w12", "kd", "1")),
    ("FM-KT (K = 8) − KD, width 12, compute-matched training", ("", "fm-kt", "8"), ("control-compute-w12", "kd", "1")),
    ("FM-KT (K = 1) − KD, width 8, trained 3.4× longer (matched training FLOPs)",
     ("", "fm-kt", "1"), ("control-compute-w8", "kd", "1")),
    ("FM-KT (K = 8) − KD, width 8, trained 3.4× longer (matched training FLOPs)",
     ("", "fm-kt", "8"), ("control-compute-w8", "kd", "1")),
    ("FM-KT (K = 8) − OFM-KT without alignment (kd_weight=0: per-step cross-entropy only), K = 8",
     ("", "fm-kt", "8"), ("", "ofm-kt+kd_weight=0", "8")),
    ("OFM-KT, label smoothing 0.1 − the plain student with label smoothing 0.1 (K = 8)",
     ("", "ofm-kt+label_smoothing=0.1", "8"), ("", "none+label_smoothing=0.1", "1")),
    ("6,000 steps: FM-KT (K = 8) − KD", ("students-6000-steps", "fm-kt", "8"), ("students-6000-steps", "kd", "1")),
    ("6,000 steps: FM-KT (K = 8) − KD with DIST",
     ("students-6000-steps", "fm-kt", "8"), ("students-6000-steps", "kd+kd_loss=dist", "1")),
    ("6,000 steps: FM-KT (K = 8) − OFM-KT, label smoothing 0.1 (K = 8)",
     ("students-6000-steps", "fm-kt", "8"), ("students-6000-steps", "ofm-kt+label_smoothing=0.1", "8")),
]  # fmt: skip


def values(report: str, row: str, k: str) -> list[float] | None:
    path = HERE / report / "report.json"
    if not path.is_file():
        return None
    per_seed = json.loads(path.read_text())["per_seed"]
    if row not in per_seed[0]["students"]:
        return None
    return [100 * s["students"][row][k] for s in per_seed]


def main() -> None:
    lines = ["# Paired differences across this folder's reports", "",
             "Percentage points of held-out accuracy, mean ± 95 % t-interval over the seeds, paired by seed. "
             "Made by `python docs/results/fm-kt/fashion-mnist/compare.py`.", "",
             "| comparison | difference |", "|---|---|"]  # fmt: skip
    for name, a, b in COMPARISONS:
        va, vb = values(*a), values(*b)
        if va is None or vb is None:
            continue
        mean, ci = paired(va, vb)
        lines.append(f"| {name} | {mean:+.2f} ± {ci:.2f} |")
    (HERE / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
