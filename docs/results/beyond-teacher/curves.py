"""The training-length and teacher-quality ceilings (issue 25), read from finished `nfm run` directories.

Each directory is one `nfm run` of the same preset that differs in one setting; seed 0's scores are read from
its report.json (the FID of the run's own evaluation: eval.n samples, the run's feature network and noise).

    length   runs that differ in student.train.steps: FID against the students' training steps, one line per
             coupling (the NFM student from its fitted prior and from N(0, I)), one panel per Euler count
    teacher  runs that differ in teacher.train.steps: the teacher's held-out bits/dim and FID (decode + denoise,
             from N(0, I) and from its fitted prior) against its steps, and the NFM student's FID against them

    python docs/results/beyond-teacher/curves.py length RUN... --out DIR/length   # DIR/length.{json,png}
    python docs/results/beyond-teacher/curves.py teacher RUN... --out DIR/teacher
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nfm.core.io import atomic_write, read_json

NFM_N01 = "nfm[prior=gaussian]"  # the knob variant: the same NFM student sampled from N(0, I)
TEACHER = "teacher"  # its decode + denoise from its fitted prior, drawn beside the students (one sampler, no steps)
LABELS = {"nfm": "NFM, fitted prior", NFM_N01: "NFM, N(0, I)", "independent": "I-CFM", "minibatch-ot": "OT-CFM",
          "sd-ot": "SD-FM", TEACHER: "teacher, decode + denoise, fitted prior"}  # fmt: skip
TEACHER_ROWS = {"decode+denoise": "N(0, I)", "decode+denoise@fitted": "fitted prior"}


def _seed0(run: Path) -> tuple[dict, dict]:
    """(run config, seed 0's scores) of a finished run."""
    return read_json(run / "config.json", "run config"), read_json(run / "report.json", "report")["per_seed"][0]


def _euler(student: dict) -> dict[int, float]:
    return {r["steps"]: r["fid"] for r in student["rows"] if r["solver"] == "euler"}


def length(runs: list[Path]) -> dict:
    """{steps: {model: {euler steps: FID}}} over runs that differ in the students' training steps."""
    out: dict = {}
    for run in runs:
        cfg, seed0 = _seed0(run)
        steps = cfg["student"]["train"]["steps"]
        if steps in out:
            raise SystemExit(f"{run}: two runs train their students {steps} steps; give each length once")
        out[steps] = {name: _euler(s) for name, s in seed0["students"].items() if name in LABELS}
        fitted = [
            r["fid"] for r in (seed0.get("teacher") or {}).get("rows", []) if r["sampler"] == "decode+denoise@fitted"
        ]
        if fitted:  # the same at every Euler count: a line to read the students against
            out[steps][TEACHER] = dict.fromkeys(out[steps]["nfm"], fitted[0])
    return dict(sorted(out.items()))


def teacher(runs: list[Path]) -> dict:
    """{teacher steps: {bpd, teacher: {prior: FID}, nfm: {prior: {euler steps: FID}}}}."""
    out: dict = {}
    for run in runs:
        cfg, seed0 = _seed0(run)
        t = seed0["teacher"]
        fids = {r["sampler"]: r["fid"] for r in t["rows"]}
        students = seed0["students"]
        out[cfg["teacher"]["train"]["steps"]] = {
            "bpd": t["test_bpd"],
            "teacher": {prior: fids[s] for s, prior in TEACHER_ROWS.items()},
            "nfm": {"fitted prior": _euler(students["nfm"])}
            | ({"N(0, I)": _euler(students[NFM_N01])} if NFM_N01 in students else {}),
        }  # fmt: skip
    return dict(sorted(out.items()))


def _print_length(r: dict) -> None:
    nfes = sorted({k for row in r.values() for m in row.values() for k in m})
    for steps in nfes:
        print(f"\nEuler {steps}: FID against the students' training steps\n")
        print("| model | " + " | ".join(f"{n:,} steps" for n in r) + " |")
        print("|---|" + "---|" * len(r))
        for name, label in LABELS.items():
            if not any(name in row for row in r.values()):
                continue
            cells = [f"{row[name][steps]:.2f}" if name in row else "–" for row in r.values()]
            print(f"| {label} | " + " | ".join(cells) + " |")


def _print_teacher(r: dict) -> None:
    nfes = sorted({k for row in r.values() for m in row["nfm"].values() for k in m})
    print("| teacher steps | held-out bits/dim | teacher FID, N(0, I) | teacher FID, fitted | "
          + " | ".join(f"NFM Euler {s}, fitted" for s in nfes) + " | " + " | ".join(f"NFM Euler {s}, N(0, I)"
          for s in nfes) + " |")  # fmt: skip
    print("|---|" + "---|" * (3 + 2 * len(nfes)))
    for steps, row in r.items():
        cells = [f"{steps:,}", f"{row['bpd']:.4f}", *(f"{row['teacher'][p]:.2f}" for p in TEACHER_ROWS.values())]
        for prior in ("fitted prior", "N(0, I)"):
            cells += [f"{row['nfm'][prior][s]:.2f}" if prior in row["nfm"] else "–" for s in nfes]
        print("| " + " | ".join(cells) + " |")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_axis(ax, values: list[float]) -> None:
    """A log y axis labelled with plain numbers at round values inside the data's range."""
    lo, hi = min(values), max(values)
    ticks = [
        t
        for t in (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30, 40, 50, 60, 80, 100, 150, 200, 300)
        if lo * 0.9 <= t <= hi * 1.1
    ]
    ax.set_yscale("log")
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.grid(alpha=0.3)


def _plot_length(r: dict, path: Path) -> None:
    plt = _pyplot()
    nfes = sorted({k for row in r.values() for m in row.values() for k in m})
    fig, axes = plt.subplots(1, len(nfes), figsize=(3.6 * len(nfes), 3.9), dpi=120, squeeze=False)
    for ax, steps in zip(axes[0], nfes, strict=True):
        values = []
        for k, (name, label) in enumerate(LABELS.items()):
            pts = [(n, row[name][steps]) for n, row in r.items() if name in row]
            if not pts:
                continue
            values += [v for _, v in pts]
            color, ls = {NFM_N01: ("C0", "--"), TEACHER: ("k", ":")}.get(name, (f"C{k}", "-"))
            ax.plot(*zip(*pts, strict=True), marker="s" if name == TEACHER else "o", color=color, label=label, ls=ls)
        ax.set(xscale="log", title=f"Euler {steps}", xlabel="student training steps")
        _log_axis(ax, values)
        ax.set_xticks(list(r), [f"{n:,}" for n in r])
    axes[0][0].set_ylabel("FID (seed 0)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    atomic_write(path, lambda p: fig.savefig(p, format="png"))


def _plot_teacher(r: dict, path: Path) -> None:
    from matplotlib.lines import Line2D

    plt = _pyplot()
    steps = list(r)
    nfes = sorted(r[steps[0]]["nfm"]["fitted prior"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.5, 4.4), dpi=120)
    values: list[float] = []
    for prior, ls in (("N(0, I)", "--"), ("fitted prior", "-")):
        ys = [r[s]["teacher"][prior] for s in steps]
        left.plot(steps, ys, "k", ls=ls, marker="s")
        values += ys
        for k, nfe in enumerate(nfes):
            if prior in r[steps[0]]["nfm"]:
                ys = [r[s]["nfm"][prior][nfe] for s in steps]
                left.plot(steps, ys, color=f"C{k}", ls=ls, marker="o")
                values += ys
    left.set(xscale="log", xlabel="teacher training steps", ylabel="FID (seed 0)",
             title="teacher and NFM student against the teacher's steps")  # fmt: skip
    _log_axis(left, values)
    left.set_xticks(steps, [f"{s:,}" for s in steps])
    bpd = [r[s]["bpd"] for s in steps]
    values = []
    for k, nfe in enumerate(nfes):
        ys = [r[s]["nfm"]["fitted prior"][nfe] for s in steps]
        right.plot(bpd, ys, color=f"C{k}", marker="o")
        values += ys
    ys = [r[s]["teacher"]["fitted prior"] for s in steps]
    right.plot(bpd, ys, "k", marker="s")
    values += ys
    for s, b in zip(steps, bpd, strict=True):
        right.annotate(f"{s:,} steps", (b, r[s]["teacher"]["fitted prior"]), fontsize=7, xytext=(3, -11),
                       textcoords="offset points")  # fmt: skip
    right.set(xlabel="teacher bits/dim on held-out images (lower is better)",
              title="from the fitted prior, against the teacher's likelihood")  # fmt: skip
    _log_axis(right, values)
    handles = [Line2D([], [], color="k", marker="s", label="teacher, decode + denoise")]
    handles += [
        Line2D([], [], color=f"C{k}", marker="o", label=f"NFM student, Euler {nfe}") for k, nfe in enumerate(nfes)
    ]
    handles += [Line2D([], [], color="grey", ls="-", label="from the fitted prior"),
                Line2D([], [], color="grey", ls="--", label="from N(0, I)")]  # fmt: skip
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.11, 1, 1))
    atomic_write(path, lambda p: fig.savefig(p, format="png"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", choices=("length", "teacher"))
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, help="write OUT.json and OUT.png")
    args = ap.parse_args()
    results = length(args.runs) if args.study == "length" else teacher(args.runs)
    (_print_length if args.study == "length" else _print_teacher)(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
        (_plot_length if args.study == "length" else _plot_teacher)(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
