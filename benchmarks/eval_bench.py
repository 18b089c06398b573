"""Where the evaluation of a finished `nfm run` spends its time, and what the dopri5 row's tolerance buys.

    python benchmarks/eval_bench.py RUN_DIR [--tols 1e-5,1e-4,1e-3]

For every student of the run (its first seed): seconds of one velocity evaluation at the evaluation's sample
count, of each sweep row (sampling, then scoring), and of dopri5 at each tolerance with its NFE and FID (the
evaluation's own noise, labels and feature network). Then the teacher's decode and the scorer's set-up (the
reference's features). Writes benchmarks/results/eval-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import timeit, write_results  # noqa: E402
from nfm.core.config import from_dict  # noqa: E402
from nfm.core.data import DataConfig, load_data  # noqa: E402
from nfm.core.io import read_json  # noqa: E402
from nfm.pipeline.evaluate import EvalSet, default_extractor  # noqa: E402
from nfm.student.sampling import sample_ode, student_inputs  # noqa: E402
from nfm.student.train import load_student  # noqa: E402


def clock(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def profile_student(export: Path, on: EvalSet, ev: dict, tols: list[float]) -> tuple[list[dict], list[str]]:
    """One student's sweep, row by row: (result rows, markdown lines)."""
    model, meta = load_student(export, "cpu")
    name = export.parent.name
    inputs = student_inputs(meta, on.n, seed=on.seed, labels_like=on.reference_labels)
    t = torch.full((on.n,), 0.5)
    forward = timeit(lambda: model(inputs.z, t, inputs.y), repeat=5)
    lines = [f"## {name}", "", f"one velocity evaluation of {on.n} samples: {forward:.3f} s", "",
             "| sampler | NFE | sampling s | scoring s | FID |", "|---|---|---|---|---|"]  # fmt: skip
    plan = [("euler", k, None) for k in ev["euler_nfes"]] + [(ev["higher_solver"], ev["higher_steps"], None)]
    plan += [("dopri5", 1, tol) for tol in tols] if ev["dopri5"] else []
    rows = []
    for solver, steps, tol in plan:
        kw = {"rtol": tol, "atol": tol} if tol else {}
        t0 = time.perf_counter()
        x, stats = sample_ode(model, inputs.z, inputs.y, solver=solver, steps=steps,
                              num_classes=meta["model"]["num_classes"], **kw)  # fmt: skip
        t1 = time.perf_counter()
        scores = on.fid_kid(x.clamp(-1, 1))
        t2 = time.perf_counter()
        label = f"dopri5 tol {tol:g}" if tol else f"{solver} {steps}"
        rows.append({"student": name, "forward_s": round(forward, 4), "sampler": label, "nfe": stats["nfe"],
                     "sampling_s": round(t1 - t0, 2), "scoring_s": round(t2 - t1, 2),
                     "fid": round(scores["fid"], 3)})  # fmt: skip
        lines.append(f"| {label} | {stats['nfe']} | {t1 - t0:.2f} | {t2 - t1:.2f} | {scores['fid']:.3f} |")
        print(lines[-1], flush=True)
    return rows, [*lines, ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--tols", default="1e-5,1e-4,1e-3")
    args = ap.parse_args()
    cfg = read_json(args.run_dir / "config.json", "run config")
    ev, data_cfg = cfg["eval"], from_dict(DataConfig, cfg["teacher"]["data"])
    reference, ref_labels = load_data(data_cfg, "test").tensors()
    train_images = load_data(data_cfg, "train").tensors()[0]
    extractor = ev.get("extractor") or default_extractor(data_cfg.name)
    on = EvalSet(reference, ref_labels, train_images, extractor, ev["n"], ev["seed"])
    _, setup = clock(lambda: on.fid_kid(reference[:10]))  # builds the scorer: the reference's features, once
    rows: list[dict] = []
    lines = [f"# Evaluation profile of {args.run_dir} ({ev['n']} samples, {extractor})", "",
             f"scorer set-up (network + reference features, once per run): {setup:.2f} s", ""]  # fmt: skip
    for export in sorted(args.run_dir.glob("**/students/*/export")):
        student_rows, student_lines = profile_student(export, on, ev, [float(t) for t in args.tols.split(",")])
        rows += student_rows
        lines += student_lines
        lines.append("")
    write_results(f"eval-{'cuda' if torch.cuda.is_available() else 'cpu'}", rows, "\n".join(lines))


if __name__ == "__main__":
    main()
