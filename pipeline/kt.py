"""`nfm kt run`: FM-KT end to end — classifier teacher, logit cache, students (none / kd / fm-kt), accuracy.

For each training seed k (teacher, cache and students re-run with seeds + 1000 k; finished stages reused):

    RUN/seed-K/teacher/                the classifier (nfm kt teacher train)
    CACHE_ROOT/KEY/                    its logits per image and view (nfm kt pairs build)
    RUN/seed-K/students/METHOD-HASH/   one student per method (nfm kt student train)

then every model's held-out accuracy (FM-KT students at K = 1, 2, 4, 8 sampler steps), means with 95 %
t-intervals over the seeds, FM-KT against KD paired by seed, and RUN/report.{json,md} + accuracy_vs_steps.png.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from nfm.pairs.kt import KTPairConfig, build_kt_pairs
from nfm.pairs.lookup import default_cache_root
from nfm.pairs.reader import PairCache
from nfm.pipeline.aggregate import interval, paired
from nfm.pipeline.core.config import AtLeast1, check_choices, format_table, to_dict
from nfm.pipeline.core.data import load_data
from nfm.pipeline.core.errors import NFMError
from nfm.pipeline.core.io import atomic_write, write_json
from nfm.pipeline.core.rundir import setup_logger
from nfm.student.kt import KTStudentRunConfig, accuracy_at, load_kt_student, run_kt_student_training
from nfm.teacher.classifier import ClassifierRunConfig, accuracy, load_classifier, run_classifier_training

Method = Literal["none", "kd", "fm-kt"]
SEED_STRIDE = 1000
LABELS = {"none": "student alone (cross-entropy)", "kd": "student + vanilla KD", "fm-kt": "student + FM-KT"}


@dataclass(frozen=True)
class KTRunConfig:
    teacher: ClassifierRunConfig = field(default_factory=ClassifierRunConfig)
    pairs: KTPairConfig = field(default_factory=KTPairConfig)
    student: KTStudentRunConfig = field(default_factory=KTStudentRunConfig)
    methods: tuple[Method, ...] = ("none", "kd", "fm-kt")
    seeds: AtLeast1 = 3
    eval_steps: tuple[int, ...] = (1, 2, 4, 8)  # K of the FM-KT sampler at evaluation


def seeded(cfg: KTRunConfig, k: int) -> KTRunConfig:
    if k == 0:
        return cfg
    d = SEED_STRIDE * k
    t, s = cfg.teacher, cfg.student
    return replace(
        cfg,
        teacher=replace(t, train=replace(t.train, seed=t.train.seed + d)),
        pairs=replace(cfg.pairs, seed=cfg.pairs.seed + d),
        student=replace(s, train=replace(s.train, seed=s.train.seed + d)),
    )


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(to_dict(obj), sort_keys=True).encode()).hexdigest()[:10]


def check_kt_run(cfg: KTRunConfig) -> None:
    check_choices(cfg)
    if not cfg.methods:
        raise NFMError("methods is empty: give some of none, kd, fm-kt (e.g. methods=none,kd,fm-kt)")
    if any(k < 1 for k in cfg.eval_steps):
        raise NFMError(f"eval_steps must be >= 1, got {list(cfg.eval_steps)}")


def run_kt(cfg: KTRunConfig, run_dir: Path, preset: str = "custom", cache_root: Path | None = None) -> Path:
    """Every stage for every seed, then the evaluation and the report; returns report.md."""
    check_kt_run(cfg)
    run_dir, cache_root = Path(run_dir), Path(cache_root or default_cache_root())
    log = setup_logger(run_dir, name="nfm.kt")
    log.info(format_table(cfg, f"nfm kt run --preset {preset} -> {run_dir}"))
    write_json(run_dir / "config.json", {"preset": preset, **to_dict(cfg)})
    test = load_data(cfg.teacher.data, "test")
    t_all, per_seed, timings = time.perf_counter(), [], []
    for k in range(cfg.seeds):
        c = seeded(cfg, k)
        sdir = run_dir / f"seed-{k}"
        t0 = time.perf_counter()
        export = run_classifier_training(c.teacher, sdir / "teacher")
        teacher, meta = load_classifier(export)
        timings.append({"stage": f"seed {k}: teacher", "seconds": round(time.perf_counter() - t0, 1)})
        t0 = time.perf_counter()
        built = build_kt_pairs(teacher, load_data(c.teacher.data, "train"), c.pairs, cache_root,
                               teacher_info={"source": str(export)}, log=log.info)  # fmt: skip
        timings.append({"stage": f"seed {k}: logit cache", "seconds": round(time.perf_counter() - t0, 1)})
        result: dict[str, Any] = {"teacher": accuracy(teacher, test), "cache": built.key, "students": {}}
        for method in c.methods:
            scfg = replace(c.student, kt=replace(c.student.kt, method=method), pairs=str(built.path))
            t0 = time.perf_counter()
            sexp = run_kt_student_training(scfg, sdir / "students" / f"{method}-{_hash(scfg)}", PairCache(built.path),
                                           log=log)  # fmt: skip
            timings.append({"stage": f"seed {k}: student {method}", "seconds": round(time.perf_counter() - t0, 1)})
            student, _ = load_kt_student(sexp)
            accs = accuracy_at(student, test, list(cfg.eval_steps))
            result["students"][method] = {str(s): a for s, a in accs.items()}
            log.info(f"seed {k} {method}: held-out accuracy {result['students'][method]}")
        per_seed.append(result)
    report = aggregate(cfg, per_seed, preset)
    report["timings"] = timings
    report["total_seconds"] = round(time.perf_counter() - t_all, 1)
    report["test_images"] = len(test)
    return write_kt_report(report, run_dir)


def aggregate(cfg: KTRunConfig, per_seed: list[dict[str, Any]], preset: str) -> dict[str, Any]:
    """Means with 95 % t-intervals over the seeds, in accuracy percent; FM-KT minus KD paired by seed."""

    def cell(values: list[float]) -> dict[str, Any]:
        mean, ci = interval([100 * v for v in values])
        return {"mean": mean, "ci": ci, "values": [100 * v for v in values]}

    out: dict[str, Any] = {"preset": preset, "seeds": len(per_seed), "eval_steps": list(cfg.eval_steps)}
    out["teacher"] = cell([r["teacher"] for r in per_seed])
    out["students"] = {
        m: {k: cell([r["students"][m][k] for r in per_seed]) for k in per_seed[0]["students"][m]} for m in cfg.methods
    }
    if "fm-kt" in cfg.methods and "kd" in cfg.methods:
        kd = [100 * r["students"]["kd"]["1"] for r in per_seed]
        out["fmkt_minus_kd"] = {}
        for k in per_seed[0]["students"]["fm-kt"]:
            mean, ci = paired([100 * r["students"]["fm-kt"][k] for r in per_seed], kd)
            out["fmkt_minus_kd"][k] = {"mean": mean, "ci": ci}
    out["settings"] = {
        "teacher": to_dict(cfg.teacher.model) | {"steps": cfg.teacher.train.steps},
        "student": to_dict(cfg.student.model) | {"steps": cfg.student.train.steps},
        "kt": to_dict(cfg.student.kt),
        "views": cfg.pairs.views,
        "data": cfg.teacher.data.name,
    }
    out["per_seed"] = per_seed
    return out


def _fmt(c: dict[str, Any]) -> str:
    return f"{c['mean']:.2f}" if c["ci"] is None else f"{c['mean']:.2f} ± {c['ci']:.2f}"


def write_kt_report(report: dict[str, Any], run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    write_json(run_dir / "report.json", report)
    plot = plot_accuracy(report, run_dir / "accuracy_vs_steps.png")
    steps = [str(k) for k in report["eval_steps"]]
    n, seeds = report["test_images"], report["seeds"]
    spread = f"mean ± 95 % interval over {seeds} seeds" if seeds > 1 else "one seed, no interval"
    s = report["settings"]
    lines = [
        f"# FM-KT report — preset `{report['preset']}`",
        "",
        f"Held-out top-1 accuracy (%) on {n} {s['data']} test images, {spread}. Teacher: ResNet width "
        f"{s['teacher']['width']} ({s['teacher']['steps']} steps); every student the same small CNN (width "
        f"{s['student']['width']}, {s['student']['steps']} steps) trained on the teacher's logit cache "
        f"({s['views']} views per image); FM-KT: {s['kt']['schedule']} path, K = {s['kt']['steps']} serial steps "
        f"in training, KD loss `{s['kt']['kd_loss']}`.",
        "",
        "| model | " + " | ".join(f"K = {k}" for k in steps) + " |",
        "|---|" + "---|" * len(steps),
        f"| teacher | {_fmt(report['teacher'])} |" + " |" * (len(steps) - 1),
    ]
    for m, cells in report["students"].items():
        row = [_fmt(cells[k]) if k in cells else "" for k in steps]
        if m != "fm-kt":
            row = [_fmt(cells["1"])] + [""] * (len(steps) - 1)
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(row) + " |")
    lines += ["", "The plain and KD students have no sampler: their one number is in the K = 1 column.", ""]
    if "fmkt_minus_kd" in report:
        d = report["fmkt_minus_kd"]
        lines += [
            "FM-KT minus vanilla KD, paired by seed (percentage points; an interval that excludes 0 separates them):",
            "",
            "| | " + " | ".join(f"K = {k}" for k in steps if k in d) + " |",
            "|---|" + "---|" * len([k for k in steps if k in d]),
            "| FM-KT − KD | " + " | ".join(_fmt(d[k]) for k in steps if k in d) + " |",
            "",
        ]
    lines += [f"![accuracy vs K]({plot.name})", "", "## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {t['stage']} | {t['seconds']} |" for t in report.get("timings", [])]
    lines += ["", f"Total: {report.get('total_seconds', 0):.0f} s.", ""]
    path = run_dir / "report.md"
    atomic_write(path, lambda p: p.write_text("\n".join(lines) + "\n"))
    return path


def plot_accuracy(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ks = report["eval_steps"]

    def band(c: dict[str, Any], label: str, style: str, color: str, z: float = 2) -> None:
        ax.axhline(c["mean"], linestyle=style, color=color, label=label, zorder=z, linewidth=1.6)
        if c["ci"]:
            ax.axhspan(c["mean"] - c["ci"], c["mean"] + c["ci"], color=color, alpha=0.12)

    band(report["teacher"], "teacher", "-", "black")
    colors, styles = {"none": "tab:grey", "kd": "tab:blue"}, {"none": ":", "kd": "--"}
    for m, cells in report["students"].items():
        if m == "fm-kt":
            xs = [k for k in ks if str(k) in cells]
            ys = [cells[str(k)]["mean"] for k in xs]
            err = [cells[str(k)]["ci"] or 0 for k in xs]
            ax.errorbar(xs, ys, yerr=err if any(err) else None, marker="o", capsize=3, color="tab:red",
                        label=LABELS[m])  # fmt: skip
        else:
            # the dotted line drawn over the dashed one: equal means stay visible as both
            band(cells["1"], LABELS.get(m, m), styles.get(m, "-."), colors.get(m, "tab:green"), 3 if m == "none" else 2)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_ylim(top=min(ax.get_ylim()[1], 100.0))  # an interval may reach past 100 %; accuracy cannot
    ax.set_xlabel("K, FM-KT sampler steps at evaluation")
    ax.set_ylabel("held-out accuracy (%)")
    seeds = report["seeds"]
    ax.set_title(f"{report['preset']}: accuracy vs K ({'95 % intervals, ' if seeds > 1 else ''}{seeds} seed"
                 f"{'s' if seeds > 1 else ''})", fontsize=10)  # fmt: skip
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path


if __name__ == "__main__":  # python -m nfm.pipeline.kt RUN_DIR: report.md and the plot again from report.json
    import sys

    from nfm.pipeline.core.io import read_json

    if len(sys.argv) != 2:
        sys.exit("usage: python -m nfm.pipeline.kt RUN_DIR   (re-render report.md from report.json)")
    print(write_kt_report(read_json(Path(sys.argv[1]) / "report.json", "kt report"), Path(sys.argv[1])))
