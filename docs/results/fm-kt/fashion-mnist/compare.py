"""Paired-by-seed differences between rows of the reports in this folder (they share their seeds' teachers
and logit caches, so seed k of one report is seed k of another). Writes compare.md:

    python docs/results/fm-kt/fashion-mnist/compare.py
"""

from __future__ import annotations

import json
from pathlib import Path

from nfm.pipeline.aggregate import paired

HERE = Path(__file__).resolve().parent
B, W12, W8, STRONG = "budget-2000-steps", "control-compute-w12", "control-compute-w8", "strong-teacher"
OFM = "ofm-kt+label_smoothing=0.1"
COMPARISONS = [  # (label, (report folder, row, K), (report folder, row, K)); "" is this folder's report
    # 2,000 steps: the compute-matched KD students
    ("2,000 steps: FM-KT (K = 2) − KD of width 12 trained 3,130 steps (parameters, FLOPs at K = 2 and "
     "training FLOPs matched)", (B, "fm-kt", "2"), (W12, "kd", "1")),
    ("2,000 steps: FM-KT (K = 8) − the same width-12 KD", (B, "fm-kt", "8"), (W12, "kd", "1")),
    ("2,000 steps: FM-KT (K = 1) − KD of width 8 trained 6,810 steps (training FLOPs matched)",
     (B, "fm-kt", "1"), (W8, "kd", "1")),
    ("2,000 steps: FM-KT (K = 8) − the same width-8 KD", (B, "fm-kt", "8"), (W8, "kd", "1")),
    # 2,000 steps: where FM-KT's gain comes from
    ("2,000 steps: FM-KT − OFM-KT without alignment (kd_weight=0: cross-entropy on every step only), K = 8",
     (B, "fm-kt", "8"), (B, "ofm-kt+kd_weight=0", "8")),
    ("2,000 steps: OFM-KT − the plain student, both with label smoothing 0.1 (K = 8)",
     (B, OFM, "8"), (B, "none+label_smoothing=0.1", "1")),
    # 6,000 steps (the preset)
    ("6,000 steps: FM-KT (K = 8) − KD", ("", "fm-kt", "8"), ("", "kd", "1")),
    ("6,000 steps: FM-KT (K = 8) − KD with DIST", ("", "fm-kt", "8"), ("", "kd+kd_loss=dist", "1")),
    ("6,000 steps: FM-KT − OFM-KT (no teacher), K = 8", ("", "fm-kt", "8"), ("", OFM, "8")),
    ("6,000 steps: FM-KT − OFM-KT (no teacher), K = 1", ("", "fm-kt", "1"), ("", OFM, "1")),
    # a teacher trained 6,000 steps instead of 1,500 (students 6,000 steps)
    ("stronger teacher: its accuracy − the preset teacher's", (STRONG, "teacher", ""), ("", "teacher", "")),
    ("stronger teacher: FM-KT − FM-KT with the preset teacher, K = 8", (STRONG, "fm-kt", "8"), ("", "fm-kt", "8")),
    ("stronger teacher: KD with DIST − the same with the preset teacher",
     (STRONG, "kd+kd_loss=dist", "1"), ("", "kd+kd_loss=dist", "1")),
    ("stronger teacher: FM-KT − OFM-KT (no teacher, the preset run's), K = 8", (STRONG, "fm-kt", "8"), ("", OFM, "8")),
    ("stronger teacher: FM-KT (K = 8) − KD with DIST", (STRONG, "fm-kt", "8"), (STRONG, "kd+kd_loss=dist", "1")),
]  # fmt: skip


def values(report: str, row: str, k: str) -> list[float] | None:
    path = HERE / report / "report.json"
    if not path.is_file():
        return None
    per_seed = json.loads(path.read_text())["per_seed"]
    if row == "teacher":
        return [100 * s["teacher"] for s in per_seed]
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
