"""`nfm kt run`: FM-KT end to end — classifier teacher, logit cache, students (none / kd / fm-kt), accuracy.

For each training seed k (teacher, cache and students re-run with seeds + 1000 k; finished stages reused):

    RUN/seed-K/teacher/                the classifier (nfm kt teacher train)
    CACHE_ROOT/KEY/                    its logits per image and view (nfm kt pairs build)
    RUN/seed-K/students/METHOD-HASH/   one student per method (nfm kt student train)

then every model's held-out accuracy (FM-KT and OFM-KT students at K = 1, 2, 4, 8 sampler steps), means with
95 % t-intervals over the seeds, each flow student against the KD and plain students paired by seed, and
RUN/report.{json,md} + accuracy_vs_steps.png.

A method is `METHOD[+KEY=VALUE...]`: one of none, kd, fm-kt, ofm-kt with the student's KT settings changed
for that row only, e.g. `methods=none,kd,fm-kt,fm-kt+schedule=vp,fm-kt+kd_loss=dist,ofm-kt`. Rows share
their seed's teacher and logit cache, and a row's student is reused by every run that asks for the same one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from nfm.core.config import AtLeast1, check_choices, config_hash, format_table, to_dict, with_overrides
from nfm.core.data import load_data
from nfm.core.errors import NFMError
from nfm.core.io import atomic_write, write_json
from nfm.core.rundir import setup_logger
from nfm.core.seeding import seeded_config
from nfm.pairs.kt import KTPairConfig, build_kt_pairs
from nfm.pairs.lookup import default_cache_root
from nfm.pairs.reader import PairCache
from nfm.pipeline.aggregate import interval, paired
from nfm.student.kt import (
    FLOW_METHODS,
    KTConfig,
    KTStudentRunConfig,
    accuracy_at,
    compute_cost,
    flops,
    load_kt_student,
    run_kt_student_training,
)
from nfm.teacher.classifier import ClassifierRunConfig, accuracy, load_classifier, run_classifier_training

KT_SEEDS = ("teacher.train.seed", "pairs.seed", "student.train.seed")  # seeded: + SEED_STRIDE * k each
LABELS = {
    "none": "student alone (cross-entropy)",
    "kd": "student + vanilla KD",
    "fm-kt": "student + FM-KT",
    "ofm-kt": "student + OFM-KT (online, no teacher)",
}


@dataclass(frozen=True)
class KTRunConfig:
    teacher: ClassifierRunConfig = field(default_factory=ClassifierRunConfig)
    pairs: KTPairConfig = field(default_factory=KTPairConfig)
    student: KTStudentRunConfig = field(default_factory=KTStudentRunConfig)
    methods: tuple[str, ...] = ("none", "kd", "fm-kt")  # METHOD[+KEY=VALUE...]: see the module's docstring
    seeds: AtLeast1 = 3
    eval_steps: tuple[int, ...] = (1, 2, 4, 8)  # K of the FM-KT sampler at evaluation


def seeded(cfg: KTRunConfig, k: int) -> KTRunConfig:
    return seeded_config(cfg, k, KT_SEEDS)


def method_config(kt: KTConfig, spec: str) -> KTConfig:
    """The student's KT config for one row: `fm-kt+schedule=vp` -> kt with method fm-kt and the vp path."""
    method, *opts = spec.split("+")
    bad = [o for o in opts if "=" not in o or o.startswith("method=")]
    if bad:
        raise NFMError(
            f"method {spec!r}: {bad[0]!r} is not KEY=VALUE of the student's kt settings; write a method as "
            "METHOD[+KEY=VALUE...], e.g. fm-kt+schedule=vp"
        )
    return with_overrides(kt, [f"method={method}", *opts], prefix="student.kt.")


def method_of(spec: str) -> str:
    return spec.split("+")[0]


def label(spec: str) -> str:
    method, *opts = spec.split("+")
    return LABELS.get(method, method) + (f" ({', '.join(opts)})" if opts else "")


