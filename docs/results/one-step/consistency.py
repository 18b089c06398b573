"""How far each student's one step lands from its own many-step path: a one-step student is only as good as
its flow (where its many steps go) and its consistency (whether one step goes there too). FID mixes the two;
this separates them, per student of finished `nfm run`s of several objectives.

For every student of each RUN (its report.json's exports, every seed), n samples from the same noise and labels
(the student's own prior, as the evaluation samples it):

    flow  = its 8-step sample: Euler 8 of the velocity for flow matching, 8 steps of the average velocity for
            MeanFlow and shortcut students (what its one step should reach);
    gap   = RMS(one step - flow) per pixel, in data units ([-1, 1]);
    gap/spread = gap over the RMS distance of the 8-step samples from their batch mean: 0 is a one step that
            reaches the student's own flow, 1 one that misses it by as much as its samples differ.

For one-step students the Euler 8 of their velocity at h = 0 is also compared with their 8 average-velocity
steps (`h0 gap`): whether the two things one network learns describe the same flow.

    python docs/results/one-step/consistency.py RUN [RUN...] [--n 500] [--out consistency.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from nfm.core.sampling import sample_labels
from nfm.pipeline.api import Student
from nfm.student.sampling import sample_ode, student_inputs


def rms(a: torch.Tensor) -> float:
    return float(a.double().pow(2).mean().sqrt())


@torch.no_grad()
def measure(export: str, n: int, seed: int) -> dict[str, float]:
    student = Student.from_pretrained(export, device="cpu")
    model, k = student.model, student.num_classes
    one_step = bool(getattr(getattr(model, "cfg", None), "interval", False))
    y = sample_labels(n, k)
    z = student_inputs(student.config, n, seed=seed, device=torch.device("cpu"), labels=y, prior=student.prior).z

    def run(solver: str, steps: int) -> torch.Tensor:
        return sample_ode(model, z, y, solver=solver, steps=steps, num_classes=k)[0]

    solver = "mean" if one_step else "euler"
    flow, one = run(solver, 8), run(solver, 1)
    gap, spread = rms(one - flow), rms(flow - flow.mean(0, keepdim=True))
    out = {"gap": gap, "spread": spread, "gap_over_spread": gap / spread}
    if one_step:
        out["h0_gap"] = rms(run("euler", 8) - flow)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--out", type=Path, default=Path("consistency.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    table: dict[str, dict[str, list[dict[str, float]]]] = {}
    for run in args.runs:
        report = json.loads((run / "report.json").read_text())
        dataset = report["config"]["teacher"]["data"]["name"]
        for name, exports in report["exports"].items():
            if name == "teacher":
                continue
            for export in exports:
                r = measure(export, args.n, args.seed)
                table.setdefault(dataset, {}).setdefault(name, []).append(r)
                extra = f"  h0 gap {r['h0_gap']:.4f}" if "h0_gap" in r else ""
                print(f"{dataset:14s} {name:24s} gap {r['gap']:.4f}  spread {r['spread']:.4f}  "
                      f"gap/spread {r['gap_over_spread']:.3f}{extra}", flush=True)  # fmt: skip
    args.out.write_text(json.dumps({"n": args.n, "seed": args.seed, "runs": [str(r) for r in args.runs],
                                    "students": table}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