def is_flow(spec: str) -> bool:
    return method_of(spec) in FLOW_METHODS


def check_kt_run(cfg: KTRunConfig) -> None:
    check_choices(cfg)
    if not cfg.methods:
        raise NFMError("methods is empty: give some of none, kd, fm-kt, ofm-kt (e.g. methods=none,kd,fm-kt)")
    twice = sorted({m for m in cfg.methods if cfg.methods.count(m) > 1})
    if twice:
        raise NFMError(f"methods names {twice[0]!r} twice; give each row once")
    for spec in cfg.methods:
        method_config(cfg.student.kt, spec)
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
    t_all, per_seed, timings, costs = time.perf_counter(), [], [], {}
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
        if "teacher" not in costs:
            x = test.__getitems__([0])[0].to(next(teacher.parameters()).device)
            with torch.no_grad():
                costs["teacher"] = {"parameters": sum(p.numel() for p in teacher.parameters()),
                                    "inference_flops": {"1": flops(partial(teacher, x))},
                                    "train_flops_per_image": None}  # fmt: skip
        for spec in c.methods:
            kt = method_config(c.student.kt, spec)
            scfg = replace(c.student, kt=kt, pairs=str(built.path))
            t0 = time.perf_counter()
            sdir_m = sdir / "students" / f"{kt.method}-{config_hash(scfg)}"
            sexp = run_kt_student_training(
                scfg, sdir_m, PairCache(built.path, kinds=("kt",), reader="a KT student"), log=log
            )
            timings.append({"stage": f"seed {k}: student {spec}", "seconds": round(time.perf_counter() - t0, 1)})
            student, _ = load_kt_student(sexp)
            if spec not in costs:  # the same for every seed
                train_cfg = {"train_steps": scfg.train.steps, "batch_size": scfg.train.batch_size}
                costs[spec] = compute_cost(student, list(cfg.eval_steps)) | train_cfg
            accs = accuracy_at(student, test, list(cfg.eval_steps))
            result["students"][spec] = {str(s): a for s, a in accs.items()}
            log.info(f"seed {k} {spec}: held-out accuracy {result['students'][spec]}")
        per_seed.append(result)
    report = aggregate(cfg, per_seed, preset)
    report["timings"] = timings
    report["costs"] = costs
    report["total_seconds"] = round(time.perf_counter() - t_all, 1)
    report["test_images"] = len(test)
    return write_kt_report(report, run_dir)


def aggregate(cfg: KTRunConfig, per_seed: list[dict[str, Any]], preset: str) -> dict[str, Any]:
    """Means with 95 % t-intervals over the seeds, in accuracy percent; each flow row (fm-kt, ofm-kt and their
    variants) minus the KD and the plain student, paired by seed."""

    def cell(values: list[float]) -> dict[str, Any]:
        mean, ci = interval([100 * v for v in values])
        return {"mean": mean, "ci": ci, "values": [100 * v for v in values]}

    out: dict[str, Any] = {"preset": preset, "seeds": len(per_seed), "eval_steps": list(cfg.eval_steps)}
    out["teacher"] = cell([r["teacher"] for r in per_seed])
    out["students"] = {
        m: {k: cell([r["students"][m][k] for r in per_seed]) for k in per_seed[0]["students"][m]} for m in cfg.methods
    }
    out["differences"] = {}
    online = [m for m in cfg.methods if method_of(m) == "ofm-kt"]  # "ofm-kt" itself first, if there
    online = sorted(online, key=lambda m: m != "ofm-kt")[:1]
    for base in [b for b in ("kd", "none") if b in cfg.methods] + online:

        def ref(k: str, base: str = base) -> list[float]:  # a flow base at the same K, the others' one number
            return [100 * r["students"][base][k if is_flow(base) else "1"] for r in per_seed]

        # against OFM-KT (the same network, no teacher) the FM-KT rows only: what the teacher's logits add
        rows = [m for m in cfg.methods if (method_of(m) == "fm-kt" if is_flow(base) else is_flow(m))]
        out["differences"][base] = {
            m: {k: dict(zip(("mean", "ci"), paired([100 * r["students"][m][k] for r in per_seed], ref(k))))
                for k in per_seed[0]["students"][m]}
            for m in rows
        }  # fmt: skip
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


def _differences(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    if "fmkt_minus_kd" in report:  # a report.json written before the per-row differences
        return {"kd": {"fm-kt": report["fmkt_minus_kd"]}}
    return report.get("differences", {})


def _cost_lines(report: dict[str, Any], steps: list[str]) -> list[str]:
    costs = report.get("costs")
    if not costs:
        return []
    lines = [
        "## Compute",
        "",
        "Per image, as torch's FlopCounterMode counts (2 FLOPs per multiply-add of convolutions and matrix "
        "products; norms and activations left out); training = the FLOPs of one image's step x batch x steps.",
        "",
        "| model | parameters | " + " | ".join(f"MFLOPs, K = {k}" for k in steps) + " | training GFLOPs |",
        "|---|---:|" + "---:|" * len(steps) + "---:|",
    ]
    for m, c in costs.items():
        inf = c["inference_flops"]
        cells = [f"{inf[k] / 1e6:.2f}" if k in inf else "" for k in steps]
        per_image = c["train_flops_per_image"]
        total = f"{per_image * c['batch_size'] * c['train_steps'] / 1e9:,.4g}" if per_image else ""
        name = "teacher (logits cached once)" if m == "teacher" else label(m)
        lines.append(f"| {name} | {c['parameters']:,} | " + " | ".join(cells) + f" | {total} |")
    return lines + [""]


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
        f"in training, KD loss `{s['kt']['kd_loss']}`, unless a row names another setting.",
        "",
        "| model | " + " | ".join(f"K = {k}" for k in steps) + " |",
        "|---|" + "---|" * len(steps),
        f"| teacher | {_fmt(report['teacher'])} |" + " |" * (len(steps) - 1),
    ]
    for m, cells in report["students"].items():
        row = [_fmt(cells[k]) if k in cells else "" for k in steps]
        if not is_flow(m):
            row = [_fmt(cells["1"])] + [""] * (len(steps) - 1)
        lines.append(f"| {label(m)} | " + " | ".join(row) + " |")
    lines += ["", "The plain and KD students have no sampler: their one number is in the K = 1 column.", ""]
    names = {"kd": "vanilla KD", "none": "the student alone"}
    for base, rows in _differences(report).items():
        name = names.get(base) or f"{label(base).removeprefix('student + ')} (the same network), at the same K"
        if not rows:
            continue
        lines += [
            f"Minus {name}, paired by seed (percentage points; an interval that excludes 0 separates them):",
            "",
            "| | " + " | ".join(f"K = {k}" for k in steps) + " |",
            "|---|" + "---|" * len(steps),
        ]
        for m, d in rows.items():
            lines.append(f"| {label(m)} − {base} | " + " | ".join(_fmt(d[k]) if k in d else "" for k in steps) + " |")
        lines.append("")
    lines += [f"![accuracy vs K]({plot.name})", ""] + _cost_lines(report, steps)
    lines += ["## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {t['stage']} | {t['seconds']} |" for t in report.get("timings", [])]
    lines += ["", f"Total: {report.get('total_seconds', 0):.0f} s.", ""]
    path = run_dir / "report.md"
    atomic_write(path, lambda p: p.write_text("\n".join(lines) + "\n"))
    return path


def plot_accuracy(report: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = accuracy_figure(report)
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path


def accuracy_figure(report: dict[str, Any]):
    """Held-out accuracy against K: flow students as lines, the others (and the teacher) as bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flows = [m for m in report["students"] if is_flow(m)]
    fig, ax = plt.subplots(figsize=(8.6 if len(flows) > 1 else 6.4, 4.2), dpi=120)
    ks = report["eval_steps"]

    def band(c: dict[str, Any], name: str, style: str, color: str, z: float = 2, width: float = 1.6) -> None:
        """A model with no K as a line at its mean (the value in the legend: equal means draw one line) and
        its interval as a band."""
        ci = f" ± {c['ci']:.2f}" if c["ci"] else ""
        ax.axhline(c["mean"], linestyle=style, color=color, label=f"{name}: {c['mean']:.2f}{ci} %", zorder=z,
                   linewidth=width)  # fmt: skip
        if c["ci"]:
            ax.axhspan(c["mean"] - c["ci"], c["mean"] + c["ci"], color=color, alpha=0.12)

    band(report["teacher"], "teacher", "-", "black")
    bands = [m for m in report["students"] if not is_flow(m)]
    # the plain student grey, KD blue, further baselines other blues and greens; line styles differ too
    band_colors = ["tab:blue", "#08306b", "#4eb3d3", "#2ca25f", "#7a0177", "#a6761d"]
    band_styles = ["--", "-.", (0, (1, 2)), (0, (5, 2)), (0, (3, 1, 1, 1)), (0, (8, 3))]
    extra = 0
    for m in bands:
        if m == "none":  # drawn over the others: equal means stay visible as both
            band(report["students"][m]["1"], label(m), ":", "tab:grey", 3, width=2.6)
            continue
        band(report["students"][m]["1"], label(m), band_styles[extra % 6], band_colors[extra % 6])
        extra += 1
    flow_colors = ["tab:red", "tab:purple", "tab:orange", "tab:green", "tab:pink", "tab:brown", "tab:cyan",
                   "tab:olive", "#1b1b6e", "#e7298a"]  # fmt: skip
    markers = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "*"]
    for i, m in enumerate(flows):
        cells = report["students"][m]
        xs = [k for k in ks if str(k) in cells]
        # error bars of rows at the same K side by side, not on top of one another
        shift = 2 ** (0.05 * (i - (len(flows) - 1) / 2))
        err = [cells[str(k)]["ci"] or 0 for k in xs]
        ax.errorbar([x * shift for x in xs], [cells[str(k)]["mean"] for k in xs], yerr=err if any(err) else None,
                    marker=markers[i % 10], capsize=3, color=flow_colors[i % 10], label=label(m))  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_ylim(top=min(ax.get_ylim()[1], 100.0))  # an interval may reach past 100 %; accuracy cannot
    ax.set_xlabel("K, sampler steps at evaluation (FM-KT, OFM-KT)")
    ax.set_ylabel("held-out accuracy (%)")
    seeds = report["seeds"]
    ax.set_title(f"{report['preset']}: accuracy vs K ({'95 % intervals, ' if seeds > 1 else ''}{seeds} seed"
                 f"{'s' if seeds > 1 else ''})", fontsize=10)  # fmt: skip
    ax.grid(True, alpha=0.3)
    if len(flows) > 1:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def rerender(run_dir: Path) -> Path:
    """report.md and the plot again from RUN/report.json; the means, intervals and differences recomputed from its
    per-seed accuracies when RUN/config.json (the run's config) is there."""
    from nfm.core.config import from_dict
    from nfm.core.io import read_json

    run_dir = Path(run_dir)
    report = read_json(run_dir / "report.json", "kt report")
    if (run_dir / "config.json").is_file():
        saved = read_json(run_dir / "config.json", "kt run config")
        cfg = from_dict(KTRunConfig, {k: v for k, v in saved.items() if k != "preset"})
        report = report | aggregate(cfg, report["per_seed"], saved.get("preset", report["preset"]))
        report.pop("fmkt_minus_kd", None)
    return write_kt_report(report, run_dir)


if __name__ == "__main__":  # python -m nfm.pipeline.kt RUN_DIR: report.md and the plot again from report.json
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m nfm.pipeline.kt RUN_DIR   (re-render report.md from report.json)")
    print(rerender(Path(sys.argv[1])))
